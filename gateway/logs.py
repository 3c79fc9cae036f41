"""Logging: JSON lines on stderr with request or job id; audit records on the gateway.audit logger."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from gateway.settings import Settings

_configured = False
audit_log = logging.getLogger("gateway.audit")


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
    """Adds the Flask request id when there is a request, else nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            from flask import g, has_request_context

            if has_request_context() and "request_id" in g:
                record.request_id = g.request_id
        except ImportError:  # workers run without Flask
            pass
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
    _configured = True


def audit(action: str, who: str, role: str, **what: Any) -> None:
    """One structured audit record: UIDs and ids only, never patient data."""
    audit_log.info(
        "%s by %s", action, who, extra={"audit": {"action": action, "who": who, "role": role, **what}}
    )
