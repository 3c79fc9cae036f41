"""Which role may do which kind of request (DESIGN.md "Roles"). Pure: no I/O."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    STORE = "store"
    SEARCH = "search"
    RETRIEVE = "retrieve"
    DIAGNOSE = "diagnose"
    PREFETCH = "prefetch"
    ADMIN = "admin"


_GRANTS: dict[str, frozenset[Action]] = {
    "radiologist": frozenset(
        {Action.STORE, Action.SEARCH, Action.RETRIEVE, Action.DIAGNOSE, Action.PREFETCH}
    ),
    "teleradiologist": frozenset(
        {Action.STORE, Action.SEARCH, Action.RETRIEVE, Action.DIAGNOSE, Action.PREFETCH}
    ),
    "referring": frozenset({Action.SEARCH, Action.RETRIEVE, Action.PREFETCH}),
    "uploader": frozenset({Action.STORE}),
    "admin": frozenset(Action),
}


def may(roles: frozenset[str] | set[str], action: Action) -> bool:
    """A user with several roles gets the most permissive (DESIGN.md "Details settled")."""
    return any(action in _GRANTS.get(role, frozenset()) for role in roles)


def reason_denied(roles: frozenset[str] | set[str], action: Action) -> str:
    names = ", ".join(sorted(roles)) or "no role"
    return f"role {names} may not {action.value}"
