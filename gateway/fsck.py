"""`gateway fsck`: the index against the buckets. Reports index rows without objects, objects without
rows, and checksum mismatches; read-only unless asked to repair. Core: no Flask.

Repairs never delete the last copy of anything: a row whose object is gone is dropped only when
another copy remains; an orphan object is adopted (indexed) when its instance is known or it is an
original, and deleted only when it is a version or a copy of an instance the index no longer has; a
copy whose checksum is wrong is marked corrupt (readers skip it) while a good copy exists."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from gateway import tiers
from gateway.connections import Connections
from gateway.errors import GatewayError, InstanceRejected
from gateway.index import rebuild
from gateway.index.db import session_scope
from gateway.index.models import Instance, Location, Version
from gateway.tiers import ObjectKey
from gateway.uids import InstanceRef
from policies.lifecycle import ARCHIVE

log = logging.getLogger(__name__)


@dataclass
class Finding:
    kind: str  # missing-object, lost, orphan-object, unrecorded-copy, checksum-mismatch, version-missing
    key: str
    tier: str
    detail: str
    repaired: str | None = None

    def line(self) -> str:
        fixed = f" -> repaired: {self.repaired}" if self.repaired else ""
        return f"{self.kind}: {self.tier} {self.key}: {self.detail}{fixed}"


@dataclass
class FsckReport:
    objects: int = 0
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    def lines(self) -> list[str]:
        out = [f.line() for f in self.findings]
        state = "clean" if not self.findings else f"{len(self.unrepaired)} of {len(self.findings)} unrepaired"
        out.append(f"checked {self.objects} objects and {self.rows} index rows: {state}")
        return out


@dataclass(frozen=True)
class Recorded:
    """What the index says one object is (size and SHA-256) and where its copies are."""

    obj: ObjectKey
    size: int
    sha256: str
    rows: tuple[tuple[int, str, str, str], ...]  # (id, tier, storage class, state)


def _index(conn: Connections) -> dict[str, Recorded]:
    out: dict[str, Recorded] = {}
    with session_scope(conn.sessions) as session:
        rows: dict[str, list[tuple[int, str, str, str]]] = {}
        for row in session.execute(select(Location)).scalars():
            rows.setdefault(row.key, []).append((row.id, row.tier, row.storage_class, row.state))
        refs = {}
        for instance in session.execute(
            select(Instance.study_uid, Instance.series_uid, Instance.sop_uid, Instance.size, Instance.sha256)
        ).all():
            ref = InstanceRef(instance.study_uid, instance.series_uid, instance.sop_uid)
            refs[ref.sop_uid] = ref
            obj = ObjectKey(ref, None)
            out[obj.key] = Recorded(obj, int(instance.size), instance.sha256, tuple(rows.get(obj.key, ())))
        for sop_uid, version_id, size, sha256 in session.execute(
            select(Version.sop_uid, Version.version_id, Version.size, Version.sha256).where(
                Version.state == "ready"
            )
        ).all():
            if sop_uid in refs and sha256:
                obj = ObjectKey(refs[sop_uid], version_id)
                out[obj.key] = Recorded(obj, int(size or 0), sha256, tuple(rows.get(obj.key, ())))
    return out


def check(conn: Connections, repair: bool = False, deep: bool = False) -> FsckReport:
    """Compare every object with the index. `deep` hashes every readable copy; otherwise the checksum
    the store keeps (S3 additional checksum or metadata, the local sidecar) is compared."""
    report = FsckReport()
    found, _records = rebuild.scan(conn)
    recorded = _index(conn)
    report.objects = sum(len(f.copies) for f in found.values())
    report.rows = len(recorded) + sum(len(r.rows) for r in recorded.values())
    for key, item in recorded.items():
        _check_recorded(conn, item, found.get(key), report, repair, deep)
    for key, item in found.items():
        if key not in recorded:
            _check_orphan(conn, item, report, repair)
    for finding in report.findings:
        log.warning("fsck: %s", finding.line())
    return report


def _present(found: rebuild.Found | None) -> dict[tuple[str, str], int]:
    return {(tier, cls): size for tier, cls, size in (found.copies if found else [])}


def _check_recorded(
    conn: Connections,
    item: Recorded,
    found: rebuild.Found | None,
    report: FsckReport,
    repair: bool,
    deep: bool,
) -> None:
    present = _present(found)
    rows = item.rows or ((0, item.obj.home, "STANDARD", "ok"),)  # no rows: expected at home
    good = 0
    broken: list[Finding] = []
    for _row_id, tier, storage_class, state in rows:
        place = (tier, storage_class)
        if place not in present:
            moved = [cls for t, cls in present if t == tier]
            if moved:  # S3 changed its class by itself (a native transition)
                finding = Finding(
                    "class-changed", item.obj.key, tier, f"recorded {storage_class}, now {moved[0]}"
                )
                report.findings.append(finding)
                if repair:
                    _set_class(conn, item.obj, tier, moved[0])
                    finding.repaired = f"row set to {moved[0]}"
                continue
            broken.append(Finding("missing-object", item.obj.key, tier, f"no object in {storage_class}"))
            continue
        if state == "corrupt":
            continue
        mismatch = _mismatch(conn, item, tier, storage_class, present[place], deep)
        if mismatch:
            broken.append(Finding("checksum-mismatch", item.obj.key, tier, mismatch))
            continue
        good += 1
    report.findings.extend(broken)
    listed = {(tier, cls) for _id, tier, cls, _state in rows}
    listed_tiers = {tier for tier, _cls in listed}
    for tier, storage_class in present:
        if (tier, storage_class) in listed or (tier in listed_tiers and not _local(conn, tier)):
            continue
        if tier in listed_tiers:  # local: a second copy in another class folder (a class change cut short)
            finding = Finding("stray-copy", item.obj.key, tier, f"a second copy in {storage_class}")
            report.findings.append(finding)
            if repair and good:
                tiers.delete_copy(conn, item.obj.key, tier, storage_class)
                finding.repaired = "deleted (the recorded copy is good)"
            continue
        finding = Finding(
            "unrecorded-copy", item.obj.key, tier, f"a copy in {storage_class} the index does not list"
        )
        report.findings.append(finding)
        if repair:
            finding.repaired = _adopt_copy(
                conn, item, tier, storage_class, present[(tier, storage_class)], deep
            )
            good += finding.repaired == "recorded"
    if good == 0 and broken:
        if item.obj.version_id is not None:
            finding = Finding("version-missing", item.obj.key, item.obj.home, "no good copy left")
            report.findings.append(finding)
            if repair:
                _set_pending(conn, item.obj)
                finding.repaired = "version set pending: the reconciler derives it again"
        else:
            report.findings.append(
                Finding("lost", item.obj.key, item.obj.home, "no good copy of the original")
            )
        return
    if repair:
        for finding in broken:
            finding.repaired = _drop_or_mark(conn, item, finding)


def _local(conn: Connections, tier: str) -> bool:
    from gateway.storage.local import LocalBucket

    return isinstance(tiers.tier_bucket(conn, tier), LocalBucket)


def _set_class(conn: Connections, obj: ObjectKey, tier: str, storage_class: str) -> None:
    with session_scope(conn.sessions) as session:
        row = session.execute(
            select(Location).where(Location.tier == tier, Location.key == obj.key)
        ).scalar_one_or_none()
        if row is not None:
            row.storage_class = storage_class


def _mismatch(
    conn: Connections, item: Recorded, tier: str, storage_class: str, size: int, deep: bool
) -> str | None:
    if size != item.size:
        return f"{size} bytes, the index says {item.size}"
    if deep and storage_class not in ARCHIVE:
        _size, digest = tiers.checksum(conn, item.obj.key, tier, storage_class)
    else:
        info = tiers.head(conn, item.obj.key, tier, storage_class)
        digest = info.sha256 if info is not None else None
    if digest is not None and digest != item.sha256:
        return f"sha256 {digest[:12]}..., the index says {item.sha256[:12]}..."
    return None


def _drop_or_mark(conn: Connections, item: Recorded, finding: Finding) -> str:
    with session_scope(conn.sessions) as session:
        row = session.execute(
            select(Location).where(Location.tier == finding.tier, Location.key == item.obj.key)
        ).scalar_one_or_none()
        if finding.kind == "missing-object":
            if row is not None:
                session.delete(row)
            return "row dropped (another good copy exists)"
        if row is None:
            bucket = tiers.tier_bucket(conn, finding.tier).name
            row = tiers.record_copy(
                session, item.obj, finding.tier, bucket, "STANDARD", item.size, item.sha256, verified=False
            )
        row.state = "corrupt"
    return "marked corrupt (readers skip it; another good copy exists)"


def _adopt_copy(
    conn: Connections, item: Recorded, tier: str, storage_class: str, size: int, deep: bool
) -> str:
    if _mismatch(conn, item, tier, storage_class, size, deep):
        tiers.delete_copy(conn, item.obj.key, tier, storage_class)
        return "deleted (its bytes are not the recorded ones)"
    with session_scope(conn.sessions) as session:
        if not item.rows and (tier, storage_class) != (item.obj.home, "STANDARD"):
            home = tiers.tier_bucket(conn, item.obj.home).name  # the implicit home copy gets its row too
            if tiers.exists(conn, item.obj.key, item.obj.home, "STANDARD"):
                tiers.record_copy(session, item.obj, item.obj.home, home, "STANDARD", item.size, item.sha256,
                                  verified=False)  # fmt: skip
        bucket = tiers.tier_bucket(conn, tier).name
        tiers.record_copy(
            session, item.obj, tier, bucket, storage_class, item.size, item.sha256, verified=deep
        )
    return "recorded"


def _set_pending(conn: Connections, obj: ObjectKey) -> None:
    with session_scope(conn.sessions) as session:
        row = session.get(Version, (obj.ref.sop_uid, obj.version_id))
        if row is not None:
            row.state = "pending"
            row.reason = "fsck: the version object was lost"


def _check_orphan(conn: Connections, item: rebuild.Found, report: FsckReport, repair: bool) -> None:
    obj = item.obj
    for tier, storage_class, _size in item.copies:
        report.findings.append(
            Finding("orphan-object", obj.key, tier, f"in {storage_class}, not in the index")
        )
    if not repair:
        return
    fixed: str
    try:
        if obj.version_id is None:
            adopted = rebuild.adopt_original(conn, item, [], rebuild.RebuildReport())
            fixed = "indexed as its instance" if adopted else "already indexed"
        else:
            with session_scope(conn.sessions) as session:
                known = session.get(Instance, obj.ref.sop_uid) is not None
            if known:
                rebuild.adopt_version(conn, item)
                fixed = "indexed as a ready version"
            else:
                for tier, storage_class, _size in item.copies:
                    tiers.delete_copy(conn, obj.key, tier, storage_class)
                fixed = "deleted (a version of an instance the index does not have)"
        if obj.version_id is None or fixed.startswith("indexed"):
            rebuild.record_locations(conn, item)
    except (GatewayError, InstanceRejected) as exc:
        fixed = ""
        log.warning("fsck could not repair %s: %s", obj.key, getattr(exc, "detail", exc))
    for finding in report.findings[-len(item.copies) :]:
        finding.repaired = fixed or None
