"""Prefetch: make a study and the patient's prior studies hot again ahead of a reading. Each object
whose home copy is gone is copied back home (from an instant class at once; from an archive class
once its restore is ready, a restore being started where none is), verified, recorded, and pinned hot
for `prefetch.keep_hot_days` so the mover leaves it alone meanwhile. The cold copy stays.

Progress lives in the index (where each copy is) and Redis (the request): gateway.tiers reports it.
Local backend: restores become ready after restore.local_delay_seconds (see gateway/tiers.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from rq import Queue
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway import jobs, tiers
from gateway.connections import Connections
from gateway.errors import GatewayError, RulesError
from gateway.index.db import session_scope
from gateway.index.models import Location
from gateway.tiers import ObjectKey
from policies.lifecycle import ARCHIVE, LifecycleRules
from workers import context
from workers.lifecycle import Facts, MoveFailed, load_facts, locked, release

log = logging.getLogger(__name__)

POLL_SECONDS = 60


@dataclass
class Pass:
    """What one pass over a prefetch did."""

    hot: int = 0
    copied: int = 0
    restoring: int = 0
    waiting: int = 0  # locked by a mover, or a fault: the next pass tries again
    failures: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not (self.restoring or self.waiting)


def advance(conn: Connections, study_uid: str, rules: LifecycleRules | None = None) -> Pass:
    """One pass over the prefetch of `study_uid` (the studies its request names, else the study)."""
    rules = rules or tiers.lifecycle_rules(conn)
    record = tiers.prefetch_record(conn, study_uid)
    studies = record["studies"] if record else [study_uid]
    pinned = tiers.now() + timedelta(days=rules.prefetch.keep_hot_days)
    result = Pass()
    for uid in studies:
        with session_scope(conn.sessions) as session:
            objects = tiers.study_objects(session, uid)
        for obj in objects:
            lock = locked(conn, obj.key, rules.mover.lease_seconds)
            if lock is None:
                result.waiting += 1
                continue
            try:
                state = _bring_home(conn, rules, obj, pinned)
            except (GatewayError, MoveFailed) as exc:
                reason = getattr(exc, "detail", None) or str(exc)
                log.warning("prefetch of %s: %s", obj.key, reason)
                result.failures.append(f"{obj.key}: {reason}")
                result.waiting += 1
                continue
            finally:
                release(lock)
            setattr(result, state, getattr(result, state) + 1)
    if result.finished and record is not None:
        try:
            conn.redis.srem(tiers.PREFETCH_ACTIVE, study_uid)
        except redis.RedisError:
            pass
    return result


def _bring_home(conn: Connections, rules: LifecycleRules, obj: ObjectKey, pinned: datetime) -> str:
    """hot (already), copied (brought home now), or restoring; pins the home copy either way."""
    facts = load_facts(conn, obj)
    if facts is None:
        return "hot"  # deleted meanwhile: nothing to bring
    home = facts.row(obj.home)
    if not facts.rows or (home is not None and home.state == "ok"):
        _pin(conn, facts, pinned)
        return "hot"
    with session_scope(conn.sessions) as session:
        rows = tiers.readable_rows(tiers.rows_of(session, obj), obj.home)
        copies = [(r.id, r.tier, r.storage_class) for r in rows]
    source = next(((t, c) for _i, t, c in copies if c not in ARCHIVE), None)
    if source is None and copies:
        row_id, tier, storage_class = copies[0]
        status = tiers.request_restore(conn, obj.key, tier, storage_class, rules.restore)
        tiers.note_restore(
            conn, row_id, "ready" if status.state == "ready" else "requested", status.expires_at
        )
        if status.state != "ready":
            return "restoring"
        source = (tier, storage_class)
    if source is None:
        raise MoveFailed("no copy left to bring home")
    tiers.copy_object(conn, obj.key, source, (obj.home, "STANDARD"), obj.version_id or tiers.ORIGINAL)
    size, digest = tiers.checksum(conn, obj.key, obj.home, "STANDARD")
    if digest != facts.sha256 or size != facts.size:
        tiers.delete_copy(conn, obj.key, obj.home, "STANDARD")
        raise MoveFailed(f"the copy brought home does not match sha256 {facts.sha256[:12]}...; removed")
    bucket = tiers.tier_bucket(conn, obj.home).name
    try:
        with session_scope(conn.sessions) as session:
            row = tiers.record_copy(session, obj, obj.home, bucket, "STANDARD", facts.size, facts.sha256)
            row.pinned_until = pinned
    except IntegrityError:  # the instance was deleted meanwhile: take the copy back out
        tiers.delete_copy(conn, obj.key, obj.home, "STANDARD")
        return "hot"
    return "copied"


def _pin(conn: Connections, facts: Facts, pinned: datetime) -> None:
    """Keep the home copy hot until `pinned` (an object without rows gets its home row now)."""
    obj = facts.obj
    with session_scope(conn.sessions) as session:
        row = session.execute(
            select(Location).where(Location.tier == obj.home, Location.key == obj.key)
        ).scalar_one_or_none()
        if row is None:
            bucket = tiers.tier_bucket(conn, obj.home).name
            row = tiers.record_copy(
                session, obj, obj.home, bucket, "STANDARD", facts.size, facts.sha256,
                since=facts.ingested_at, verified=False,
            )  # fmt: skip
        current = tiers.aware(row.pinned_until)
        if current is None or current < pinned:
            row.pinned_until = pinned


def advance_active(conn: Connections, limit: int = 100) -> int:
    """Called by each mover run: one pass over every prefetch still waiting for restores."""
    try:
        active = [m.decode() for m in conn.redis.smembers(tiers.PREFETCH_ACTIVE)][:limit]
    except redis.RedisError:
        return 0
    for study_uid in active:
        try:
            advance(conn, study_uid)
        except (GatewayError, RulesError) as exc:
            log.warning("prefetch of %s not advanced: %s", study_uid, getattr(exc, "detail", exc))
    return len(active)


def prefetch_job(study_uid: str, priors: int | None = None) -> dict[str, int]:
    """RQ entry point: one pass; while restores are under way, another pass is scheduled."""
    conn = context.connections()
    if tiers.prefetch_record(conn, study_uid) is None:
        tiers.request_prefetch(conn, study_uid, priors, "job")
    result = advance(conn, study_uid)
    if not result.finished:
        try:
            Queue(tiers.LIFECYCLE_QUEUE, connection=conn.redis).enqueue_in(
                timedelta(seconds=POLL_SECONDS), jobs.PREFETCH, study_uid, priors, result_ttl=0
            )
        except redis.RedisError as exc:
            log.warning(
                "next prefetch pass of %s not scheduled (the mover's run takes it): %s", study_uid, exc
            )
    return {
        "hot": result.hot,
        "copied": result.copied,
        "restoring": result.restoring,
        "waiting": result.waiting,
    }
