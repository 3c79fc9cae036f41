"""One instance in: header, UID and study checks, the original with its SHA-256, then its index row.

Order matters: the object is written before its row, so the index never points at nothing; a fault
after the put leaves an orphan object that a retry (same bytes) or an index rebuild adopts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError

from gateway import diagnosis, keys
from gateway.connections import Connections
from gateway.dicomfile import read_header
from gateway.dicomjson import compress, instance_json
from gateway.errors import (
    DATA_SET_MISMATCH,
    DUPLICATE_SOP_INSTANCE,
    InstanceRejected,
    RedisUnavailable,
)
from gateway.index.db import session_scope
from gateway.index.records import InstanceFacts, find_instance, record_instance, record_versions, series_of
from gateway.jobs import enqueue_derive
from gateway.uids import InstanceRef, is_valid_uid

log = logging.getLogger(__name__)

_REQUIRED = (
    ("StudyInstanceUID", "Study Instance UID"),
    ("SeriesInstanceUID", "Series Instance UID"),
    ("SOPInstanceUID", "SOP Instance UID"),
    ("SOPClassUID", "SOP Class UID"),
)


@dataclass(frozen=True)
class Stored:
    ref: InstanceRef
    sop_class_uid: str
    duplicate: bool


def _uids(ds: Dataset) -> dict[str, str]:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    found: dict[str, str] = {}
    for keyword, name in _REQUIRED:
        value = str(ds.get(keyword, "") or "").strip("\x00 ")
        if not value:
            raise InstanceRejected(DATA_SET_MISMATCH, f"{name} ({keyword}) is missing", sop_class, sop_uid)
        if not is_valid_uid(value):
            raise InstanceRejected(
                DATA_SET_MISMATCH,
                f"{name} {value[:80]!r} is not a valid UID (PS3.5 9.1: digits and dots, at most 64)",
                sop_class,
                sop_uid,
            )
        found[keyword] = value
    media_sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip("\x00 ")
    if media_sop and media_sop != found["SOPInstanceUID"]:
        raise InstanceRejected(
            DATA_SET_MISMATCH,
            f"File Meta MediaStorageSOPInstanceUID {media_sop} differs from SOPInstanceUID",
            sop_class,
            sop_uid,
        )
    return found


def ingest(conn: Connections, path: str, sha256: str, size: int, expected_study: str | None) -> Stored:
    """Store one spooled Part 10 file.

    Raises:
        InstanceRejected: the instance itself is at fault (it is not stored, nothing of it remains).
        Unavailable: S3, Redis or the index failed (nothing half-written: at most an orphan original).
    """
    header, pixels = read_header(path)
    uids = _uids(header)
    ref = InstanceRef(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
    sop_class = uids["SOPClassUID"]
    if expected_study and ref.study_uid != expected_study:
        raise InstanceRejected(
            DATA_SET_MISMATCH,
            f"instance belongs to study {ref.study_uid}, not to {expected_study} named in the request",
            sop_class,
            ref.sop_uid,
        )
    try:
        lock = conn.redis.lock(f"gw:lock:sop:{ref.sop_uid}", timeout=3600, blocking_timeout=60)
        if not lock.acquire():
            raise RedisUnavailable(f"instance {ref.sop_uid} is being stored by another request; retry")
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: {type(exc).__name__}") from exc
    try:
        stored = _store_locked(conn, path, sha256, size, header, pixels, ref, sop_class)
        # Also on identical re-stores, so a retry heals a status update that an index fault interrupted.
        diagnosis.on_instance_stored(conn, ref.study_uid, sop_class, header)
        return stored
    finally:
        try:
            lock.release()
        except redis.RedisError:
            log.warning("could not release the store lock of %s; it expires by itself", ref.sop_uid)


def _store_locked(conn, path, sha256, size, header, pixels, ref, sop_class) -> Stored:  # type: ignore[no-untyped-def]
    with session_scope(conn.sessions) as session:
        existing = find_instance(session, ref.sop_uid)
        if existing is not None:
            if existing.sha256 != sha256:
                raise InstanceRejected(
                    DUPLICATE_SOP_INSTANCE,
                    f"SOP Instance UID {ref.sop_uid} is already stored with different content "
                    f"(sha256 {existing.sha256[:12]}...); refusing to overwrite it",
                    sop_class,
                    ref.sop_uid,
                )
            if conn.originals.head(keys.original(ref)) is None:  # object lost: put it back, same bytes
                conn.originals.put_file(keys.original(ref), path, sha256, {"transfer-syntax": _ts(header)})
            return Stored(ref, sop_class, duplicate=True)
        series = series_of(session, ref.series_uid)
        if series is not None and series.study_uid != ref.study_uid:
            raise InstanceRejected(
                DATA_SET_MISMATCH,
                f"series {ref.series_uid} already belongs to study {series.study_uid}",
                sop_class,
                ref.sop_uid,
            )
    document = instance_json(header, ref, pixels)
    facts = InstanceFacts(
        study_uid=ref.study_uid,
        series_uid=ref.series_uid,
        sop_uid=ref.sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=_ts(header),
        size=size,
        sha256=sha256,
        metadata_gz=compress(document),
        pixel_layout=pixels.to_json() if pixels else None,
        dataset_json=document,
    )
    rules = conn.rules.versions
    derived = [v.id for v in rules.derived]
    wanted, why_not = rules.gets_versions(sop_class, facts.transfer_syntax_uid, pixels is not None)
    conn.originals.put_file(keys.original(ref), path, sha256, {"transfer-syntax": facts.transfer_syntax_uid})
    try:
        with session_scope(conn.sessions) as session:
            record_instance(session, facts)
            record_versions(
                session,
                ref.study_uid,
                ref.sop_uid,
                derived,
                "pending" if wanted else "skipped",
                None if wanted else why_not,
            )
    except IntegrityError as exc:  # only possible if the lock expired mid-store
        raise InstanceRejected(
            DUPLICATE_SOP_INSTANCE,
            f"SOP Instance UID {ref.sop_uid} was stored concurrently",
            sop_class,
            ref.sop_uid,
        ) from exc
    log.info("stored %s (%d bytes)", ref.sop_uid, size)
    if wanted:
        try:
            enqueue_derive(conn.redis, ref)
        except RedisUnavailable as fault:  # the rows stay pending: the reconciler queues them again
            log.warning("derive of %s not queued: %s", ref.sop_uid, fault.detail)
    return Stored(ref, sop_class, duplicate=False)


def _ts(header: Dataset) -> str:
    return str(header.file_meta.TransferSyntaxUID)
