"""Gateway parts the bench runs in its own process: an RQ worker for derive jobs, the policy engine, the
mover. Their log lines go to a file of the run's log folder, never over the table."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.servers import Server


class Local(Server):
    """This process, as a `Server` for cell(): its CPU counts, it is always alive."""

    def __init__(self, name: str = "ours (in-process)") -> None:
        super().__init__(name)

    def pids(self) -> list[int]:
        return [os.getpid()]

    def alive(self) -> bool:
        return True


def quiet_logs(settings: Any, path: Path) -> None:
    """Send the gateway's JSON log lines (and RQ's, werkzeug's, moto's) to `path` from now on."""
    from gateway import logs

    logs.configure(settings)  # once per process; what create_app and the workers do
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
            sys.stderr,
            sys.stdout,
        ):
            root.removeHandler(handler)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logs.JsonFormatter())
        handler.addFilter(logs.ContextFilter())
        root.addHandler(handler)
    for name in ("werkzeug", "rq", "botocore", "boto3", "urllib3", "moto"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.handlers.clear()
        logger.propagate = True


def derive_queued(conn: Any) -> tuple[int, float]:
    """Work the derive queue off with one in-process worker (as `workers` does, one job per instance as
    gateway/jobs.py queues them): (jobs, seconds)."""
    from rq import Queue, SimpleWorker

    from gateway.jobs import DERIVE_QUEUE
    from workers import context

    context.configure(conn.settings, conn)
    queue = Queue(DERIVE_QUEUE, connection=conn.redis)
    jobs = queue.count
    started = time.perf_counter()
    SimpleWorker([queue], connection=conn.redis).work(burst=True, logging_level="WARNING")
    return jobs, time.perf_counter() - started
