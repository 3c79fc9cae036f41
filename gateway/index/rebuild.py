"""`gateway index rebuild`: the index again from the buckets alone (DESIGN.md: the object store is the
source of truth). Originals are re-read (header, DICOM JSON, pixel layout, SHA-256) and indexed as
ingest does; versions come back from the hot (or cold) objects and their metadata (transfer syntax,
ratio, PSNR, SHA-256, written by workers/derive.py); every copy in every tier and class gets its
location row; each study's diagnosis status and history come from its study.json, else from the
SR/GSPS/SEG objects stored in it (the status rules of access.yaml).

An original only in an archive class cannot be read without a restore: its instance row is built from
its object metadata and the header of its lossless (or any) version, with no pixel layout, and a
restore is started; a rebuild once it is restored completes the row. Core: no Flask."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from gateway import diagnosis, tiers
from gateway.connections import Connections
from gateway.dicomfile import read_header
from gateway.dicomjson import compress, instance_json
from gateway.errors import GatewayError, InstanceRejected, ObjectNotFound, RulesError
from gateway.index.db import session_scope
from gateway.index.models import DiagnosisEvent, Instance, Location, Series, Study, Version
from gateway.index.records import InstanceFacts, record_instance, record_versions
from gateway.storage import file_sha256
from gateway.tiers import ObjectKey
from gateway.uids import InstanceRef
from policies.lifecycle import ARCHIVE
from policies.rules import Kind
from policies.status import DiagnosisStatus

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    instances: int = 0
    versions: int = 0
    locations: int = 0
    studies_from_record: int = 0
    studies_from_objects: int = 0
    partial: list[str] = field(default_factory=list)  # originals rebuilt without their pixel layout
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"instances indexed: {self.instances}",
            f"versions indexed: {self.versions}",
            f"locations recorded: {self.locations}",
            f"diagnosis status from study.json: {self.studies_from_record}, from stored objects: "
            f"{self.studies_from_objects}",
        ]
        out += [f"archived, indexed from its version until restored: {key}" for key in self.partial]
        out += [f"problem: {problem}" for problem in self.problems]
        return out


@dataclass
class Found:
    """Every copy of one object found in the buckets: (tier, storage class, size)."""

    obj: ObjectKey
    copies: list[tuple[str, str, int]] = field(default_factory=list)

    def readable(self) -> tuple[str, str] | None:
        """The best copy to read: home first, then instant classes; None when only archive copies."""
        ranked = sorted(
            self.copies, key=lambda c: (c[1] in ARCHIVE, c[0] != self.obj.home, c[1] != "STANDARD")
        )
        best = ranked[0] if ranked else None
        return (best[0], best[1]) if best is not None and best[1] not in ARCHIVE else None


def scan(conn: Connections) -> tuple[dict[str, Found], set[str]]:
    """Every original and version in every tier, by key; and the studies whose study.json exists."""
    found: dict[str, Found] = {}
    records: set[str] = set()
    for tier in tiers.TIERS:
        for key, storage_class, size in tiers.list_copies(conn, tier):
            obj = tiers.parse_key(key)
            if obj is None:
                if tier == "originals" and key.endswith("/study.json"):
                    records.add(key.split("/")[1])
                continue
            found.setdefault(key, Found(obj)).copies.append((tier, storage_class, size))
    return found, records


def wipe_index(conn: Connections) -> None:
    """Empty every table the buckets can refill (client profiles are settings, not data: kept)."""
    with session_scope(conn.sessions) as session:
        for table in (Location, Version, DiagnosisEvent, Instance, Series, Study):
            session.execute(delete(table))


def rebuild(conn: Connections, wipe: bool = False) -> RebuildReport:
    """Index every object the buckets hold that the index lacks; with `wipe`, start from empty."""
    if wipe:
        wipe_index(conn)
    report = RebuildReport()
    found, records = scan(conn)
    originals = [f for f in found.values() if f.obj.version_id is None]
    versions = [f for f in found.values() if f.obj.version_id is not None]
    by_sop = {f.obj.ref.sop_uid: f for f in originals}
    studies: set[str] = set()
    # In the order they were stored, as far as the buckets tell: a study row keeps the study-level
    # attributes of the first instance stored (gateway/index/records.py).
    for item in sorted(originals, key=lambda f: (_stored_at(conn, f), f.obj.key)):
        try:
            if adopt_original(conn, item, versions, report):
                report.instances += 1
            studies.add(item.obj.ref.study_uid)
        except (GatewayError, InstanceRejected) as exc:
            report.problems.append(f"{item.obj.key}: {getattr(exc, 'detail', exc)}")
    for item in sorted(versions, key=lambda f: f.obj.key):
        if item.obj.ref.sop_uid not in by_sop:
            report.problems.append(f"{item.obj.key}: a version without its original")
            continue
        try:
            if adopt_version(conn, item):
                report.versions += 1
        except (GatewayError, InstanceRejected) as exc:
            report.problems.append(f"{item.obj.key}: {getattr(exc, 'detail', exc)}")
    for item in found.values():
        report.locations += record_locations(conn, item)
    for study_uid in sorted(studies):
        source = restore_status(conn, study_uid, study_uid in records)
        if source == "record":
            report.studies_from_record += 1
        elif source == "objects":
            report.studies_from_objects += 1
    log.info("index rebuilt: %s", "; ".join(report.lines()[:4]))
    return report


# --- originals ----------------------------------------------------------------------------------------------


def _stored_at(conn: Connections, item: Found) -> datetime:
    tier, storage_class, _size = item.copies[0]
    return tiers.ingested_at(conn, item.obj.key, tier, storage_class) or datetime.max.replace(tzinfo=UTC)


def _download(conn: Connections, key: str, tier: str, storage_class: str, folder: str) -> str:
    path = os.path.join(folder, "object.dcm")
    with tiers.store(conn, tier, storage_class).open(key) as body, open(path, "wb") as out:
        shutil.copyfileobj(body, out, 1 << 20)
    return path


def adopt_original(conn: Connections, item: Found, versions: list[Found], report: RebuildReport) -> bool:
    """Index one original found in the buckets, as ingest would have; False when already indexed. A row
    indexed from a version while the original was archived is completed once the original is readable."""
    obj = item.obj
    with session_scope(conn.sessions) as session:
        if session.get(Instance, obj.ref.sop_uid) is not None:
            if _partial(session, obj.ref.sop_uid) and (where := _readable_now(conn, item)) is not None:
                _complete(conn, item, where)
            return False
    source = item.readable()
    with tempfile.TemporaryDirectory(prefix="rebuild-") as work:
        if source is not None:
            path = _download(conn, obj.key, *source, work)
            header, layout = read_header(path)
            size, sha256 = os.path.getsize(path), file_sha256(path)
            recorded = tiers.head(conn, obj.key, *source)
            if recorded is not None and recorded.sha256 and recorded.sha256 != sha256:
                report.problems.append(f"{obj.key}: sha256 in its metadata differs from its bytes")
            syntax = str(header.file_meta.TransferSyntaxUID)
            created = tiers.ingested_at(conn, obj.key, *source)
        else:
            header, layout, size, sha256, syntax, created = _from_version(conn, item, versions, work)
            report.partial.append(obj.key)
    facts = InstanceFacts(
        study_uid=obj.ref.study_uid,
        series_uid=obj.ref.series_uid,
        sop_uid=obj.ref.sop_uid,
        sop_class_uid=str(header.SOPClassUID),
        transfer_syntax_uid=syntax,
        size=size,
        sha256=sha256,
        metadata_gz=compress(instance_json(header, obj.ref, layout)),
        pixel_layout=layout.to_json() if layout else None,
        dataset_json=instance_json(header, obj.ref, layout),
    )
    rules = conn.rules.versions
    wanted, why_not = rules.gets_versions(facts.sop_class_uid, syntax, layout is not None or source is None)
    try:
        with session_scope(conn.sessions) as session:
            record_instance(session, facts)
            record_versions(
                session, obj.ref.study_uid, obj.ref.sop_uid, [v.id for v in rules.derived],
                "pending" if wanted else "skipped", None if wanted else why_not,
            )  # fmt: skip
            if created is not None:
                session.execute(
                    update(Instance).where(Instance.sop_uid == obj.ref.sop_uid).values(created_at=created)
                )
    except IntegrityError:
        return False  # indexed meanwhile (a STOW of the same instance)
    return True


def _from_version(
    conn: Connections, item: Found, versions: list[Found], work: str
) -> tuple[Dataset, Any, int, str, str, datetime | None]:
    """An archived original: size, SHA-256 and syntax from its object, attributes from a version."""
    tier, storage_class, size = next(c for c in item.copies)
    info = tiers.head(conn, item.obj.key, tier, storage_class)
    _size, checksum = tiers.checksum(conn, item.obj.key, tier, storage_class)
    sha256 = checksum or (info.sha256 if info else None)
    syntax = (info.metadata.get("transfer-syntax") if info else None) or ""
    if not sha256 or not syntax:
        raise ObjectNotFound(f"{item.obj.key} is archived and its object carries no checksum or syntax")
    siblings = sorted(
        (v for v in versions if v.obj.ref.sop_uid == item.obj.ref.sop_uid and v.readable()),
        key=lambda v: v.obj.version_id != "lossless",
    )
    if not siblings:
        raise ObjectNotFound(f"{item.obj.key} is archived and no version of it is readable")
    where = siblings[0].readable()
    assert where is not None
    header, _layout = read_header(_download(conn, siblings[0].obj.key, *where, work))
    header.file_meta.TransferSyntaxUID = syntax
    try:
        tiers.request_restore(conn, item.obj.key, tier, storage_class, tiers.lifecycle_rules(conn).restore)
    except (GatewayError, RulesError) as exc:
        log.warning("restore of %s not started: %s", item.obj.key, getattr(exc, "detail", exc))
    return header, None, size, sha256, syntax, tiers.ingested_at(conn, item.obj.key, tier, storage_class)


def _partial(session: Any, sop_uid: str) -> bool:
    """Indexed from a version: no pixel layout, though versions were made (so it has pixel data)."""
    row = session.get(Instance, sop_uid)
    if row is None or row.pixel_layout is not None:
        return False
    ready = select(Version.version_id).where(Version.sop_uid == sop_uid, Version.state == "ready")
    return session.execute(ready).first() is not None


def _readable_now(conn: Connections, item: Found) -> tuple[str, str] | None:
    """A copy to read now: an instant one, else an archive copy whose restore is ready."""
    found = item.readable()
    if found is not None:
        return found
    for tier, storage_class, _size in item.copies:
        if tiers.restore_status(conn, item.obj.key, tier, storage_class).state == "ready":
            return tier, storage_class
    return None


def _complete(conn: Connections, item: Found, source: tuple[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="rebuild-") as work:
        header, layout = read_header(_download(conn, item.obj.key, *source, work))
    document = instance_json(header, item.obj.ref, layout)
    with session_scope(conn.sessions) as session:
        row = session.get(Instance, item.obj.ref.sop_uid)
        if row is not None:
            row.metadata_gz = compress(document)
            row.pixel_layout = layout.to_json() if layout else None
    log.info("index row of %s completed from its restored original", item.obj.key)


# --- versions -----------------------------------------------------------------------------------------------


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return None if number is None or math.isinf(number) or math.isnan(number) else number


def adopt_version(conn: Connections, item: Found) -> bool:
    """Mark a version ready with the facts its object carries; False when the index has it already."""
    obj = item.obj
    assert obj.version_id is not None
    rules = conn.rules.versions
    spec = rules.by_id(obj.version_id)
    with session_scope(conn.sessions) as session:
        row = session.get(Version, (obj.ref.sop_uid, obj.version_id))
        instance = session.get(Instance, obj.ref.sop_uid)
        if instance is None or (row is not None and row.state == "ready"):
            return False
        series = session.get(Series, obj.ref.series_uid)
        study = session.get(Study, obj.ref.study_uid)
        facts = (
            series.modality if series else None,
            series.body_part_examined if series else None,
            study.study_description if study else None,
            series.series_description if series else None,
        )
    source = item.readable() or (item.copies[0][0], item.copies[0][1])
    info = tiers.head(conn, obj.key, *source)
    metadata = info.metadata if info is not None else {}
    frames = None
    sha256 = (info.sha256 if info else None) or metadata.get("sha256")
    size = info.size if info else item.copies[0][2]
    if item.readable() is not None:
        with tempfile.TemporaryDirectory(prefix="rebuild-") as work:
            path = _download(conn, obj.key, *source, work)
            _header, layout = read_header(path)
            frames = layout.to_json() if layout else None
            sha256 = file_sha256(path)
            size = os.path.getsize(path)
    target = None
    if spec is not None and spec.kind is Kind.LOSSY:
        target = rules.target_ratio(spec.id, *facts)
    values = {
        "state": "ready",
        "reason": None,
        "transfer_syntax_uid": metadata.get("transfer-syntax")
        or (str(spec.transfer_syntax) if spec else None),
        "size": size,
        "sha256": sha256,
        "target_ratio": target,
        "ratio": _number(metadata.get("ratio")),
        "psnr": _number(metadata.get("psnr")),
        "frames": frames,
    }
    with session_scope(conn.sessions) as session:
        row = session.get(Version, (obj.ref.sop_uid, obj.version_id))
        if row is None:
            row = Version(sop_uid=obj.ref.sop_uid, version_id=obj.version_id, study_uid=obj.ref.study_uid)
            session.add(row)
        for name, value in values.items():
            setattr(row, name, value)
    _skip_reached(conn, obj)
    return True


def _skip_reached(conn: Connections, obj: ObjectKey) -> None:
    """Lossy versions derive skipped because the lossless ratio already reached their target get the
    same state and reason back (DESIGN.md "Details settled")."""
    if obj.version_id != "lossless":
        return
    with session_scope(conn.sessions) as session:
        rows = {
            r.version_id: r
            for r in session.execute(select(Version).where(Version.sop_uid == obj.ref.sop_uid)).scalars()
        }
        lossless = rows.get("lossless")
        if lossless is None or lossless.ratio is None:
            return
        series = session.get(Series, obj.ref.series_uid)
        study = session.get(Study, obj.ref.study_uid)
        rules = conn.rules.versions
        for spec in rules.derived:
            row = rows.get(spec.id)
            if spec.kind is not Kind.LOSSY or row is None or row.state != "pending":
                continue
            target = rules.target_ratio(
                spec.id,
                series.modality if series else None,
                series.body_part_examined if series else None,
                study.study_description if study else None,
                series.series_description if series else None,
            )
            if lossless.ratio >= target:
                row.state = "skipped"
                row.target_ratio = target
                row.reason = f"lossless already reaches 1/{lossless.ratio:.1f}, target 1/{target:g}"


# --- locations ----------------------------------------------------------------------------------------------


def record_locations(conn: Connections, item: Found) -> int:
    """A row for every copy found (the checksum as the store reports it, else the index's)."""
    obj = item.obj
    with session_scope(conn.sessions) as session:
        instance = session.get(Instance, obj.ref.sop_uid)
        if instance is None:
            return 0
        if obj.version_id is None:
            size, sha256 = int(instance.size), instance.sha256
        else:
            version = session.get(Version, (obj.ref.sop_uid, obj.version_id))
            if version is None or version.state != "ready" or not version.sha256:
                return 0
            size, sha256 = int(version.size or 0), version.sha256
    count = 0
    for tier, storage_class, found_size in item.copies:
        info = tiers.head(conn, obj.key, tier, storage_class)
        stored_sha = info.sha256 if info is not None else None
        verified = stored_sha == sha256 and found_size == size
        since = tiers.last_modified(conn, obj.key, tier, storage_class)
        with session_scope(conn.sessions) as session:
            exists = session.execute(
                select(Location.id).where(Location.tier == tier, Location.key == obj.key)
            ).first()
            if exists is not None:
                continue
            tiers.record_copy(
                session, obj, tier, tiers.tier_bucket(conn, tier).name, storage_class, found_size,
                stored_sha or sha256, since=since, verified=verified,
            )  # fmt: skip
        count += 1
    return count


# --- diagnosis status ---------------------------------------------------------------------------------------


def _normalised(data: Any, study_uid: str) -> dict[str, Any] | None:
    """study.json as gateway/diagnosis.py writes it ({"diagnosis": {"status", "history"}}), or the flat
    shape {"status", "history"}; anything else is ignored (read defensively: it is a bucket object)."""
    if not isinstance(data, dict):
        return None
    inner = data.get("diagnosis") if isinstance(data.get("diagnosis"), dict) else data
    try:
        status = DiagnosisStatus.parse(inner.get("status", 1))
    except ValueError:
        return None
    history = [
        h for h in (inner.get("history") or [])
        if isinstance(h, dict) and {"at", "from", "to"} <= set(h)
    ]  # fmt: skip
    return {"study_uid": study_uid, "diagnosis": {"status": int(status), "history": history}}


def restore_status(conn: Connections, study_uid: str, has_record: bool) -> str | None:
    """The study's status from its study.json ("record"), else from its stored diagnosis objects
    ("objects"); None when neither says anything (the study stays unread)."""
    with session_scope(conn.sessions) as session:
        known = session.execute(
            select(DiagnosisEvent.id).where(DiagnosisEvent.study_uid == study_uid)
        ).first()
    if known is not None:
        return None  # the index kept its history: nothing to restore
    if has_record:
        try:
            data = _normalised(diagnosis.read_record(conn, study_uid), study_uid)
        except (GatewayError, ValueError) as exc:
            log.warning("study.json of %s unreadable: %s", study_uid, getattr(exc, "detail", exc))
            data = None
        if data is not None:
            try:
                diagnosis.apply_record(conn, data)
                return "record"
            except (GatewayError, ValueError, KeyError) as exc:
                log.warning("study.json of %s not applied: %s", study_uid, getattr(exc, "detail", exc))
    changed = False
    with session_scope(conn.sessions) as session:
        objects = session.execute(
            select(Instance.sop_uid, Instance.sop_class_uid).where(Instance.study_uid == study_uid)
        ).all()
    for sop_uid, sop_class in objects:
        header = _header_of(conn, study_uid, sop_uid)
        if header is None:
            continue
        try:
            change = diagnosis.on_instance_stored(conn, study_uid, sop_class, header, who="index rebuild")
        except (GatewayError, RulesError) as exc:
            log.warning(
                "status of %s from %s not applied: %s", study_uid, sop_uid, getattr(exc, "detail", exc)
            )
            continue
        changed = changed or change is not None
    return "objects" if changed else None


def _header_of(conn: Connections, study_uid: str, sop_uid: str) -> Dataset | None:
    """The header of an object the status rules may look at (only SR/PR/SEG-like classes are read)."""
    rules = conn.rules.access.status_rules
    with session_scope(conn.sessions) as session:
        row = session.get(Instance, sop_uid)
        if row is None or not any(r.may_apply(row.sop_class_uid) for r in rules):
            return None
        obj = ObjectKey(InstanceRef(study_uid, row.series_uid, sop_uid), None)
    try:
        with tempfile.TemporaryDirectory(prefix="rebuild-") as work:
            path = os.path.join(work, "object.dcm")
            with tiers.originals(conn).open(obj.key) as body, open(path, "wb") as out:
                shutil.copyfileobj(body, out, 1 << 20)
            header, _layout = read_header(path)
            return header
    except (GatewayError, InstanceRejected):
        return None
