"""Logging: JSON lines on stderr with request or job id; audit records on the gateway.audit logger."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from gateway.settings import Settings

_configured = False
audit_log = logging.getLogger("gateway.audit")
# Set by the HTTP layer per request and by the worker per job; read by every log record.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for extra in ("request_id", "job_id", "audit"):
            value = getattr(record, extra, None)
            if value is not None:
                entry[extra] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ContextFilter(logging.Filter):
    """Adds the current request or job id, so one request's records can be found together."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (value := request_id.get()) is not None:
            record.request_id = value
        if (value := job_id.get()) is not None:
            record.job_id = value
        return True


def configure(settings: Settings, level: int = logging.INFO) -> None:
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _configured = True


def audit(action: str, who: str, role: str, **what: Any) -> None:
    """One structured audit record: UIDs and ids only, never patient data."""
    audit_log.info(
        "%s by %s", action, who, extra={"audit": {"action": action, "who": who, "role": role, **what}}
    )
