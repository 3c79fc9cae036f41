"""`python -m workers`: one RQ worker on the derive and default queues, with the gateway's settings."""

from __future__ import annotations

import logging

import redis
from rq import Worker

from gateway.logs import configure as configure_logs
from workers import context, lifecycle, reconcile

QUEUES = ("derive", "default")
log = logging.getLogger(__name__)


def run(burst: bool = False) -> bool:
    """Work until stopped (SIGINT/SIGTERM: RQ's warm shutdown finishes the current job first)."""
    settings = context.settings()
    configure_logs(settings)
    context.connections().engine  # noqa: B018 - migrate (and fail fast) here, not in a job's work horse
    # A client of its own, without the socket timeout of Connections.redis: RQ blocks on BLMOVE/BLPOP for
    # minutes between jobs. redis-py's from_url understands redis://, rediss:// and unix:// URLs.
    connection = redis.Redis.from_url(settings.redis_url)
    worker = Worker(list(QUEUES), connection=connection)
    stop_reconciler = None if burst else reconcile.start_background(context.connections())
    stop_mover = None if burst else lifecycle.start_background(context.connections())
    log.info("worker %s listening on %s", worker.name, ", ".join(QUEUES))
    try:
        # The scheduler moves retries with an interval (gateway.jobs.RETRY) back onto their queue.
        return worker.work(burst=burst, logging_level="INFO", with_scheduler=True)
    finally:
        for stop in (stop_reconciler, stop_mover):
            if stop is not None:
                stop.set()
        connection.close()
        context.reset()


if __name__ == "__main__":
    import sys

    run(burst="--burst" in sys.argv[1:])  # --burst: work off the queues, then exit
