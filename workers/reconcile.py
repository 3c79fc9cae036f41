"""Re-queues derive jobs for versions still pending in the index, so work survives the loss of Redis
(DESIGN.md "Queues": the index holds each version's state; Redis only the queue)."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from gateway.connections import Connections
from gateway.errors import GatewayError
from gateway.index.db import session_scope
from gateway.index.models import Instance, Version
from gateway.jobs import enqueue_derive
from gateway.uids import InstanceRef

log = logging.getLogger(__name__)


def requeue_pending(
    conn: Connections, older_than: timedelta = timedelta(minutes=5), limit: int = 1000
) -> int:
    """Queue again every instance with a version pending for longer than `older_than`; returns how many."""
    cutoff = datetime.now(UTC) - older_than
    with session_scope(conn.sessions) as session:
        rows = session.execute(
            select(Instance.study_uid, Instance.series_uid, Instance.sop_uid)
            .join(Version, Version.sop_uid == Instance.sop_uid)
            .where(Version.state == "pending", Version.updated_at <= cutoff)
            .distinct()
            .limit(limit)
        ).all()
    queued = 0
    for study_uid, series_uid, sop_uid in rows:
        if enqueue_derive(conn.redis, InstanceRef(study_uid, series_uid, sop_uid)):
            queued += 1
    if queued:
        log.info("re-queued %d derive jobs left pending", queued)
    return queued


def start_background(conn: Connections, every_seconds: float = 60.0) -> threading.Event:
    """Run requeue_pending every so often in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_seconds):
            try:
                requeue_pending(conn)
            except GatewayError as error:
                log.warning("reconciler pass failed: %s", error.detail)

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
    return stop
