"""Enqueue helpers. Worker functions are named by dotted path, so the gateway never imports workers."""

from __future__ import annotations

import logging
from typing import Any

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
LIFECYCLE_RUN = "workers.lifecycle.run_job"
PREFETCH = "workers.prefetch.prefetch_job"
# A failed derive is retried three times (a transient S3 fault heals); after that it stays in RQ's
# failed-job registry for a month and the version rows say why.
RETRY = Retry(max=3, interval=[5, 30, 120])
WEEK = 7 * 24 * 3600
MONTH = 30 * 24 * 3600


def job_id(kind: str, uid: str) -> str:
    """Job ids name their subject in the characters RQ allows: dots become dashes."""
    return f"{kind}-{uid.replace('.', '-')}"


def _enqueue(connection: redis.Redis, queue: str, function: str, what: str, **options: Any) -> bool:
    """Queue a job unless one with its id is already queued (RQ's unique jobs); False when it was.

    Raises:
        RedisUnavailable: Redis did not answer.
    """
    try:
        Queue(queue, connection=connection).enqueue_call(function, unique=True, **options)
    except DuplicateJobError:
        return False
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: could not queue {what}: {exc}") from exc
    return True


def enqueue_derive(connection: redis.Redis, ref: InstanceRef) -> bool:
    """The derive job of one instance; when Redis fails its version rows stay pending and the
    reconciler queues them again."""
    return _enqueue(
        connection, DERIVE_QUEUE, DERIVE, f"the derive job of {ref.sop_uid}",
        args=(ref.study_uid, ref.series_uid, ref.sop_uid), job_id=job_id("derive", ref.sop_uid),
        timeout=3600, retry=RETRY, failure_ttl=MONTH, result_ttl=3600,
    )  # fmt: skip


def enqueue_series_refresh(connection: redis.Redis, study_uid: str, series_uid: str) -> bool:
    """One rebuild of a series' metadata document, shared by every request storing into it meanwhile.
    A reader never waits for it: seriesdoc.load rebuilds a document the index has outrun."""
    return _enqueue(
        connection, DEFAULT_QUEUE, SERIES_DOCUMENT, f"the metadata refresh of {series_uid}",
        args=(study_uid, series_uid), job_id=job_id("seriesdoc", series_uid), timeout=600,
        failure_ttl=MONTH, result_ttl=60,
    )  # fmt: skip


def enqueue_prefetch(connection: redis.Redis, study_uid: str, priors: int | None = None) -> bool:
    """The prefetch job of a study (restores, then copies back hot)."""
    return _enqueue(
        connection, DEFAULT_QUEUE, PREFETCH, f"the prefetch of {study_uid}", args=(study_uid, priors),
        job_id=job_id("prefetch", study_uid), timeout=3600, result_ttl=0, failure_ttl=WEEK,
    )  # fmt: skip


def enqueue_lifecycle_run(connection: redis.Redis) -> bool:
    """One mover run unless one is queued already."""
    return _enqueue(
        connection, DEFAULT_QUEUE, LIFECYCLE_RUN, "the mover", job_id="lifecycle-run", timeout=6 * 3600,
        result_ttl=0, failure_ttl=WEEK,
    )  # fmt: skip
