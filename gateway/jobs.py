"""Enqueue helpers. Worker functions are named by dotted path, so the gateway never imports workers."""

from __future__ import annotations

import logging

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError

from gateway.errors import RedisUnavailable
from gateway.uids import InstanceRef

log = logging.getLogger(__name__)

DERIVE_QUEUE = "derive"
DEFAULT_QUEUE = "default"
DERIVE = "workers.derive.derive_instance"
SERIES_DOCUMENT = "workers.seriesdoc.refresh_series"
# A failed derive is retried three times (a transient S3 fault heals); after that it stays in RQ's
# failed-job registry for a month and the version rows say why.
RETRY = Retry(max=3, interval=[5, 30, 120])
MONTH = 30 * 24 * 3600


def job_id(kind: str, uid: str) -> str:
    """Job ids name their subject in the characters RQ allows: dots become dashes."""
    return f"{kind}-{uid.replace('.', '-')}"


def enqueue_derive(connection: redis.Redis, ref: InstanceRef) -> bool:
    """Queue the derive job of one instance; a job already queued for it is not queued twice.

    Raises:
        RedisUnavailable: Redis did not answer (the version rows stay pending; the reconciler re-queues).
    """
    queue = Queue(DERIVE_QUEUE, connection=connection)
    try:
        queue.enqueue_call(
            DERIVE,
            args=(ref.study_uid, ref.series_uid, ref.sop_uid),
            job_id=job_id("derive", ref.sop_uid),
            timeout=3600,
            retry=RETRY,
            failure_ttl=MONTH,
            result_ttl=3600,
            unique=True,
        )
    except DuplicateJobError:
        return False
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: could not queue the derive job of {ref.sop_uid}: {exc}") from exc
    return True


def enqueue_series_refresh(connection: redis.Redis, study_uid: str, series_uid: str) -> bool:
    """Queue one rebuild of a series' metadata document; requests storing into the series meanwhile
    share it. A reader never waits for it: seriesdoc.load rebuilds a document the index has outrun.

    Raises:
        RedisUnavailable: Redis did not answer.
    """
    queue = Queue(DEFAULT_QUEUE, connection=connection)
    try:
        queue.enqueue_call(
            SERIES_DOCUMENT,
            args=(study_uid, series_uid),
            job_id=job_id("seriesdoc", series_uid),
            timeout=600,
            failure_ttl=MONTH,
            result_ttl=60,
            unique=True,
        )
    except DuplicateJobError:
        return False
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: could not queue the metadata refresh of {series_uid}: {exc}") from exc
    return True
