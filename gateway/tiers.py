"""Where each object lives (the locations table) and reading it wherever it is: its home bucket, the
cold bucket in an instant-retrieval class (served at once), or an archive class (a restore starts and
OriginalArchived is raised, so WADO serves the lossless version meanwhile). Core: no Flask.

An object without any location row is in its home bucket (originals for an original, hot for a
version) in STANDARD: rows appear when ingest, derive, the mover or a rebuild records them.

The buckets and classes themselves (copies, checksums, restores, the local backend's class folders)
are gateway/storageclass.py's; its functions are re-exported here so callers see one module."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import redis
from cachetools import TTLCache
from sqlalchemy import event, select
from sqlalchemy.orm import ORMExecuteState, Session

from gateway import jobs, keys
from gateway.connections import Connections
from gateway.errors import (
    GatewayError,
    ObjectNotFound,
    RedisUnavailable,
    RulesError,
    Unavailable,
)
from gateway.index.db import session_scope
from gateway.index.models import Location
from gateway.storage import Bucket, ObjectInfo
from gateway.storageclass import (
    TIERS,
    RestoreStatus,
    aware,
    checksum,
    copy_object,
    delete_copy,
    exists,
    head,
    ingested_at,
    last_modified,
    list_copies,
    local_classes,
    now,
    request_restore,
    restore_status,
    storage_class_of,
    store,
    tier_bucket,
)
from gateway.uids import InstanceRef, is_valid_uid
from policies.lifecycle import ARCHIVE, CLASSES, LifecycleRules, load_lifecycle

log = logging.getLogger(__name__)

__all__ = [  # re-exported from gateway.storageclass
    "TIERS", "RestoreStatus", "aware", "checksum", "copy_object", "delete_copy", "exists", "head",
    "ingested_at", "last_modified", "list_copies", "local_classes", "now", "request_restore",
    "restore_status", "storage_class_of", "store", "tier_bucket",
]  # fmt: skip

ORIGINAL = "original"
VERSION = "version"
HOME = {ORIGINAL: "originals", VERSION: "hot"}

LIFECYCLE_QUEUE = jobs.DEFAULT_QUEUE

_KEY = re.compile(
    r"^studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)"
    r"(?:\.dcm|/(?P<version>[A-Za-z0-9_-]+)\.dcm)$"
)


class ObjectArchived(Unavailable):
    """The object's only copies are in an archive class: a restore is under way (or could not start)."""

    title = "Object archived"

    def __init__(self, key: str, storage_class: str, restore_started: bool) -> None:
        what = "a restore is under way" if restore_started else "a restore could not be started"
        super().__init__(
            f"{key} is archived in {storage_class}; {what}",
            storage_class=storage_class,
            restore="started" if restore_started else "not started",
        )
        self.key = key
        self.storage_class = storage_class
        self.restore_started = restore_started


class OriginalArchived(ObjectArchived):
    """Raised by reads of an archived original; WADO catches it and serves the lossless version."""

    title = "Original archived"


@dataclass(frozen=True)
class ObjectKey:
    """What a key in the bucket layout names: an original (version_id None) or a version of an instance."""

    ref: InstanceRef
    version_id: str | None

    @property
    def kind(self) -> str:
        return ORIGINAL if self.version_id is None else VERSION

    @property
    def key(self) -> str:
        return keys.original(self.ref) if self.version_id is None else keys.version(self.ref, self.version_id)

    @property
    def home(self) -> str:
        return HOME[self.kind]


def parse_key(key: str) -> ObjectKey | None:
    """The object a key names, or None for anything else (thumbnails, reduced levels, study.json...)."""
    match = _KEY.match(key)
    if match is None:
        return None
    ref = InstanceRef(match["study"], match["series"], match["sop"])
    if not all(is_valid_uid(u) for u in (ref.study_uid, ref.series_uid, ref.sop_uid)):
        return None
    return ObjectKey(ref, match["version"])


# --- the lifecycle rules in force ---------------------------------------------------------------------------

_rules_cache: dict[Path, tuple[float, LifecycleRules]] = {}


def lifecycle_rules(conn: Connections, path: Path | None = None) -> LifecycleRules:
    """lifecycle.yaml (or `path`), reloaded when it changes; a bad edit keeps the last good rules.

    Raises:
        RulesError: the file is bad and no good version was loaded before.
    """
    path = path or conn.settings.policies_dir / "lifecycle.yaml"
    try:
        stamp = path.stat().st_mtime
    except OSError as exc:
        raise RulesError(f"{path}: line 1: cannot read the file ({exc.strerror})") from exc
    cached = _rules_cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        rules = load_lifecycle(path, conn.rules.versions)
    except RulesError:
        if cached is None:
            raise
        log.warning("%s is refused; the last good lifecycle rules stay in force", path)
        return cached[1]
    _rules_cache[path] = (stamp, rules)
    return rules


# --- the locations table ------------------------------------------------------------------------------------


def rows_of(session: Session, obj: ObjectKey) -> list[Location]:
    query = select(Location).where(Location.sop_uid == obj.ref.sop_uid, Location.kind == obj.kind)
    if obj.version_id is None:
        query = query.where(Location.version_id.is_(None))
    else:
        query = query.where(Location.version_id == obj.version_id)
    return list(session.execute(query).scalars())


def record_copy(
    session: Session,
    obj: ObjectKey,
    tier: str,
    bucket: str,
    storage_class: str,
    size: int,
    sha256: str,
    since: datetime | None = None,
    verified: bool = True,
) -> Location:
    """Insert or update the row of one copy (one per tier and key); the copy is there and, when
    `verified`, its SHA-256 was checked against the recorded one."""
    row = session.execute(
        select(Location).where(Location.tier == tier, Location.key == obj.key)
    ).scalar_one_or_none()
    stamp = now()
    if row is None:
        row = Location(
            sop_uid=obj.ref.sop_uid,
            study_uid=obj.ref.study_uid,
            kind=obj.kind,
            version_id=obj.version_id,
            tier=tier,
            key=obj.key,
            since=since or stamp,
        )
        session.add(row)
    elif row.storage_class != storage_class:
        row.since = since or stamp
    row.bucket = bucket
    row.storage_class = storage_class
    row.size = size
    row.sha256 = sha256
    row.state = "ok"
    if verified:
        row.verified_at = stamp
    if storage_class not in ARCHIVE:
        row.restore_state = row.restore_requested_at = row.restore_expires_at = None
    session.flush()
    return row


def record_stored_original(session: Session, ref: InstanceRef, bucket: str, size: int, sha256: str) -> None:
    """For ingest: the original is in the originals bucket (call in the transaction of its instance row)."""
    record_copy(session, ObjectKey(ref, None), "originals", bucket, "STANDARD", size, sha256)


def record_stored_version(
    session: Session, ref: InstanceRef, version_id: str, bucket: str, size: int, sha256: str
) -> None:
    """For derive: a version is in the hot bucket (call where its row becomes ready)."""
    record_copy(session, ObjectKey(ref, version_id), "hot", bucket, "STANDARD", size, sha256)


def readable_rows(rows: Iterable[Location], home: str) -> list[Location]:
    """Usable copies, best first: instant classes (the home tier first, warmer classes first), then
    archive copies."""
    usable = [r for r in rows if r.state == "ok"]
    return sorted(
        usable,
        key=lambda r: (r.storage_class in ARCHIVE, r.tier != home, CLASSES.index(r.storage_class)),
    )


# --- reading wherever an object is --------------------------------------------------------------------------


def _archive_readable(conn: Connections, row_id: int, key: str, tier: str, storage_class: str,
                      start: bool, error: type[ObjectArchived]) -> Bucket:  # fmt: skip
    """The store of a restored archive copy; else start a restore (when `start`) and raise `error`."""
    status = restore_status(conn, key, tier, storage_class)
    if status.state == "ready":
        note_restore(conn, row_id, "ready", status.expires_at)
        return store(conn, tier, storage_class)
    started = status.state == "ongoing"
    if not started and start:
        try:
            request_restore(conn, key, tier, storage_class, lifecycle_rules(conn).restore)
            started = True
        except (GatewayError, RulesError) as exc:
            log.warning("restore of %s not started: %s", key, getattr(exc, "detail", exc))
    if started:
        note_restore(conn, row_id, "requested", None)
    raise error(key, storage_class, started)


def note_restore(conn: Connections, row_id: int, state: str, expires: datetime | None) -> None:
    try:
        with session_scope(conn.sessions) as session:
            row = session.get(Location, row_id)
            if row is None or row.restore_state == state:
                return
            row.restore_state = state
            if state == "requested":
                row.restore_requested_at = now()
            row.restore_expires_at = expires
    except GatewayError as exc:  # the bookkeeping heals on the next read; the read itself goes on
        log.warning("restore state of location %d not recorded: %s", row_id, exc.detail)


def resolve(conn: Connections, obj: ObjectKey, start_restore: bool = True) -> list[Bucket]:
    """The stores that can serve the object now, best first (the home bucket when it has no rows).

    Raises:
        OriginalArchived (ObjectArchived for versions): only archive copies, none restored yet.
    """
    with session_scope(conn.sessions) as session:
        rows = readable_rows(rows_of(session, obj), obj.home)
        facts = [(r.id, r.tier, r.storage_class) for r in rows]
    if not facts:
        return [tier_bucket(conn, obj.home)]
    found = [store(conn, tier, cls) for _id, tier, cls in facts if cls not in ARCHIVE]
    if found:
        return found
    error = OriginalArchived if obj.kind == ORIGINAL else ObjectArchived
    row_id, tier, cls = facts[0]
    return [_archive_readable(conn, row_id, obj.key, tier, cls, start_restore, error)]


class TierReader:
    """Reads objects by their layout key wherever they live, with the read methods of a Bucket, so
    retrieve code hands it where it handed the originals bucket. One per request: resolutions are cached.

    A copy that turns out missing is skipped for the next one, and finally the home bucket is tried."""

    def __init__(self, conn: Connections, tier: str = "originals") -> None:
        self.conn = conn
        self.name = tier_bucket(conn, tier).name
        self._home = tier
        self._resolved: dict[str, list[Bucket]] = {}

    def _stores(self, key: str) -> list[Bucket]:
        if key not in self._resolved:
            obj = parse_key(key)
            home = tier_bucket(self.conn, self._home)
            stores = [home] if obj is None else resolve(self.conn, obj)
            if home not in stores:
                stores.append(home)
            self._resolved[key] = stores
        return self._resolved[key]

    def _first(self, key: str, read: Any) -> Any:
        """The home bucket first (where nearly every read is answered, with no index query), then
        the copies the index knows of."""
        home = tier_bucket(self.conn, self._home)
        if key not in self._resolved:
            try:
                return read(home)
            except ObjectNotFound:
                pass
        missing: ObjectNotFound | None = None
        for bucket in self._stores(key):
            try:
                return read(bucket)
            except ObjectNotFound as exc:
                missing = missing or exc
        raise missing or ObjectNotFound(f"no object {key}")

    def open(self, key: str) -> BinaryIO:
        return self._first(key, lambda b: b.open(key))

    def get_bytes(self, key: str) -> bytes:
        return self._first(key, lambda b: b.get_bytes(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._first(key, lambda b: b.get_range(key, start, length))

    def head(self, key: str) -> ObjectInfo | None:
        for bucket in self._stores(key):
            info = bucket.head(key)
            if info is not None:
                return info
        return None


def originals(conn: Connections) -> TierReader:
    """What retrieve.originals() should return: originals wherever they are."""
    return TierReader(conn, "originals")


def versions(conn: Connections) -> TierReader:
    """Versions wherever they are (the presets that archive lossless or lossy versions need it)."""
    return TierReader(conn, "hot")


def _original_copies(conn: Connections, refs: list[InstanceRef]) -> dict[str, list[tuple[int, str, str]]]:
    """(row id, tier, class) of the usable copies of each original that has rows, 500 per query."""
    grouped: dict[str, list[tuple[int, str, str]]] = {}
    sops = list(dict.fromkeys(ref.sop_uid for ref in refs))
    for start in range(0, len(sops), 500):
        chunk = sops[start : start + 500]
        with session_scope(conn.sessions) as session:
            rows = session.execute(
                select(Location.id, Location.sop_uid, Location.tier, Location.storage_class).where(
                    Location.sop_uid.in_(chunk), Location.kind == ORIGINAL, Location.state == "ok"
                )
            ).all()
        for row_id, sop_uid, tier, storage_class in rows:
            grouped.setdefault(sop_uid, []).append((row_id, tier, storage_class))
    return grouped


def archived_originals(
    conn: Connections, refs: list[InstanceRef], start_restore: bool = True
) -> dict[str, OriginalArchived]:
    """For a retrieve, before its first byte: the originals that cannot be read now, by SOP Instance UID
    (a restore is started for each). One index query per 500 instances; no store call for the usual
    case of originals in an instant class."""
    by_sop = {ref.sop_uid: ref for ref in refs}
    return _archived(conn, by_sop, _original_copies(conn, refs), start_restore)


def _archived(
    conn: Connections,
    by_sop: dict[str, InstanceRef],
    grouped: dict[str, list[tuple[int, str, str]]],
    start_restore: bool,
) -> dict[str, OriginalArchived]:
    out: dict[str, OriginalArchived] = {}
    for sop_uid, copies in grouped.items():
        if any(cls not in ARCHIVE for _id, _tier, cls in copies):
            continue
        row_id, tier, cls = copies[0]
        try:
            _archive_readable(conn, row_id, ObjectKey(by_sop[sop_uid], None).key, tier, cls, start_restore,
                              OriginalArchived)  # fmt: skip
        except OriginalArchived as exc:
            out[sop_uid] = exc
    return out


# Where originals are changes only when the mover runs: one answer per set of instances is kept a few
# seconds per process, so a viewer's frame-by-frame requests do not each ask the index.
_LOCATIONS: TTLCache[tuple[int, tuple[str, ...]], str] = TTLCache(maxsize=20000, ttl=5)
_LOCATIONS_LOCK = threading.Lock()


def _forget_locations() -> None:
    with _LOCATIONS_LOCK:
        _LOCATIONS.clear()


@event.listens_for(Session, "after_flush")
def _copies_changed(session: Session, _context: object) -> None:
    """A copy recorded, moved or dropped in this process: forget the answers kept (other processes
    keep theirs at most the cache's few seconds, and their reads still find the object: TierReader)."""
    if any(isinstance(o, Location) for o in (*session.new, *session.dirty, *session.deleted)):
        _forget_locations()


@event.listens_for(Session, "do_orm_execute")
def _copies_changed_in_bulk(state: ORMExecuteState) -> None:
    if (state.is_delete or state.is_update) and any(m.class_ is Location for m in state.all_mappers):
        _forget_locations()


def original_location(conn: Connections, refs: list[InstanceRef], start_restore: bool = True) -> str:
    key = (id(conn), tuple(sorted(ref.sop_uid for ref in refs)))
    with _LOCATIONS_LOCK:
        known = _LOCATIONS.get(key)
    if known is not None and known != "archive":
        return known
    found = _original_location(conn, refs, start_restore)
    with _LOCATIONS_LOCK:
        _LOCATIONS[key] = found
    return found


def _original_location(conn: Connections, refs: list[InstanceRef], start_restore: bool = True) -> str:
    """Where the originals of a retrieve are, for the policy engine (gateway.decide RequestFacts):
    "hot" (all in the originals bucket), "cold" (some only in an instant class of the cold bucket:
    served at once, but the lossless version wins the tie) or "archive" (some only in an archive class,
    not restored: their restores are started, and the lossless version is sent meanwhile)."""
    grouped = _original_copies(conn, refs)
    if _archived(conn, {ref.sop_uid: ref for ref in refs}, grouped, start_restore):
        return "archive"
    if any(all(tier != "originals" for _id, tier, _cls in copies) for copies in grouped.values()):
        return "cold"
    return "hot"


# --- what lives where, for the storage API ------------------------------------------------------------------


def copy_json(row: Location) -> dict[str, Any]:
    restore = None
    if row.storage_class in ARCHIVE:
        restore = {
            "state": row.restore_state or "none",
            "requested_at": _iso(row.restore_requested_at),
            "expires_at": _iso(row.restore_expires_at),
        }
    return {
        "tier": row.tier,
        "bucket": row.bucket,
        "key": row.key,
        "storage_class": row.storage_class,
        "size": row.size,
        "sha256": row.sha256,
        "since": _iso(row.since),
        "verified_at": _iso(row.verified_at),
        "state": row.state,
        "pinned_until": _iso(row.pinned_until),
        "restore": restore,
    }


def _iso(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat(timespec="seconds") if value is not None else None


# --- jobs (named by dotted path: the gateway never imports workers) -----------------------------------------


def object_lock_key(key: str) -> str:
    """The lease every mover, prefetch and delete takes before it changes the copies of one object."""
    return f"gw:lock:object:{key}"


def prefetch_key(study_uid: str) -> str:
    return f"gw:prefetch:{study_uid}"


PREFETCH_ACTIVE = "gw:prefetch:active"


# The queue helpers live in gateway.jobs.
enqueue_prefetch = jobs.enqueue_prefetch
enqueue_lifecycle_run = jobs.enqueue_lifecycle_run


# --- prefetch requests and their progress -------------------------------------------------------------------


def prior_studies(session: Session, study_uid: str, count: int) -> list[str]:
    """The patient's earlier studies (same Patient ID), newest first, at most `count`; studies without
    a date come after dated ones. A study without Patient ID has no priors."""
    from gateway.index.models import Study

    study = session.get(Study, study_uid)
    if study is None or not study.patient_id or count <= 0:
        return []
    query = select(Study.study_uid, Study.study_date).where(
        Study.patient_id == study.patient_id, Study.study_uid != study_uid
    )
    rows = session.execute(query).all()
    if study.study_date:
        rows = [r for r in rows if r.study_date is None or r.study_date <= study.study_date]
    rows.sort(key=lambda r: (r.study_date is None, "" if r.study_date is None else _desc(r.study_date), r[0]))
    return [r[0] for r in rows[:count]]


def _desc(date: str) -> str:
    """A sort key that orders YYYYMMDD strings newest first."""
    return "".join(chr(ord("9") - ord(c) + ord("0")) if c.isdigit() else c for c in date)


def request_prefetch(conn: Connections, study_uid: str, priors: int | None, who: str) -> dict[str, Any]:
    """Record a prefetch (the study and its priors) in Redis for the job and for progress reads.

    Raises:
        ObjectNotFound: no such study. RedisUnavailable: Redis did not answer.
    """
    from gateway.index.models import Study

    settings = lifecycle_rules(conn).prefetch
    count = settings.priors if priors is None else priors
    with session_scope(conn.sessions) as session:
        if session.get(Study, study_uid) is None:
            raise ObjectNotFound(f"no study {study_uid}")
        studies = [study_uid, *prior_studies(session, study_uid, count)]
    record = {"study_uid": study_uid, "studies": studies, "requested_at": now().isoformat(timespec="seconds"),
              "by": who}  # fmt: skip
    try:
        ttl = int(max(1.0, settings.keep_hot_days) * 86400)
        conn.redis.set(prefetch_key(study_uid), json.dumps(record), ex=ttl)
        conn.redis.sadd(PREFETCH_ACTIVE, study_uid)
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: could not record the prefetch of {study_uid}: {exc}") from exc
    return record


def prefetch_record(conn: Connections, study_uid: str) -> dict[str, Any] | None:
    try:
        raw = conn.redis.get(prefetch_key(study_uid))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: {type(exc).__name__}") from exc
    return json.loads(raw) if raw else None


def study_objects(session: Session, study_uid: str) -> list[ObjectKey]:
    """Every original of a study and every version made of it (ready)."""
    from gateway.index.models import Instance, Version

    refs = {
        sop: InstanceRef(study, series, sop)
        for study, series, sop in session.execute(
            select(Instance.study_uid, Instance.series_uid, Instance.sop_uid).where(
                Instance.study_uid == study_uid
            )
        ).all()
    }
    out = [ObjectKey(ref, None) for ref in refs.values()]
    for sop, version_id in session.execute(
        select(Version.sop_uid, Version.version_id).where(
            Version.study_uid == study_uid, Version.state == "ready"
        )
    ).all():
        if sop in refs:
            out.append(ObjectKey(refs[sop], version_id))
    return out


def hot_state(rows: list[Location], home: str) -> str:
    """hot (a usable copy in its home bucket), cold (readable at once elsewhere), restoring, archived."""
    usable = [r for r in rows if r.state == "ok"]
    if not rows or any(r.tier == home for r in usable):
        return "hot"
    if any(r.storage_class not in ARCHIVE for r in usable):
        return "cold"
    if any(r.restore_state in ("requested", "ready") for r in usable):
        return "restoring"
    return "archived"


def prefetch_progress(conn: Connections, study_uid: str) -> dict[str, Any]:
    """How far a prefetch got, from the index (the truth) and the request Redis holds.

    Raises:
        ObjectNotFound: no such study.
    """
    from gateway.index.models import Study

    with session_scope(conn.sessions) as session:
        if session.get(Study, study_uid) is None:
            raise ObjectNotFound(f"no study {study_uid}")
    record = prefetch_record(conn, study_uid)
    studies = record["studies"] if record else [study_uid]
    per_study = []
    totals: dict[str, int] = {"objects": 0, "hot": 0, "cold": 0, "restoring": 0, "archived": 0}
    with session_scope(conn.sessions) as session:
        for uid in studies:
            counts = {"hot": 0, "cold": 0, "restoring": 0, "archived": 0}
            objects = study_objects(session, uid)
            rows_by: dict[tuple[str, str | None], list[Location]] = {}
            for row in session.execute(select(Location).where(Location.study_uid == uid)).scalars():
                rows_by.setdefault((row.sop_uid, row.version_id), []).append(row)
            for obj in objects:
                counts[hot_state(rows_by.get((obj.ref.sop_uid, obj.version_id), []), obj.home)] += 1
            per_study.append({"study_uid": uid, "objects": len(objects), **counts})
            totals["objects"] += len(objects)
            for name, value in counts.items():
                totals[name] += value
    done = totals["hot"] == totals["objects"]
    state = "done" if done else ("restoring" if totals["restoring"] else "copying")
    if record is None and not done:
        state = "not requested"
    return {
        "study_uid": study_uid,
        "requested": record is not None,
        "requested_at": record.get("requested_at") if record else None,
        "state": state,
        "progress": round(totals["hot"] / totals["objects"], 3) if totals["objects"] else 1.0,
        **totals,
        "studies": per_study,
    }


def study_storage(conn: Connections, study_uid: str) -> dict[str, Any]:
    """Where every object of a study lives: per instance, the original and each ready version with
    each copy (tier, bucket, key, class, size, checksum, since when); objects without rows are listed in
    their home bucket (`recorded: false`). Totals by tier and class.

    Raises:
        ObjectNotFound: no such study.
    """
    from gateway.index.models import Instance, Study, Version

    with session_scope(conn.sessions) as session:
        if session.get(Study, study_uid) is None:
            raise ObjectNotFound(f"no study {study_uid}")
        instances = (
            session.execute(
                select(Instance)
                .where(Instance.study_uid == study_uid)
                .order_by(Instance.series_uid, Instance.sop_uid)
            )
            .scalars()
            .all()
        )
        versions = (
            session.execute(select(Version).where(Version.study_uid == study_uid, Version.state == "ready"))
            .scalars()
            .all()
        )
        rows = session.execute(select(Location).where(Location.study_uid == study_uid)).scalars().all()
    by_object: dict[tuple[str, str | None], list[Location]] = {}
    for row in rows:
        by_object.setdefault((row.sop_uid, row.version_id), []).append(row)
    by_instance: dict[str, list[Any]] = {}
    for version in versions:
        by_instance.setdefault(version.sop_uid, []).append(version)
    totals: dict[str, dict[str, int]] = {}
    out = []
    for instance in instances:
        ref = InstanceRef(instance.study_uid, instance.series_uid, instance.sop_uid)
        entries = [(ObjectKey(ref, None), instance.size, instance.sha256, instance.created_at)]
        for version in sorted(by_instance.get(instance.sop_uid, []), key=lambda v: v.version_id):
            entries.append(
                (ObjectKey(ref, version.version_id), version.size, version.sha256, version.updated_at)
            )
        objects = []
        for obj, size, sha256, since in entries:
            found = by_object.get((ref.sop_uid, obj.version_id))
            if found:
                copies = [copy_json(r) for r in readable_rows(found, obj.home)]
                copies += [copy_json(r) for r in found if r.state != "ok"]
            else:
                copies = [
                    {
                        "tier": obj.home,
                        "bucket": tier_bucket(conn, obj.home).name,
                        "key": obj.key,
                        "storage_class": "STANDARD",
                        "size": size,
                        "sha256": sha256,
                        "since": _iso(since),
                        "state": "ok",
                        "recorded": False,
                    }  # fmt: skip
                ]
            for copy in copies:
                if copy["state"] == "ok":
                    tier_totals = totals.setdefault(copy["tier"], {})
                    tier_totals[copy["storage_class"]] = tier_totals.get(copy["storage_class"], 0) + int(
                        copy["size"] or 0
                    )
            objects.append(
                {
                    "object": obj.version_id or ORIGINAL,
                    "state": hot_state(found or [], obj.home),
                    "copies": copies,
                }
            )
        out.append({"series_uid": ref.series_uid, "sop_uid": ref.sop_uid, "objects": objects})
    return {"study_uid": study_uid, "bytes": totals, "instances": out}
