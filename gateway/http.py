"""Blueprint helpers shared by every HTTP module: connections, identity, permissions, URLs, errors."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, abort, current_app, g, json, request

from gateway import clienthints, logs
from gateway.auth import Identity, identify
from gateway.clienthints import ClientProfile
from gateway.connections import Connections
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidParameter,
    PolicyNotAcceptable,
    PolicyUnavailable,
    Unauthorized,
)
from gateway.settings import Settings
from policies.permissions import Action

log = logging.getLogger(__name__)
DICOMWEB = "/dicomweb"
MAX_FRAMES_PER_REQUEST = 10000
_FRAME_LIST = re.compile(r"^\s*[0-9]+\s*(,\s*[0-9]+\s*)*$")


def parse_frame_list(text: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5] in the order asked (PS3.18 8.3.4: frame numbers start at 1).

    Raises:
        InvalidParameter: not a comma-separated list of positive integers.
    """
    if not _FRAME_LIST.match(text or ""):
        raise InvalidParameter(
            f"frame list {text[:100]!r} is not comma-separated frame numbers", parameter="frames"
        )
    numbers = [int(item) for item in text.split(",")]
    if any(number < 1 for number in numbers):
        raise InvalidParameter("frame numbers start at 1", parameter="frames")
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise InvalidParameter(f"at most {MAX_FRAMES_PER_REQUEST} frames per request", parameter="frames")
    return numbers


def services() -> Connections:
    return current_app.extensions["gateway"]


def settings() -> Settings:
    return services().settings


def identity() -> Identity:
    """The caller, once per request. A rejected token ends the request here: 401 with the
    WWW-Authenticate challenge of RFC 6750 3 beside the problem body."""
    if "identity" not in g:
        conn = services()
        try:
            g.identity = identify(
                conn.settings, request.headers.get("Authorization"), request.remote_addr, conn.rules.access
            )
        except Unauthorized as error:
            response = problem(error)
            response.headers["WWW-Authenticate"] = getattr(error, "challenge", 'Bearer realm="dicomweb"')
            abort(response)
    return g.identity


def client_profile() -> ClientProfile:
    """What the policy engine knows of this request's client (hints, location, measured throughput)."""
    if "client_profile" not in g:
        g.client_profile = clienthints.profile_for(
            services(), identity(), request.headers, request.remote_addr
        )
    return g.client_profile


def metered(response: Response) -> Response:
    """Let a retrieve's body feed the client's measured throughput as it streams."""
    if "client_profile" in g and response.is_streamed:
        response.response = clienthints.metered(response.response, services().redis, g.client_profile)
    return response


def authorize(action: Action) -> Identity:
    """The one permission check every route makes, against access.yaml's roles (403 with the reason)."""
    who = identity()
    rules = services().rules.access
    if not rules.may(who.roles, action):
        if not who.roles:
            raise Forbidden(f"the token carries no role this gateway knows, so it may not {action.value}")
        able = ", ".join(name for name, role in rules.roles.items() if action in role.may) or "no role"
        names = ", ".join(sorted(who.roles))
        raise Forbidden(f"role {names} may not {action.value} (roles that may: {able})")
    return who


def public_root() -> str:
    """External root (scheme://host[/prefix]) from PUBLIC_URL, Forwarded / X-Forwarded-*, else the request."""
    configured = settings().public_url
    if configured:
        return configured
    proto = host = None
    prefix = request.headers.get("X-Forwarded-Prefix", "").rstrip("/")
    forwarded = request.headers.get("Forwarded")
    if forwarded:
        first = forwarded.split(",")[0]
        for pair in first.split(";"):
            name, _, value = pair.strip().partition("=")
            value = value.strip('"')
            if name.lower() == "proto":
                proto = value
            elif name.lower() == "host":
                host = value
    proto = proto or request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or request.scheme
    host = host or request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return f"{proto}://{host}{prefix}"


def dicomweb_root() -> str:
    return public_root() + DICOMWEB


def problem(error: GatewayError) -> Response:
    body: dict[str, Any] = {
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        **error.extra,
    }
    response = current_app.response_class(
        json.dumps(body), status=error.status, mimetype="application/problem+json"
    )
    if isinstance(error, Forbidden | PolicyNotAcceptable | PolicyUnavailable):
        # Every refusal of a retrieve says why, in the header as in the body (one line of ASCII).
        reason = "".join(c if 32 <= ord(c) < 127 else " " for c in error.detail)
        response.headers["X-Policy-Reason"] = reason[:600]
    if error.status == 503:
        response.headers["Retry-After"] = "5"
    return response


def install_error_handlers(app: Flask) -> None:
    @app.before_request
    def _request_id() -> None:
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        logs.request_id.set(g.request_id)

    @app.teardown_request
    def _forget_request_id(_error: BaseException | None) -> None:
        logs.request_id.set(None)

    @app.errorhandler(GatewayError)
    def _gateway_error(error: GatewayError) -> Response:
        if error.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, error.detail)
        return problem(error)

    @app.errorhandler(404)
    def _not_found(_error: Exception) -> Response:
        from gateway.errors import NotFound

        return problem(NotFound(f"no resource at {request.path}"))

    @app.errorhandler(405)
    def _method(_error: Exception) -> Response:
        from gateway.errors import GatewayError as Base

        class MethodNotAllowed(Base):
            status = 405
            title = "Method not allowed"

        return problem(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        from werkzeug.exceptions import HTTPException

        if isinstance(error, HTTPException):
            return error  # type: ignore[return-value]
        request_id = g.get("request_id", "-")
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path, request_id)
        body = {
            "title": "Internal error",
            "status": 500,
            "detail": f"request {request_id} failed; see the log",
        }
        return current_app.response_class(json.dumps(body), status=500, mimetype="application/problem+json")
