"""Request -> Identity. With AUTH_MODE=none every request gets DEFAULT_ROLE."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import Unauthorized
from gateway.settings import Settings


@dataclass(frozen=True)
class Identity:
    subject: str
    roles: frozenset[str]
    groups: frozenset[str] = frozenset()

    @property
    def role(self) -> str:
        order = ("admin", "radiologist", "teleradiologist", "referring", "uploader")
        return next((r for r in order if r in self.roles), next(iter(self.roles), ""))


def identify(settings: Settings, authorization: str | None, remote_addr: str | None) -> Identity:
    """Resolve the caller; token modes arrive with the policy engine (issue 3/5)."""
    if settings.auth_mode == "none":
        return Identity(
            subject=f"anonymous@{remote_addr or 'unknown'}", roles=frozenset({settings.default_role})
        )
    raise Unauthorized(f"AUTH_MODE={settings.auth_mode} is not supported by this build")
