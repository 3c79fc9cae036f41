"""The mover: carries out lifecycle.yaml's moves. For each object due: copy it to the cold bucket with
its storage class, verify the copy's SHA-256 against the one recorded at ingest, record the new
location in the index, and only then delete the source, so at any crash point at least one verified
copy exists and the index points at a readable one.

Throttled (objects and bytes per run and per second), resumable (the index says what is left; a copy
recorded before a crash is not made again, a source marked leaving is deleted by the next run), and
one object is never moved twice at once: each takes a Redis lock with a lease first."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway import tiers
from gateway.connections import Connections
from gateway.errors import GatewayError, RedisUnavailable, RulesError
from gateway.index.db import session_scope
from gateway.index.models import DiagnosisEvent, Instance, Location, Study, Version
from gateway.tiers import ORIGINAL, ObjectKey
from gateway.uids import InstanceRef
from policies.lifecycle import Action, Copy, Holding, LifecycleRules, MoverLimits, Planned
from policies.rules import Kind
from workers import context

log = logging.getLogger(__name__)

PAGE = 500
LAST_RUN = "gw:lifecycle:last-run"
NEXT_RUN = "gw:lifecycle:next-run"
RECONCILED = "gw:lifecycle:reconciled:{tier}"


class MoveFailed(Exception):
    """A step failed in a way the object's copies can say why (a checksum mismatch, no checksum)."""


@dataclass(frozen=True)
class RowFacts:
    id: int
    tier: str
    storage_class: str
    state: str
    size: int
    sha256: str
    verified: bool
    pinned_until: datetime | None


@dataclass(frozen=True)
class Facts:
    """One object as the index knows it right now: recorded checksum, ages, and its copies."""

    obj: ObjectKey
    kind: str  # original, lossless, lossy
    size: int
    sha256: str
    ingested_at: datetime
    read_at: datetime | None
    rows: tuple[RowFacts, ...]

    def holding(self) -> Holding:
        if self.rows:
            copies = tuple(tiers_copy(r) for r in self.rows)
            home = [r for r in self.rows if r.tier == self.obj.home]
            pinned = max((r.pinned_until for r in home if r.pinned_until), default=None)
        else:  # no rows: in its home bucket, STANDARD
            copies, pinned = (Copy(self.obj.home),), None
        return Holding(
            self.obj.version_id or ORIGINAL, self.kind, self.ingested_at, self.read_at, copies, pinned
        )

    def row(self, tier: str) -> RowFacts | None:
        return next((r for r in self.rows if r.tier == tier), None)


def tiers_copy(row: RowFacts) -> Copy:
    return Copy(row.tier, row.storage_class, usable=row.state == "ok")


@dataclass
class Outcome:
    key: str
    result: str  # moved, copied, planned, nothing, skipped, failed
    action: str | None = None
    storage_class: str | None = None
    reason: str = ""
    bytes: int = 0
    steps: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", [])}


@dataclass
class RunReport:
    dry_run: bool
    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    examined: int = 0
    bytes: int = 0
    finished_leaving: int = 0
    reconciled: int = 0
    stopped: str | None = None
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        """Counts what was done; objects looked at with nothing due only count as examined."""
        self.examined += 1
        if outcome.result == "nothing":
            return
        self.counts[outcome.result] = self.counts.get(outcome.result, 0) + 1
        self.bytes += outcome.bytes
        self.outcomes.append(outcome)

    @property
    def acted(self) -> int:
        return sum(self.counts.get(k, 0) for k in ("moved", "copied", "failed", "planned"))

    def as_json(self) -> dict[str, Any]:
        moved = self.counts.get("moved", 0) + self.counts.get("copied", 0)
        return {
            "dry_run": self.dry_run,
            "counts": self.counts,
            "examined": self.examined,
            "bytes": self.bytes,
            "finished_leaving": self.finished_leaving,
            "reconciled": self.reconciled,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
            "objects_per_second": round(moved / self.seconds, 2) if self.seconds else None,
            "megabytes_per_second": round(self.bytes / 1e6 / self.seconds, 2) if self.seconds else None,
            "objects": [o.as_json() for o in self.outcomes],
        }


# --- facts --------------------------------------------------------------------------------------------------


def read_times(session: Session, study_uids: set[str]) -> dict[str, datetime | None]:
    """When each study reached `read` (status 2 or higher): the last change from below 2 to 2 or above;
    a study read with no history (status set before histories were kept) counts from its last update.
    None: never read, or taken back to unread."""
    if not study_uids:
        return {}
    studies = session.execute(
        select(Study.study_uid, Study.diagnosis_status, Study.updated_at).where(
            Study.study_uid.in_(study_uids)
        )
    ).all()
    events = dict(
        session.execute(
            select(DiagnosisEvent.study_uid, func.max(DiagnosisEvent.at))
            .where(
                DiagnosisEvent.study_uid.in_(study_uids),
                DiagnosisEvent.from_status < 2,
                DiagnosisEvent.to_status >= 2,
            )
            .group_by(DiagnosisEvent.study_uid)
        ).all()
    )
    out: dict[str, datetime | None] = {}
    for study_uid, status, updated in studies:
        out[study_uid] = tiers.aware(events.get(study_uid) or updated) if (status or 1) >= 2 else None
    return out


def _row_facts(row: Location) -> RowFacts:
    verified = row.verified_at is not None
    pinned = tiers.aware(row.pinned_until)
    return RowFacts(
        row.id, row.tier, row.storage_class, row.state, int(row.size), row.sha256, verified, pinned
    )


def version_kind(conn: Connections, version_id: str | None) -> str:
    if version_id is None:
        return ORIGINAL
    spec = conn.rules.versions.by_id(version_id)
    return spec.kind.value if spec is not None else Kind.LOSSY.value


def load_facts(conn: Connections, obj: ObjectKey) -> Facts | None:
    """The object as indexed now, or None when it is not (deleted, or a version not ready)."""
    with session_scope(conn.sessions) as session:
        instance = session.get(Instance, obj.ref.sop_uid)
        if instance is None or instance.study_uid != obj.ref.study_uid:
            return None
        size, sha256 = int(instance.size), instance.sha256
        if obj.version_id is not None:
            version = session.get(Version, (obj.ref.sop_uid, obj.version_id))
            if version is None or version.state != "ready" or not version.sha256:
                return None
            size, sha256 = int(version.size or 0), version.sha256
        rows = tuple(_row_facts(r) for r in tiers.rows_of(session, obj))
        read_at = read_times(session, {obj.ref.study_uid}).get(obj.ref.study_uid)
        ingested = tiers.aware(instance.created_at)
    assert ingested is not None
    return Facts(obj, version_kind(conn, obj.version_id), size, sha256, ingested, read_at, rows)


def _covered_versions(conn: Connections, rules: LifecycleRules) -> list[str]:
    out = []
    for spec in conn.rules.versions.derived:
        if any(move.covers(spec.id, spec.kind.value) for move in rules.moves):
            out.append(spec.id)
    return out


def _min_days(rules: LifecycleRules) -> float | None:
    days = [d for m in rules.moves for d in (m.read_days, m.ingest_days) if d is not None]
    return min(days) if days else None


def candidates(conn: Connections, rules: LifecycleRules, now: datetime) -> Iterator[ObjectKey]:
    """Objects that may be due, oldest first: ingested long enough ago for the shortest rule, with a
    copy still in their home bucket. Keyset pages, so objects leaving the set do not shift the pages."""
    least = _min_days(rules)
    if least is None:
        return
    cutoff = now - timedelta(days=least)
    if any(m.covers(ORIGINAL, ORIGINAL) for m in rules.moves):
        yield from _pages(conn, cutoff, None)
    for version_id in _covered_versions(conn, rules):
        yield from _pages(conn, cutoff, version_id)


def _has_home(version_id: str | None) -> Any:
    kind = ORIGINAL if version_id is None else tiers.VERSION
    same = and_(
        Location.sop_uid == Instance.sop_uid,
        Location.kind == kind,
        Location.version_id.is_(None) if version_id is None else Location.version_id == version_id,
    )
    any_row = select(Location.id).where(same).exists()
    home = select(Location.id).where(same, Location.tier == tiers.HOME[kind], Location.state == "ok").exists()
    return or_(~any_row, home)


def _pages(conn: Connections, cutoff: datetime, version_id: str | None) -> Iterator[ObjectKey]:
    last: tuple[datetime, str] | None = None
    while True:
        query = select(Instance.created_at, Instance.study_uid, Instance.series_uid, Instance.sop_uid).where(
            Instance.created_at <= cutoff, _has_home(version_id)
        )
        if version_id is not None:
            query = query.join(Version, Version.sop_uid == Instance.sop_uid).where(
                Version.version_id == version_id, Version.state == "ready"
            )
        if last is not None:
            query = query.where(
                or_(
                    Instance.created_at > last[0],
                    and_(Instance.created_at == last[0], Instance.sop_uid > last[1]),
                )
            )
        query = query.order_by(Instance.created_at, Instance.sop_uid).limit(PAGE)
        with session_scope(conn.sessions) as session:
            rows = session.execute(query).all()
        for _created, study_uid, series_uid, sop_uid in rows:
            yield ObjectKey(InstanceRef(study_uid, series_uid, sop_uid), version_id)
        if len(rows) < PAGE:
            return
        last = (rows[-1][0], rows[-1][3])


# --- one object ---------------------------------------------------------------------------------------------


def steps(
    conn: Connections, rules: LifecycleRules, obj: ObjectKey, now: datetime, dry_run: bool = False
) -> Generator[str, None, Outcome]:
    """Move or copy one object, yielding the name of each step once it is done (tests stop here to
    play a crash between steps). The caller holds the object's lock. Returns the outcome."""
    facts = load_facts(conn, obj)
    if facts is None:
        return Outcome(obj.key, "skipped", reason="not indexed (deleted, or a version not ready)")
    planned = rules.plan(facts.holding(), now)
    if planned is None:
        return Outcome(obj.key, "nothing")
    outcome = Outcome(obj.key, "planned", planned.action.value, planned.storage_class, planned.reason)
    if dry_run:
        outcome.bytes = facts.size if planned.copy_needed else 0
        return outcome
    home = facts.row(obj.home)
    source_class = home.storage_class if home is not None else "STANDARD"
    target = (planned.target, planned.storage_class)
    if not facts.rows:
        _adopt(conn, facts)
        outcome.steps.append("adopt")
        yield "adopt"
    if planned.copy_needed:
        stamp = {"ingested-at": facts.ingested_at.isoformat()}
        tiers.copy_object(conn, obj.key, (obj.home, source_class), target, obj.version_id or ORIGINAL, stamp)
        outcome.steps.append("copy")
        outcome.bytes = facts.size
        yield "copy"
    _verify(conn, facts, target, fresh=planned.copy_needed)
    outcome.steps.append("verify")
    yield "verify"
    replaced = _record(conn, facts, planned)
    if replaced is None:
        return Outcome(obj.key, "skipped", reason="deleted while it was being copied")
    outcome.steps.append("record")
    yield "record"
    if (
        replaced
        and replaced != planned.storage_class
        and tiers.store(conn, "cold", replaced) is not tiers.store(conn, "cold", planned.storage_class)
    ):
        tiers.delete_copy(conn, obj.key, "cold", replaced)  # local: the old class folder's copy
    if planned.action is Action.MOVE:
        tiers.delete_copy(conn, obj.key, obj.home, source_class)
        outcome.steps.append("delete")
        yield "delete"
        _forget(conn, obj, obj.home)
        outcome.steps.append("forget")
        yield "forget"
    outcome.result = "moved" if planned.action is Action.MOVE else "copied"
    return outcome


def _adopt(conn: Connections, facts: Facts) -> None:
    """An object without rows is in its home bucket: write that row before anything else changes."""
    bucket = tiers.tier_bucket(conn, facts.obj.home).name
    with session_scope(conn.sessions) as session:
        tiers.record_copy(
            session, facts.obj, facts.obj.home, bucket, "STANDARD", facts.size, facts.sha256,
            since=facts.ingested_at, verified=False,
        )  # fmt: skip


def _verify(conn: Connections, facts: Facts, target: tuple[str, str], fresh: bool) -> None:
    """The copy's size and SHA-256 must be the recorded ones; a fresh bad copy is removed again.

    Raises:
        MoveFailed: mismatch, or a copy without a checksum (the source stays).
    """
    size, digest = tiers.checksum(conn, facts.obj.key, *target)
    if digest is not None and digest == facts.sha256 and size == facts.size:
        return
    if digest is None:
        if not fresh:  # an older copy nobody can check without a restore: made again, with a checksum
            _mark_corrupt(conn, facts.obj, target[0])
        raise MoveFailed(f"the copy in {target[0]} ({target[1]}) has no SHA-256 to verify; the source stays")
    if fresh:
        tiers.delete_copy(conn, facts.obj.key, *target)
        with session_scope(conn.sessions) as session:  # S3: one key per bucket, an older copy is gone
            session.execute(delete(Location).where(Location.tier == target[0], Location.key == facts.obj.key))
    else:
        _mark_corrupt(conn, facts.obj, target[0])  # readers skip it; the next run copies again
    raise MoveFailed(
        f"the copy in {target[0]} ({target[1]}) has sha256 {str(digest)[:12]}... and {size} bytes, "
        f"not the recorded {facts.sha256[:12]}... and {facts.size}; the source stays"
    )


def _record(conn: Connections, facts: Facts, planned: Planned) -> str | None:
    """One transaction: the verified copy's row, and for a move the source's row marked leaving.
    Returns the class the target row had before ("" if none); None if the instance is gone."""
    obj = facts.obj
    bucket = tiers.tier_bucket(conn, planned.target).name
    try:
        with session_scope(conn.sessions) as session:
            before = session.execute(
                select(Location.storage_class).where(Location.tier == planned.target, Location.key == obj.key)
            ).scalar_one_or_none()
            tiers.record_copy(
                session, obj, planned.target, bucket, planned.storage_class, facts.size, facts.sha256
            )
            if planned.action is Action.MOVE:
                source = session.execute(
                    select(Location).where(Location.tier == obj.home, Location.key == obj.key)
                ).scalar_one_or_none()
                if source is not None:
                    source.state = "leaving"
    except IntegrityError:
        tiers.delete_copy(conn, obj.key, planned.target, planned.storage_class)
        return None
    return before or ""


def _mark_corrupt(conn: Connections, obj: ObjectKey, tier: str) -> None:
    with session_scope(conn.sessions) as session:
        row = session.execute(
            select(Location).where(Location.tier == tier, Location.key == obj.key)
        ).scalar_one_or_none()
        if row is not None:
            row.state = "corrupt"


def _forget(conn: Connections, obj: ObjectKey, tier: str) -> None:
    with session_scope(conn.sessions) as session:
        session.execute(delete(Location).where(Location.tier == tier, Location.key == obj.key))


def drive(generator: Generator[str, None, Outcome]) -> Outcome:
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def locked(conn: Connections, key: str, lease: int) -> Any:
    """The object's lock (a lease: a crashed holder's lock expires), or None when someone holds it.

    Raises:
        RedisUnavailable: Redis did not answer (nothing moves without the lock).
    """
    lock = conn.redis.lock(tiers.object_lock_key(key), timeout=lease, blocking=False)
    try:
        return lock if lock.acquire(blocking=False) else None
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis: {type(exc).__name__} taking the lock of {key}") from exc


def release(lock: Any) -> None:
    try:
        lock.release()
    except redis.RedisError:  # the lease ran out (LockNotOwnedError) or Redis left: it expires by itself
        log.warning("lock %s was not released; its lease ends it", lock.name)


def move_one(conn: Connections, rules: LifecycleRules, obj: ObjectKey, now: datetime, lease: int) -> Outcome:
    lock = locked(conn, obj.key, lease)
    if lock is None:
        return Outcome(obj.key, "skipped", reason="another mover holds its lock")
    try:
        return drive(steps(conn, rules, obj, now))
    except MoveFailed as exc:
        log.error("move of %s failed: %s", obj.key, exc)
        return Outcome(obj.key, "failed", reason=str(exc))
    except GatewayError as exc:
        log.warning("move of %s failed: %s", obj.key, exc.detail)
        return Outcome(obj.key, "failed", reason=exc.detail)
    finally:
        release(lock)


# --- copies on their way out --------------------------------------------------------------------------------


def finish_leaving(conn: Connections, lease: int, limit: int = 1000) -> int:
    """Delete the copies a crashed or faulted run marked leaving, once another copy is verified again
    (never the last copy: a leaving copy with no verified sibling is kept, and said so)."""
    with session_scope(conn.sessions) as session:
        rows = session.execute(
            select(
                Location.id,
                Location.key,
                Location.tier,
                Location.storage_class,
                Location.study_uid,
                Location.sop_uid,
                Location.version_id,
            )  # fmt: skip
            .where(Location.state == "leaving")
            .limit(limit)
        ).all()
    done = 0
    for _id, key, tier, storage_class, *_ in rows:
        obj = tiers.parse_key(key)
        lock = locked(conn, key, lease) if obj is not None else None
        if lock is None:
            continue
        try:
            done += _finish_one(conn, obj, tier, storage_class)
        except GatewayError as exc:
            log.warning("leaving copy %s in %s not deleted yet: %s", key, tier, exc.detail)
        finally:
            release(lock)
    return done


def _finish_one(conn: Connections, obj: ObjectKey, tier: str, storage_class: str) -> int:
    facts = load_facts(conn, obj)
    if facts is None:
        return 0
    others = [r for r in facts.rows if r.tier != tier and r.state == "ok" and r.verified]
    for other in others:
        size, digest = tiers.checksum(conn, obj.key, other.tier, other.storage_class)
        if digest == facts.sha256 and size == facts.size:
            tiers.delete_copy(conn, obj.key, tier, storage_class)
            _forget(conn, obj, tier)
            return 1
        if digest is not None:
            _mark_corrupt(conn, obj, other.tier)
    log.error("copy %s in %s is marked leaving but no other verified copy exists: kept", obj.key, tier)
    with session_scope(conn.sessions) as session:
        row = session.execute(
            select(Location).where(Location.tier == tier, Location.key == obj.key)
        ).scalar_one_or_none()
        if row is not None:
            row.state = "ok"
    return 0


# --- storage classes changed by S3 itself -------------------------------------------------------------------


def reconcile_classes(conn: Connections, rules: LifecycleRules, force: bool = False) -> int:
    """Operators who let S3's own lifecycle rules change classes: list each bucket that has native
    transitions (at most once a day, unless forced) and bring the rows' storage classes up to date,
    adopting row-less objects S3 took out of STANDARD. Returns how many rows changed."""
    changed = 0
    for tier in sorted({t.bucket for t in rules.transitions}):
        if not force:
            try:
                if not conn.redis.set(RECONCILED.format(tier=tier), "1", nx=True, ex=24 * 3600):
                    continue
            except redis.RedisError:
                continue
        changed += _reconcile_tier(conn, tier)
    return changed


def _reconcile_tier(conn: Connections, tier: str) -> int:
    changed = 0
    for key, storage_class, _size in tiers.list_copies(conn, tier):
        obj = tiers.parse_key(key)
        if obj is None:
            continue
        with session_scope(conn.sessions) as session:
            row = session.execute(
                select(Location).where(Location.tier == tier, Location.key == key)
            ).scalar_one_or_none()
            if row is not None:
                if row.storage_class != storage_class:
                    row.storage_class = storage_class
                    changed += 1
                continue
        if storage_class == "STANDARD":
            continue
        facts = load_facts(conn, obj)
        if facts is None or facts.rows:
            continue
        with session_scope(conn.sessions) as session:
            bucket = tiers.tier_bucket(conn, tier).name
            tiers.record_copy(
                session, obj, tier, bucket, storage_class, facts.size, facts.sha256,
                since=facts.ingested_at, verified=False,
            )  # fmt: skip
        changed += 1
    return changed


# --- a run --------------------------------------------------------------------------------------------------


class Pacer:
    """Keeps a run at or under its objects-per-second and bytes-per-second rates."""

    def __init__(self, limits: MoverLimits) -> None:
        self.limits = limits
        self.start = time.monotonic()
        self.objects = 0
        self.bytes = 0

    def wait(self) -> None:
        due = max(self.objects / self.limits.objects_per_second, self.bytes / self.limits.bytes_per_second)
        delay = self.start + due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def done(self, size: int) -> None:
        self.objects += 1
        self.bytes += size


def run(
    conn: Connections,
    rules: LifecycleRules | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    limits: MoverLimits | None = None,
    reconcile: bool = True,
) -> RunReport:
    """One pass of the mover (the periodic job and `gateway lifecycle run`). `now` may be given to
    play a later day; `dry_run` only lists what would move."""
    rules = rules or tiers.lifecycle_rules(conn)
    limits = limits or rules.mover
    now = now or tiers.now()
    report = RunReport(dry_run)
    if not dry_run:
        report.finished_leaving = finish_leaving(conn, limits.lease_seconds)
    pacer = Pacer(limits)
    for obj in candidates(conn, rules, now):
        if report.acted >= limits.max_objects_per_run:
            report.stopped = f"max_objects_per_run ({limits.max_objects_per_run}) reached"
            break
        if report.bytes >= limits.max_bytes_per_run:
            report.stopped = f"max_megabytes_per_run ({limits.max_bytes_per_run / 1e6:g}) reached"
            break
        if dry_run:
            outcome = drive(steps(conn, rules, obj, now, dry_run=True))
        else:
            pacer.wait()
            outcome = move_one(conn, rules, obj, now, limits.lease_seconds)
            if outcome.result != "nothing":
                pacer.done(outcome.bytes)
        report.add(outcome)
    if not dry_run:
        if reconcile:
            report.reconciled = reconcile_classes(conn, rules)
        from workers import prefetch

        prefetch.advance_active(conn)
    report.seconds = time.monotonic() - report.started
    if not dry_run:
        _remember(conn, report)
    log.info("lifecycle run: %s", {k: v for k, v in report.as_json().items() if k != "objects"})
    return report


def _remember(conn: Connections, report: RunReport) -> None:
    import json

    summary = {k: v for k, v in report.as_json().items() if k != "objects"}
    summary["at"] = tiers.now().isoformat(timespec="seconds")
    try:
        conn.redis.set(LAST_RUN, json.dumps(summary))
    except redis.RedisError:
        pass


def run_job() -> dict[str, Any]:
    """RQ entry point of the periodic run."""
    report = run(context.connections())
    return {k: v for k, v in report.as_json().items() if k != "objects"}


def start_background(conn: Connections, every_minutes: float | None = None) -> threading.Event:
    """In each worker process: queue a mover run every `mover.every_minutes` (lifecycle.yaml). Any number
    of workers may do so: a Redis key with that expiry lets one of them queue each period, and the job
    id keeps a second run from being queued while one is queued or running. Set the event to stop."""
    stop = threading.Event()

    def period() -> float:
        if every_minutes is not None:
            return every_minutes * 60
        try:
            return tiers.lifecycle_rules(conn).mover.every_minutes * 60
        except (RulesError, GatewayError):  # a bad file: the run logs it; keep the default period
            return MoverLimits().every_minutes * 60

    def loop() -> None:
        while not stop.wait(min(60.0, period())):
            try:
                if conn.redis.set(NEXT_RUN, "1", nx=True, ex=max(1, int(period()))):
                    tiers.enqueue_lifecycle_run(conn.redis)
            except (redis.RedisError, GatewayError) as exc:
                log.warning("mover run not queued: %s", exc)

    threading.Thread(target=loop, name="lifecycle", daemon=True).start()
    return stop
