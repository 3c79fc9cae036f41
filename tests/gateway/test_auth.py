"""Identity from real tokens: an OIDC issuer's JWKS served over loopback by a tiny HTTP server (key
rotation, expiry, audience, issuer, signature, Keycloak and flat role claims), and local mode with
tokens minted by `gateway token`."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import auth
from gateway.auth import OidcVerifier, TokenRejected, identify, mint_local_token
from gateway.cli import main as cli
from gateway.errors import Unavailable
from policies.rules import RulesStore

AUDIENCE = "dicomweb-test"


class Issuer:
    """An OIDC issuer on 127.0.0.1: discovery document, a JWKS it can rotate, and a signer."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.published: list[str] = []
        self.fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/jwks.json":
                    issuer.fetches += 1
                    keys = [issuer.jwk(kid) for kid in issuer.published]
                    body = json.dumps({"keys": keys}).encode()
                elif self.path == "/.well-known/openid-configuration":
                    body = json.dumps({"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks.json"}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def new_key(self, kid: str | None = None, kind: str = "rsa", publish: bool = True) -> str:
        kid = kid or uuid.uuid4().hex[:8]
        if kind == "rsa":
            self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        if publish:
            self.published.append(kid)
        return kid

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid].public_key()
        if isinstance(key, rsa.RSAPublicKey):
            data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
            data["alg"] = "RS256"
        else:
            data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
            data["alg"] = "ES256"
        return {**data, "kid": kid, "use": "sig"}

    def token(self, kid: str, ttl: int = 300, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + ttl, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        key = self.keys[kid]
        algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid, **(headers or {})})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oidc_settings(make_settings: Any, issuer: Issuer) -> Any:
    return make_settings(
        AUTH_MODE="oidc",
        OIDC_ISSUER=issuer.url,
        OIDC_AUDIENCE=AUDIENCE,
        OIDC_JWKS_URL=issuer.url + "/jwks.json",
        ROLE_CLAIM="roles",
    )


@pytest.fixture
def access() -> Any:
    return RulesStore(auth.Settings().policies_dir).access


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --- oidc ---------------------------------------------------------------------------------------------------


def test_flat_roles_and_groups_from_a_verified_token(oidc_settings: Any, issuer: Issuer, access: Any) -> None:
    kid = issuer.new_key()
    token = issuer.token(kid, sub="dr-house", roles=["referring", "offline_access"], groups=["/ward-3", "er"])
    who = identify(oidc_settings, bearer(token), "10.0.0.1", access)
    assert who.subject == "dr-house" and who.roles == {"referring"} and who.groups == {"ward-3", "er"}
    assert who.authenticated


def test_keycloak_realm_roles_through_aliases(make_settings: Any, issuer: Issuer, access: Any) -> None:
    settings = make_settings(
        AUTH_MODE="oidc",
        OIDC_ISSUER=issuer.url,
        OIDC_AUDIENCE=AUDIENCE,
        OIDC_JWKS_URL=issuer.url + "/jwks.json",
        ROLE_CLAIM="realm_access.roles",
    )
    kid = issuer.new_key()
    token = issuer.token(kid, realm_access={"roles": ["dicom-radiologist", "uma_authorization"]})
    assert identify(settings, bearer(token), None, access).roles == {"radiologist"}
    # the configured claim missing, a flat "roles" claim still counts
    flat = issuer.token(kid, roles="teleradiologist admin")
    assert identify(settings, bearer(flat), None, access).roles == {"teleradiologist", "admin"}
    assert identify(settings, bearer(flat), None, access).role == "admin"  # the most permissive


def test_the_jwks_is_discovered_from_the_issuer(make_settings: Any, issuer: Issuer, access: Any) -> None:
    settings = make_settings(AUTH_MODE="oidc", OIDC_ISSUER=issuer.url, OIDC_AUDIENCE=AUDIENCE)
    kid = issuer.new_key(kind="ec")
    assert identify(settings, bearer(issuer.token(kid, roles=["admin"])), None, access).roles == {"admin"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ttl": -120}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"sub": None}, "sub"),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(
    oidc_settings: Any, issuer: Issuer, access: Any, change: dict[str, Any], words: str
) -> None:
    kid = issuer.new_key()
    ttl = change.pop("ttl", 300)
    token = issuer.token(kid, ttl=ttl, roles=["radiologist"], **change)
    with pytest.raises(TokenRejected) as caught:
        identify(oidc_settings, bearer(token), None, access)
    assert words in caught.value.detail
    assert 'error="invalid_token"' in caught.value.challenge and words in caught.value.challenge


def test_a_token_signed_by_an_unpublished_key_is_refused(
    oidc_settings: Any, issuer: Issuer, access: Any
) -> None:
    published = issuer.new_key("k1")
    token = issuer.token(published, roles=["admin"])
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, rogue, algorithm="RS256", headers={"kid": "k1"})  # same kid, other key
    with pytest.raises(TokenRejected, match="signature"):
        identify(oidc_settings, bearer(forged), None, access)
    unknown = jwt.encode(claims, rogue, algorithm="RS256", headers={"kid": "nobody"})
    with pytest.raises(TokenRejected, match="does not publish"):
        identify(oidc_settings, bearer(unknown), None, access)


def test_symmetric_tokens_made_with_the_public_key_are_refused(
    oidc_settings: Any, issuer: Issuer, access: Any
) -> None:
    kid = issuer.new_key()
    public_pem = (
        issuer.keys[kid]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 60, "roles": ["admin"]}
    with pytest.raises(Exception):  # noqa: B017 - PyJWT itself refuses to HMAC with a PEM key
        forged = jwt.encode(claims, public_pem, algorithm="HS256", headers={"kid": kid})
        identify(oidc_settings, bearer(forged), None, access)
    forged = jwt.encode(
        claims, "a shared secret that is long enough for HS256", algorithm="HS256", headers={"kid": kid}
    )
    with pytest.raises(TokenRejected):
        identify(oidc_settings, bearer(forged), None, access)


def test_rotated_keys_are_fetched_and_cached(issuer: Issuer) -> None:
    verifier = OidcVerifier(issuer.url, AUDIENCE, issuer.url + "/jwks.json", cooldown=0)
    old = issuer.new_key("old")
    assert verifier.claims(issuer.token(old, sub="a"))["sub"] == "a"
    fetched = issuer.fetches
    for _ in range(5):  # cached: no further fetch
        verifier.claims(issuer.token(old, sub="a"))
    assert issuer.fetches == fetched
    new = issuer.new_key("new")  # the issuer rotates: publishes a new key and signs with it
    issuer.published.remove("old")
    assert verifier.claims(issuer.token(new, sub="b"))["sub"] == "b"
    assert issuer.fetches == fetched + 1


def test_an_unreachable_issuer_is_503_not_401(make_settings: Any, access: Any) -> None:
    settings = make_settings(AUTH_MODE="oidc", OIDC_ISSUER="http://127.0.0.1:9", OIDC_AUDIENCE=AUDIENCE,
                             OIDC_JWKS_URL="http://127.0.0.1:9/jwks.json")  # fmt: skip
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(
        {"sub": "x", "exp": int(time.time()) + 60}, key, algorithm="RS256", headers={"kid": "k"}
    )
    with pytest.raises(Unavailable):
        identify(settings, bearer(token), None, access)


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer    "])
def test_missing_or_malformed_authorization(oidc_settings: Any, access: Any, header: str | None) -> None:
    with pytest.raises(TokenRejected) as caught:
        identify(oidc_settings, header, None, access)
    if not header:
        assert caught.value.challenge == 'Bearer realm="dicomweb"'  # RFC 6750 3.1: no error code


# --- over HTTP ----------------------------------------------------------------------------------------------


@pytest.fixture
def oidc_client(oidc_settings: Any) -> Iterator[Any]:
    from gateway.app import create_app
    from gateway.connections import Connections

    conn = Connections(oidc_settings)
    app = create_app(oidc_settings, conn)
    app.config["TESTING"] = True
    try:
        yield app.test_client()
    finally:
        conn.close()


def test_http_401_carries_www_authenticate(oidc_client: Any, issuer: Issuer) -> None:
    response = oidc_client.get("/dicomweb/studies")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="dicomweb"'
    assert response.mimetype == "application/problem+json" and "bearer token" in response.get_json()["detail"]
    kid = issuer.new_key()
    expired = issuer.token(kid, ttl=-100, roles=["radiologist"])
    response = oidc_client.get("/dicomweb/studies", headers={"Authorization": bearer(expired)})
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="dicomweb", error="invalid_token"') and "expired" in challenge


def test_http_roles_decide_what_a_token_may_do(oidc_client: Any, issuer: Issuer) -> None:
    kid = issuer.new_key()
    referring = {"Authorization": bearer(issuer.token(kid, roles=["referring"]))}
    uploader = {"Authorization": bearer(issuer.token(kid, roles=["uploader"]))}
    nobody = {"Authorization": bearer(issuer.token(kid, roles=["janitor"]))}
    assert oidc_client.get("/dicomweb/studies", headers=referring).status_code in (200, 204)  # 204: none yet
    refused = oidc_client.get("/dicomweb/studies", headers=uploader)
    assert refused.status_code == 403 and "uploader may not search" in refused.get_json()["detail"]
    stow = oidc_client.post(
        "/dicomweb/studies", headers=referring, data=b"", content_type="multipart/related"
    )
    assert stow.status_code == 403 and "referring may not store" in stow.get_json()["detail"]
    assert "no role" in oidc_client.get("/dicomweb/studies", headers=nobody).get_json()["detail"]


# --- local mode ---------------------------------------------------------------------------------------------


def test_gateway_token_mints_what_local_mode_accepts(make_settings: Any, access: Any) -> None:
    settings = make_settings(AUTH_MODE="local")
    env = {"DATA_DIR": str(settings.data_dir), "AUTH_MODE": "local"}
    result = CliRunner().invoke(
        cli,
        ["token", "--role", "teleradiologist", "--sub", "tele-1", "--groups", "night,er", "--ttl", "60"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    who = identify(settings, bearer(token), None, access)
    assert (who.subject, who.roles, who.groups) == ("tele-1", {"teleradiologist"}, {"night", "er"})
    key_file = auth.local_key_path(settings)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60
    refused = CliRunner().invoke(cli, ["token", "--role", "janitor"], env=env)
    assert refused.exit_code != 0 and "roles are" in refused.output


def test_local_tokens_from_another_data_dir_or_expired_are_refused(make_settings: Any, access: Any) -> None:
    mine, theirs = make_settings(AUTH_MODE="local"), make_settings(AUTH_MODE="local")
    foreign = mint_local_token(theirs, ["admin"])
    with pytest.raises(TokenRejected, match="signature"):
        identify(mine, bearer(foreign), None, access)
    expired = mint_local_token(mine, ["admin"], ttl_seconds=-100)
    with pytest.raises(TokenRejected, match="expired"):
        identify(mine, bearer(expired), None, access)
    assert identify(mine, bearer(mint_local_token(mine, ["admin"])), None, access).roles == {"admin"}


def test_the_local_key_is_made_once_even_by_racing_processes(make_settings: Any) -> None:
    settings = make_settings(AUTH_MODE="local")
    keys = []
    threads = [
        threading.Thread(target=lambda: keys.append(auth.local_signing_key(settings))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publics = {
        k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for k in keys
    }
    assert len(publics) == 1


def test_auth_none_gives_everyone_the_default_role(make_settings: Any, access: Any) -> None:
    settings = make_settings(DEFAULT_ROLE="referring")
    who = identify(settings, "Bearer whatever", "192.0.2.7", access)
    assert who.roles == {"referring"} and who.subject == "anonymous@192.0.2.7" and not who.authenticated
