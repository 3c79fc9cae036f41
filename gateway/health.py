"""/healthz (process up) and /readyz (index, Redis and buckets answer)."""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, g, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from gateway.errors import GatewayError
from gateway.http import services
from gateway.metrics import REQUEST_SECONDS, REQUESTS, exposition

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz() -> ResponseReturnValue:
    conn = services()
    checks: dict[str, str] = {}
    try:
        with conn.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["index"] = "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure
        checks["index"] = f"failed: {type(exc).__name__}"
    try:
        conn.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"failed: {type(exc).__name__}"
    try:
        conn.originals.head("healthz-probe")
        checks["storage"] = "ok"
    except GatewayError as exc:
        checks["storage"] = f"failed: {exc.detail}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify(status="ready" if ready else "not ready", checks=checks), 200 if ready else 503


@blueprint.get("/metrics")
def metrics() -> ResponseReturnValue:
    body, content_type = exposition()
    return Response(body, mimetype=content_type.split(";")[0], headers={"Content-Type": content_type})


def install_request_metrics(app: Flask) -> None:
    """Count and time every request by endpoint name (a closed set), never by path."""

    @app.before_request
    def _start() -> None:
        g.metrics_start = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unmatched"
        REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
        if "metrics_start" in g:
            REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - g.metrics_start)
        return response
