"""One frozen Settings object read from the environment; only `from_env` reads os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import ConfigError

AUTH_MODES = ("none", "local", "oidc")
STORAGE_KINDS = ("local", "s3")
ROLES = ("radiologist", "teleradiologist", "referring", "uploader", "admin")


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./var")
    port: int = 8080
    public_url: str | None = None
    database_url: str = ""
    redis_url: str = ""
    storage: str = "local"
    s3_endpoint_url: str | None = None
    originals_bucket: str = "originals"
    hot_bucket: str = "hot"
    cold_bucket: str = "cold"
    auth_mode: str = "none"
    default_role: str = "radiologist"
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    role_claim: str = "roles"
    uid_root: str = "2.25."
    policies_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parent.parent / "policies")
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: str = "*"
    max_stow_bytes: int = 0

    @property
    def redis_socket(self) -> Path:
        return self.data_dir / "redis" / "redis.sock"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read, convert and validate every variable; one ConfigError names all bad ones."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        data_dir = Path(env.get("DATA_DIR", "./var")).resolve()

        def integer(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not an integer")
                return default
            if not low <= value <= high:
                problems.append(f"{name}={value} is outside {low}..{high}")
            return value

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            value = env.get(name) or default
            if value not in allowed:
                problems.append(f"{name}={value!r} must be one of {', '.join(allowed)}")
            return value

        port = integer("PORT", 8080, 1, 65535)
        storage = choice("STORAGE", "local", STORAGE_KINDS)
        auth_mode = choice("AUTH_MODE", "none", AUTH_MODES)
        default_role = choice("DEFAULT_ROLE", "radiologist", ROLES)
        uid_root = env.get("UID_ROOT") or "2.25."
        if not uid_root.endswith(".") or not all(p.isdigit() for p in uid_root[:-1].split(".")):
            problems.append(f"UID_ROOT={uid_root!r} must be digits and dots ending in a dot")
        if auth_mode == "oidc" and not (env.get("OIDC_ISSUER") and env.get("OIDC_AUDIENCE")):
            problems.append("AUTH_MODE=oidc needs OIDC_ISSUER and OIDC_AUDIENCE")
        database_url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'index.sqlite3'}"
        redis_url = env.get("REDIS_URL") or f"unix://{data_dir / 'redis' / 'redis.sock'}"
        public_url = (env.get("PUBLIC_URL") or "").rstrip("/") or None
        policies_dir = env.get("POLICIES_DIR")
        proxies = tuple(p.strip() for p in (env.get("TRUSTED_PROXIES") or "").split(",") if p.strip())
        max_stow = integer("MAX_STOW_BYTES", 0, 0, 1 << 50)
        if problems:
            raise ConfigError("bad configuration: " + "; ".join(problems))
        defaults = cls()
        return cls(
            data_dir=data_dir,
            port=port,
            public_url=public_url,
            database_url=database_url,
            redis_url=redis_url,
            storage=storage,
            s3_endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            originals_bucket=env.get("ORIGINALS_BUCKET") or "originals",
            hot_bucket=env.get("HOT_BUCKET") or "hot",
            cold_bucket=env.get("COLD_BUCKET") or "cold",
            auth_mode=auth_mode,
            default_role=default_role,
            oidc_issuer=env.get("OIDC_ISSUER") or None,
            oidc_audience=env.get("OIDC_AUDIENCE") or None,
            oidc_jwks_url=env.get("OIDC_JWKS_URL") or None,
            role_claim=env.get("ROLE_CLAIM") or "roles",
            uid_root=uid_root,
            policies_dir=Path(policies_dir).resolve() if policies_dir else defaults.policies_dir,
            trusted_proxies=proxies,
            cors_origins=env.get("CORS_ORIGINS") or "*",
            max_stow_bytes=max_stow,
        )
