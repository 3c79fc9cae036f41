"""Bearer token -> Identity. AUTH_MODE none: every request gets DEFAULT_ROLE; local: tokens that
`gateway token` signs with an Ed25519 key under DATA_DIR; oidc: tokens an issuer signs, verified
against its JWKS (PyJWT's caching PyJWKClient: keys cached, refetched on an unknown key id).

No Flask: http.py hands the Authorization header in and turns TokenRejected into a 401 with
WWW-Authenticate (RFC 6750 3)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import Unauthorized, Unavailable
from gateway.settings import ROLES, Settings

if TYPE_CHECKING:
    from policies.access import AccessRules

REALM = "dicomweb"
LOCAL_ISSUER = "dicomweb-gateway-local"
LOCAL_AUDIENCE = "dicomweb-gateway"
LEEWAY_SECONDS = 30  # clock skew between the issuer and this host
# Asymmetric algorithms only: an HS* token "signed" with the issuer's public key must never verify.
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_LIFESPAN = 300.0  # seconds a fetched key set is trusted before it is fetched again
JWKS_COOLDOWN = 10.0  # at most one forced refetch per this many seconds for unknown key ids
ROLE_SHAPES = ("roles", "realm_access.roles")  # flat, and Keycloak's realm roles
GROUPS_CLAIM = "groups"


@dataclass(frozen=True)
class Identity:
    subject: str
    roles: frozenset[str]
    groups: frozenset[str] = frozenset()
    authenticated: bool = False  # a verified token named the subject (else it is "anonymous@address")

    @property
    def role(self) -> str:
        """The most permissive role, for logs and audit records."""
        order = ("admin", "radiologist", "teleradiologist", "referring", "uploader")
        return next((r for r in order if r in self.roles), next(iter(sorted(self.roles)), ""))


class TokenRejected(Unauthorized):
    """401; `challenge` is the WWW-Authenticate value (RFC 6750 3: no error code when no token came)."""

    def __init__(self, detail: str, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        self.challenge = f'Bearer realm="{REALM}"'
        if error is not None:
            safe = detail.replace("\\", "").replace('"', "'")
            self.challenge += f', error="{error}", error_description="{safe}"'


def identify(
    settings: Settings,
    authorization: str | None,
    remote_addr: str | None,
    access: AccessRules | None = None,
) -> Identity:
    """Resolve the caller.

    Raises:
        TokenRejected: auth is on and the token is missing, malformed, expired, for another audience
            or issuer, or wrongly signed.
        Unavailable: the identity provider's keys could not be fetched.
    """
    if settings.auth_mode == "none":
        return Identity(f"anonymous@{remote_addr or 'unknown'}", frozenset({settings.default_role}))
    token = bearer_token(authorization)
    if settings.auth_mode == "local":
        claims = _decode_local(settings, token)
        role_claim = "roles"
    else:
        claims = oidc_verifier(settings).claims(token)
        role_claim = settings.role_claim
    return identity_from_claims(claims, role_claim, access)


def bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.strip():
        raise TokenRejected("a bearer token is required (Authorization: Bearer ...)", error=None)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRejected("the Authorization header must be `Bearer <token>`", error="invalid_request")
    return token.strip()


def claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by dotted path ("realm_access.roles"); None when any step is missing."""
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


def _names(value: Any) -> set[str]:
    """A list of names, or one string of names separated by spaces or commas."""
    if isinstance(value, str):
        return {part for part in value.replace(",", " ").split() if part}
    if isinstance(value, list | tuple):
        return {str(part) for part in value if isinstance(part, str | int)}
    return set()


def identity_from_claims(
    claims: dict[str, Any], role_claim: str, access: AccessRules | None = None
) -> Identity:
    """Roles from the configured claim (falling back to the flat and Keycloak shapes), mapped through
    access.yaml's role_aliases; names the gateway does not know are dropped. Groups lose Keycloak's
    leading "/"."""
    found: set[str] = set()
    for path in dict.fromkeys((role_claim, *ROLE_SHAPES)):
        found |= _names(claim(claims, path))
        if found:
            break
    if access is not None:
        roles = access.known_roles(found)
    else:
        roles = frozenset(r for r in found if r in ROLES)
    groups = frozenset(g.lstrip("/") for g in _names(claim(claims, GROUPS_CLAIM)) if g.lstrip("/"))
    subject = str(claims.get("sub") or claims.get("preferred_username") or "")
    if not subject:
        raise TokenRejected("the token names no subject (sub)")
    return Identity(subject, roles, groups, authenticated=True)


def _rejection(exc: jwt.PyJWTError) -> TokenRejected:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenRejected("the token has expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return TokenRejected("the token is not valid yet")
    if isinstance(exc, jwt.InvalidAudienceError):
        return TokenRejected("the token is not meant for this gateway (audience)")
    if isinstance(exc, jwt.InvalidIssuerError):
        return TokenRejected("the token comes from another issuer")
    if isinstance(exc, jwt.InvalidSignatureError):
        return TokenRejected("the token's signature does not verify")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return TokenRejected(f"the token lacks the {exc.claim} claim")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return TokenRejected("the token is signed with an algorithm this gateway does not accept")
    return TokenRejected(f"the token is not valid ({type(exc).__name__})")


# --- local mode -------------------------------------------------------------------------------------------

_local_lock = threading.Lock()
_local_keys: dict[Path, tuple[float, Ed25519PrivateKey]] = {}


def local_key_path(settings: Settings) -> Path:
    return settings.data_dir / "auth" / "local-signing-key.pem"


def local_signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The Ed25519 key of local mode, created on first use (0600; concurrent creators agree: the first
    link wins, the others read it)."""
    path = local_key_path(settings)
    with _local_lock:
        if not path.exists():
            _create_key(path)
        stamp = path.stat().st_mtime
        cached = _local_keys.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise Unavailable(f"{path} is not an Ed25519 private key")
        _local_keys[path] = (stamp, key)
        return key


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".key-")
    try:
        os.fchmod(handle, 0o600)
        os.write(handle, pem)
        os.fsync(handle)
        os.close(handle)
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)  # atomic; never replaces a key another process made first
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def mint_local_token(
    settings: Settings,
    roles: Iterable[str],
    subject: str | None = None,
    groups: Iterable[str] = (),
    ttl_seconds: int = 8 * 3600,
) -> str:
    """A token AUTH_MODE=local accepts (what `gateway token` prints)."""
    now = int(time.time())
    roles = list(roles)
    claims = {
        "iss": LOCAL_ISSUER,
        "aud": LOCAL_AUDIENCE,
        "sub": subject or f"local-{roles[0] if roles else 'user'}",
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "roles": roles,
        "groups": list(groups),
    }
    return jwt.encode(claims, local_signing_key(settings), algorithm="EdDSA")


def _decode_local(settings: Settings, token: str) -> dict[str, Any]:
    public = local_signing_key(settings).public_key()
    try:
        return jwt.decode(
            token,
            public,
            algorithms=["EdDSA"],
            audience=LOCAL_AUDIENCE,
            issuer=LOCAL_ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.PyJWTError as exc:
        raise _rejection(exc) from exc


# --- oidc mode --------------------------------------------------------------------------------------------


class OidcVerifier:
    """One issuer's tokens: signature against its JWKS, issuer, audience, expiry."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        cooldown: float = JWKS_COOLDOWN,
        lifespan: float = JWKS_LIFESPAN,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._jwks_url = jwks_url
        self._cooldown = cooldown
        self._lifespan = lifespan
        self._client: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    def _discover(self) -> str:
        """OpenID Connect Discovery 1.0 section 4: the issuer's configuration names its jwks_uri."""
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                document = json.load(response)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise Unavailable(f"the identity provider's configuration could not be read from {url}") from exc
        jwks = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks, str):
            raise Unavailable(f"{url} names no jwks_uri")
        return jwks

    def client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is None:
                url = self._jwks_url or self._discover()
                options: dict[str, Any] = {"cache_keys": False, "lifespan": self._lifespan, "timeout": 10}
                if "cooldown_duration" in inspect.signature(jwt.PyJWKClient).parameters:  # PyJWT >= 2.11
                    options["cooldown_duration"] = self._cooldown
                self._client = jwt.PyJWKClient(url, **options)
            return self._client

    def _key(self, token: str) -> jwt.PyJWK:
        client = self.client()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _rejection(exc) from exc
        try:
            if header.get("kid") is None:
                keys = client.get_signing_keys()
                if len(keys) != 1:
                    raise TokenRejected("the token names no key (kid) and the issuer has several")
                return keys[0]
            return client.get_signing_key(str(header["kid"]))
        except jwt.PyJWKClientConnectionError as exc:
            raise Unavailable("the identity provider's keys (JWKS) could not be fetched") from exc
        except jwt.PyJWKClientError as exc:
            raise TokenRejected("the token is signed by a key the issuer does not publish") from exc

    def claims(self, token: str) -> dict[str, Any]:
        key = self._key(token)
        algorithm = key.algorithm_name
        if algorithm not in OIDC_ALGORITHMS:
            raise TokenRejected(f"the issuer's key uses {algorithm}, which this gateway does not accept")
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise _rejection(exc) from exc


_verifiers: dict[tuple[str, str, str | None], OidcVerifier] = {}
_verifiers_lock = threading.Lock()


def oidc_verifier(settings: Settings) -> OidcVerifier:
    """One verifier (and key cache) per issuer, audience and JWKS URL in this process."""
    if not settings.oidc_issuer or not settings.oidc_audience:
        raise Unavailable("AUTH_MODE=oidc needs OIDC_ISSUER and OIDC_AUDIENCE")
    key = (settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_url)
    with _verifiers_lock:
        if key not in _verifiers:
            _verifiers[key] = OidcVerifier(*key)
        return _verifiers[key]
