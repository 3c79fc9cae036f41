"""CORS on every response, errors included, so viewers on another origin can call the gateway."""

from __future__ import annotations

from flask import Flask, Response, request

EXPOSED = (
    "X-Served-Version, X-Policy-Reason, X-Served-Resolution, Content-Range, Content-Length, Warning, "
    "Location, ETag, WWW-Authenticate, Retry-After, Accept-Ranges"
)
ALLOWED_HEADERS = (
    "Authorization, Accept, Content-Type, Range, If-None-Match, If-Modified-Since, "
    "Downlink, RTT, ECT, Save-Data, Device-Memory, Viewport-Width, DPR"
)
METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"


def install(app: Flask, origins: str) -> None:
    allowed = {o.strip() for o in origins.split(",") if o.strip()}

    @app.before_request
    def _preflight() -> Response | None:
        if request.method == "OPTIONS":
            return app.response_class(status=204)
        return None

    @app.after_request
    def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if "*" in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin or "*"
        elif origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
        if origin:
            response.headers.add("Vary", "Origin")
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = EXPOSED
        response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        return response
