"""Removing a study, series or instance everywhere: the original, every version, every tier's copy
(each storage class, restore markers included), the hot series metadata documents, the study record,
and the index rows. Core: no Flask (gateway/delete.py is the HTTP face).

Rows go first, objects after, so a fault midway never leaves an index row without its object; what a
fault leaves behind are objects without rows, which a repeated delete finds by listing the buckets
(idempotent: the objects are found by prefix, not through the index)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis
from sqlalchemy import delete, func, select

from gateway import keys, tiers
from gateway.connections import Connections
from gateway.diagnosis import status_key
from gateway.errors import RedisUnavailable
from gateway.index.db import session_scope
from gateway.index.models import DiagnosisEvent, Instance, Location, Series, Study, Version
from gateway.uids import InstanceRef, check_uid

log = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 30


@dataclass
class Purged:
    instances: int = 0
    objects: int = 0
    series: list[str] = field(default_factory=list)
    study_gone: bool = False

    @property
    def anything(self) -> bool:
        return bool(self.instances or self.objects)


def _prefixes(study_uid: str, series_uid: str | None, sop_uid: str | None) -> list[str]:
    if sop_uid is not None:
        assert series_uid is not None
        ref = InstanceRef(study_uid, series_uid, sop_uid)
        return [keys.original(ref), keys.instance_prefix(ref)]
    if series_uid is not None:
        return [keys.series_prefix(study_uid, series_uid)]
    return [keys.study_prefix(study_uid)]


def _objects(conn: Connections, prefixes: list[str]) -> list[tuple[str, str, str]]:
    """(tier, storage class, key) of every object under the prefixes, in every tier and class."""
    found: list[tuple[str, str, str]] = []
    for tier in tiers.TIERS:
        for prefix in prefixes:
            for key, storage_class, _size in tiers.list_copies(conn, tier, prefix):
                exact = prefix.endswith("/") or key == prefix
                if exact:
                    found.append((tier, storage_class, key))
    return found


def _delete_rows(conn: Connections, study_uid: str, series_uid: str | None, sop_uid: str | None) -> Purged:
    purged = Purged()
    with session_scope(conn.sessions) as session:
        scope = select(Instance.sop_uid).where(Instance.study_uid == study_uid)
        if series_uid is not None:
            scope = scope.where(Instance.series_uid == series_uid)
        if sop_uid is not None:
            scope = scope.where(Instance.sop_uid == sop_uid)
        sops = list(session.execute(scope).scalars())
        touched = set(
            session.execute(
                select(Instance.series_uid).where(Instance.sop_uid.in_(sops)).distinct()
            ).scalars()
        )
        if series_uid is not None and session.get(Series, series_uid) is not None:
            touched.add(series_uid)
        for start in range(0, len(sops), 500):
            chunk = sops[start : start + 500]
            session.execute(delete(Location).where(Location.sop_uid.in_(chunk)))
            session.execute(delete(Version).where(Version.sop_uid.in_(chunk)))
            session.execute(delete(Instance).where(Instance.sop_uid.in_(chunk)))
        for uid in touched:
            left = session.execute(select(func.count()).where(Instance.series_uid == uid)).scalar_one()
            if not left:
                session.execute(delete(Series).where(Series.series_uid == uid))
        remaining = session.execute(select(func.count()).where(Series.study_uid == study_uid)).scalar_one()
        study = session.get(Study, study_uid)
        if study is not None and not remaining:
            session.execute(delete(DiagnosisEvent).where(DiagnosisEvent.study_uid == study_uid))
            session.execute(delete(Study).where(Study.study_uid == study_uid))
            purged.study_gone = True
        purged.instances = len(sops)
        purged.series = sorted(touched)
    return purged


def purge(
    conn: Connections, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> Purged:
    """Remove everything of the resource. Idempotent; `anything` is False once it is all gone.

    Raises:
        InvalidUID: a UID is malformed. StorageUnavailable / IndexUnavailable / RedisUnavailable: a
        fault (what is left is found again by the next call).
    """
    check_uid(study_uid, "StudyInstanceUID")
    if series_uid is not None:
        check_uid(series_uid, "SeriesInstanceUID")
    if sop_uid is not None:
        check_uid(sop_uid, "SOPInstanceUID")
    purged = _delete_rows(conn, study_uid, series_uid, sop_uid)
    prefixes = _prefixes(study_uid, series_uid, sop_uid)
    if purged.study_gone and series_uid is not None:
        prefixes.append(keys.study_record(study_uid))
    objects = _objects(conn, prefixes)
    for tier, storage_class, key in objects:
        _delete_locked(conn, tier, storage_class, key)
    purged.objects = len(objects)
    if sop_uid is not None and purged.instances:
        for uid in purged.series:  # the series document no longer matches the series
            conn.hot.delete(keys.series_metadata(study_uid, uid))
    if purged.study_gone:
        _forget_in_redis(conn, study_uid)
    if purged.anything:
        log.info(
            "deleted %d instances and %d objects of %s", purged.instances, purged.objects,
            sop_uid or series_uid or study_uid,
        )  # fmt: skip
    return purged


def _delete_locked(conn: Connections, tier: str, storage_class: str, key: str) -> None:
    """Wait for a mover or prefetch working on the object (its lock) so none re-creates a copy after."""
    if tiers.parse_key(key) is None:
        tiers.delete_copy(conn, key, tier, storage_class)
        return
    try:
        lock = conn.redis.lock(tiers.object_lock_key(key), timeout=LOCK_WAIT_SECONDS * 2)
        if not lock.acquire(blocking=True, blocking_timeout=LOCK_WAIT_SECONDS):
            raise RedisUnavailable(f"{key} is being moved; retry the delete")
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: {type(exc).__name__} while deleting {key}") from exc
    try:
        tiers.delete_copy(conn, key, tier, storage_class)
    finally:
        try:
            lock.release()
        except redis.RedisError:
            log.warning("lock of %s not released; it expires by itself", key)


def _forget_in_redis(conn: Connections, study_uid: str) -> None:
    try:
        conn.redis.delete(status_key(study_uid), tiers.prefetch_key(study_uid))
        conn.redis.srem(tiers.PREFETCH_ACTIVE, study_uid)
    except redis.RedisError as exc:  # only caches: the index no longer has the study
        log.warning("Redis state of deleted study %s not cleared: %s", study_uid, exc)
