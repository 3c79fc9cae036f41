"""The kinds of request a role may be granted (access.yaml `may` lists them). Pure: no I/O."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    STORE = "store"
    SEARCH = "search"
    RETRIEVE = "retrieve"
    DIAGNOSE = "diagnose"
    PREFETCH = "prefetch"
    ADMIN = "admin"
