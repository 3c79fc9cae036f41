"""The per-series precomputed metadata document: gzip of a JSON array of the instances' DICOM JSON
(BulkDataURIs tokenised), in the hot bucket at keys.series_metadata(). Core: no Flask.

Built from the index's metadata_gz values, never from the originals, and without recompressing
them: the document is a multi-member gzip (RFC 1952 2.2), "[" + instance + "," + instance ... + "]",
each instance's member exactly as indexed, so a rebuild per STOW costs a concatenation (0.5 ms for
300 instances, against ~20 ms to decompress and recompress). The first member's comment field
carries the instance count and newest created stamp it was built from (also in the object's
metadata), so a reader checks freshness with the one GET it needs anyway."""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime

import redis
from sqlalchemy import case, func, select

from gateway import keys
from gateway.connections import Connections
from gateway.errors import ObjectNotFound, StorageUnavailable
from gateway.index.db import session_scope
from gateway.index.models import Instance, Series
from gateway.uids import check_uid

log = logging.getLogger(__name__)

LEVEL = 6
_MAX_PASSES = 20


@dataclass(frozen=True)
class SeriesState:
    """What the index holds of a series: the document is current when it was built from the same."""

    count: int
    stamp: str

    @property
    def tag(self) -> str:
        return f"n={self.count};t={self.stamp}"


def _stamp(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value.replace(" ", "T")
    return value.isoformat()


def _lock_key(series_uid: str) -> str:
    return f"gw:lock:seriesdoc:{series_uid}"


def _dirty_key(series_uid: str) -> str:
    return f"gw:seriesdoc:dirty:{series_uid}"


def state(conn: Connections, study_uid: str, series_uid: str) -> SeriesState:
    """One aggregate query; count 0 when the series is unknown."""
    query = select(func.count(), func.max(Instance.created_at)).where(
        Instance.series_uid == check_uid(series_uid, "SeriesInstanceUID"),
        Instance.study_uid == check_uid(study_uid, "StudyInstanceUID"),
    )
    with session_scope(conn.sessions) as session:
        count, newest = session.execute(query).one()
    return SeriesState(int(count or 0), _stamp(newest))


def study_states(conn: Connections, study_uid: str) -> dict[str, SeriesState]:
    """Every series of a study with its state, in series order (one GROUP BY query)."""
    number = Series.series_number
    query = (
        select(Instance.series_uid, func.count(), func.max(Instance.created_at))
        .join(Series, Series.series_uid == Instance.series_uid)
        .where(Instance.study_uid == check_uid(study_uid, "StudyInstanceUID"))
        .group_by(Instance.series_uid, number)
        .order_by(case((number.is_(None), 1), else_=0), number, Instance.series_uid)
    )
    with session_scope(conn.sessions) as session:
        rows = session.execute(query).all()
    return {row[0]: SeriesState(int(row[1]), _stamp(row[2])) for row in rows}


_COMMA = gzip.compress(b",", mtime=0)
_CLOSE = gzip.compress(b"]", mtime=0)


def _assemble(conn: Connections, study_uid: str, series_uid: str) -> tuple[SeriesState, bytes]:
    """(state, document) read in one transaction, in Instance Number order."""
    query = (
        select(Instance.metadata_gz, Instance.created_at)
        .where(Instance.series_uid == series_uid, Instance.study_uid == study_uid)
        .order_by(
            case((Instance.instance_number.is_(None), 1), else_=0), Instance.instance_number, Instance.sop_uid
        )
    )
    with session_scope(conn.sessions) as session:
        rows = session.execute(query).all()
    newest = max((row.created_at for row in rows if row.created_at is not None), default=None)
    current = SeriesState(len(rows), _stamp(newest))
    members = [compress(b"[", current.tag)]
    for position, row in enumerate(rows):
        if position:
            members.append(_COMMA)
        members.append(bytes(row.metadata_gz))
    members.append(_CLOSE)
    return current, b"".join(members)


def decompress(document: bytes) -> bytes:
    """Every member of a (multi-member) gzip, joined; zlib per member is twice gzip.decompress's speed."""
    out: list[bytes] = []
    while document:
        decoder = zlib.decompressobj(31)
        out.append(decoder.decompress(document))
        if not decoder.eof:
            raise ValueError("truncated gzip member")
        document = decoder.unused_data
    return b"".join(out)


def compress(body: bytes, comment: str, level: int = LEVEL) -> bytes:
    """A gzip member (RFC 1952) whose FCOMMENT field holds `comment` (Latin-1, no NUL)."""
    encoder = zlib.compressobj(level, zlib.DEFLATED, -15)
    deflated = encoder.compress(body) + encoder.flush()
    header = b"\x1f\x8b\x08\x10\x00\x00\x00\x00\x00\xff" + comment.encode("latin-1") + b"\x00"
    return header + deflated + struct.pack("<II", zlib.crc32(body) & 0xFFFFFFFF, len(body) & 0xFFFFFFFF)


def comment_of(document: bytes) -> str | None:
    """The FCOMMENT of a gzip member, or None (RFC 1952 2.3.1: FEXTRA, FNAME come first)."""
    if len(document) < 10 or document[:3] != b"\x1f\x8b\x08":
        return None
    flags, position = document[3], 10
    if flags & 0x04:  # FEXTRA
        if len(document) < 12:
            return None
        position += 2 + struct.unpack("<H", document[10:12])[0]
    if flags & 0x08:  # FNAME
        position = document.find(b"\x00", position) + 1
        if position == 0:
            return None
    if not flags & 0x10:
        return None
    end = document.find(b"\x00", position)
    return None if end < 0 else document[position:end].decode("latin-1")


def _write(conn: Connections, study_uid: str, series_uid: str) -> bytes:
    current, document = _assemble(conn, study_uid, series_uid)
    key = keys.series_metadata(study_uid, series_uid)
    if current.count == 0:
        conn.hot.delete(key)
        return b""
    conn.hot.put_bytes(
        key, document, {"instances": str(current.count), "created": current.stamp, "built-from": "index"}
    )
    return document


def rebuild(conn: Connections, study_uid: str, series_uid: str) -> None:
    """Rewrite the series document from the index; STOW calls this after its rows are committed.

    Concurrent calls for one series coalesce: each marks the series dirty; whoever holds the
    per-series Redis lock rebuilds until no mark is left, so the last document written was read
    after the last commit. Without Redis the rebuild runs unlocked: load() heals any stale write.

    Raises:
        StorageUnavailable, IndexUnavailable: the hot bucket or the index failed.
    """
    _rebuild(conn, check_uid(study_uid, "StudyInstanceUID"), check_uid(series_uid, "SeriesInstanceUID"))


def _rebuild(conn: Connections, study_uid: str, series_uid: str) -> bytes | None:
    """The last document this call wrote, or None when another holder of the lock does the work."""
    written: bytes | None = None
    try:
        conn.redis.set(_dirty_key(series_uid), b"1", ex=600)
        lock = conn.redis.lock(_lock_key(series_uid), timeout=120, blocking=False)
        acquired = lock.acquire()
    except redis.RedisError as exc:
        log.warning("series metadata of %s rebuilt without lock: Redis %s", series_uid, type(exc).__name__)
        return _write(conn, study_uid, series_uid)
    while acquired:
        try:
            for _ in range(_MAX_PASSES):
                if not conn.redis.delete(_dirty_key(series_uid)):
                    break
                written = _write(conn, study_uid, series_uid)
        except redis.RedisError as exc:
            log.warning("series metadata of %s: Redis %s mid-rebuild", series_uid, type(exc).__name__)
            return _write(conn, study_uid, series_uid)
        finally:
            _release(lock, series_uid)
        # A mark set between our last check and the release found the lock taken: take it again.
        try:
            acquired = bool(conn.redis.exists(_dirty_key(series_uid))) and lock.acquire()
        except redis.RedisError:
            break
    return written


def _release(lock: redis.lock.Lock, series_uid: str) -> None:
    try:
        lock.release()
    except redis.RedisError:
        log.warning("series metadata lock of %s not released; it expires by itself", series_uid)


def load(conn: Connections, study_uid: str, series_uid: str, current: SeriesState | None = None) -> bytes:
    """The series document (gzip), rebuilt first when missing or built from another index state.

    Raises:
        ObjectNotFound: the index has no instance of this series in this study.
    """
    current = current or state(conn, study_uid, series_uid)
    if current.count == 0:
        raise ObjectNotFound(f"no series {series_uid} in study {study_uid}")
    key = keys.series_metadata(study_uid, series_uid)
    try:
        document = conn.hot.get_bytes(key)
    except ObjectNotFound:
        document = b""
    if document and comment_of(document) == current.tag:
        return document
    log.info("series metadata of %s is %s; rebuilding", series_uid, "stale" if document else "missing")
    try:
        written = _rebuild(conn, study_uid, series_uid)
    except StorageUnavailable as fault:  # still answer from the index; the document is only not kept
        log.warning("series metadata of %s not stored: %s", series_uid, fault.detail)
        written = None
    if written:
        return written
    # Another process holds the lock and is writing it: answer from the index now.
    state_now, document = _assemble(conn, study_uid, series_uid)
    if state_now.count == 0:
        raise ObjectNotFound(f"no series {series_uid} in study {study_uid}")
    return document
