"""/healthz (process up) and /readyz (index, Redis and buckets answer)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from gateway.errors import GatewayError
from gateway.http import services

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
