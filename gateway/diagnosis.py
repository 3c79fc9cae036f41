"""Per-study diagnosis status. The index is the truth, Redis the hot copy (rebuilt from the index when
Redis lost it), and `study.json` in the originals bucket the record an index rebuild reads back.
Stored objects advance the status by access.yaml's status rules, never backwards. Core: no Flask."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from gateway import keys, logs
from gateway.connections import Connections
from gateway.errors import GatewayError, ObjectNotFound
from gateway.index.db import session_scope
from gateway.index.models import DiagnosisEvent, Study
from gateway.uids import check_uid
from policies.status import DiagnosisStatus, ObjectFacts, may_advance, status_for

log = logging.getLogger(__name__)

# Bounds how long a hot copy can stay stale if Redis missed a write while it was down.
HOT_COPY_SECONDS = 600
RECORD_SCHEMA = 1
_CAS_ATTEMPTS = 8


def status_key(study_uid: str) -> str:
    return f"gw:diagnosis:{study_uid}"


@dataclass(frozen=True)
class Change:
    study_uid: str
    from_status: int
    to_status: int
    at: str  # ISO 8601, UTC
    who: str
    role: str | None
    source: str
    sop_uid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def from_index(conn: Connections, study_uid: str) -> DiagnosisStatus:
    """Raises ObjectNotFound when the study is not indexed."""
    with session_scope(conn.sessions) as session:
        value = session.execute(
            select(Study.diagnosis_status).where(Study.study_uid == check_uid(study_uid, "StudyInstanceUID"))
        ).scalar_one_or_none()
    if value is None:
        raise ObjectNotFound(f"no study {study_uid}")
    return DiagnosisStatus(int(value))


def remember(conn: Connections, study_uid: str, status: DiagnosisStatus) -> None:
    """Refresh the hot copy; a Redis fault only costs the next reader an index look-up."""
    try:
        conn.redis.set(status_key(study_uid), int(status), ex=HOT_COPY_SECONDS)
    except redis.RedisError as exc:
        log.warning("diagnosis hot copy of %s not written: %s", study_uid, type(exc).__name__)


def current(conn: Connections, study_uid: str) -> DiagnosisStatus:
    """Redis first; on a miss the index, and the hot copy rebuilt. Redis down: the index, never a guess.

    Raises:
        ObjectNotFound: no such study.
    """
    check_uid(study_uid, "StudyInstanceUID")
    try:
        raw = conn.redis.get(status_key(study_uid))
    except redis.RedisError as exc:
        log.warning(
            "Redis down, diagnosis status of %s read from the index: %s", study_uid, type(exc).__name__
        )
        return from_index(conn, study_uid)
    if raw is not None:
        return DiagnosisStatus(int(raw))
    status = from_index(conn, study_uid)
    remember(conn, study_uid, status)
    return status


def set_status(
    conn: Connections, study_uid: str, new: DiagnosisStatus, who: str, role: str | None, source: str = "api"
) -> Change | None:
    """Set any status, backwards too (DESIGN.md: to correct a mistake). None when it already was.

    Raises:
        ObjectNotFound: no such study.
    """
    return _change(conn, study_uid, new, who, role, source, None, backwards=True)


def advance(
    conn: Connections,
    study_uid: str,
    new: DiagnosisStatus,
    who: str,
    role: str | None,
    source: str,
    sop_uid: str | None = None,
) -> Change | None:
    """Move the status forward to `new`; None when the study is already there or beyond."""
    return _change(conn, study_uid, new, who, role, source, sop_uid, backwards=False)


def _change(
    conn: Connections,
    study_uid: str,
    new: DiagnosisStatus,
    who: str,
    role: str | None,
    source: str,
    sop_uid: str | None,
    backwards: bool,
) -> Change | None:
    """Compare-and-set on the index row (safe with concurrent writers on SQLite and PostgreSQL),
    the history row in the same transaction; then the hot copy, study.json and the audit record."""
    check_uid(study_uid, "StudyInstanceUID")
    change = None
    for _attempt in range(_CAS_ATTEMPTS):
        with session_scope(conn.sessions) as session:
            old_value = session.execute(
                select(Study.diagnosis_status).where(Study.study_uid == study_uid)
            ).scalar_one_or_none()
            if old_value is None:
                raise ObjectNotFound(f"no study {study_uid}")
            old = DiagnosisStatus(int(old_value))
            if old == new or (not backwards and not may_advance(old, new)):
                remember(conn, study_uid, old)
                return None
            swapped = session.execute(
                update(Study)
                .where(Study.study_uid == study_uid, Study.diagnosis_status == int(old))
                .values(diagnosis_status=int(new))
            ).rowcount
            if not swapped:
                continue  # another writer changed it between our read and write: read again
            now = datetime.now(UTC)
            session.add(
                DiagnosisEvent(
                    study_uid=study_uid,
                    at=now,
                    who=who[:256],
                    role=role,
                    from_status=int(old),
                    to_status=int(new),
                    source=source[:200],
                    sop_uid=sop_uid,
                )
            )
            change = Change(study_uid, int(old), int(new), now.isoformat(), who, role, source, sop_uid)
        break
    if change is None:
        raise GatewayError(
            f"the diagnosis status of {study_uid} kept changing under {_CAS_ATTEMPTS} attempts"
        )
    remember(conn, study_uid, new)
    write_record(conn, study_uid)
    logs.audit(
        "diagnosis",
        who,
        role or "",
        study=study_uid,
        instance=sop_uid,
        from_status=change.from_status,
        to_status=change.to_status,
        why=source,
    )
    return change


def history(conn: Connections, study_uid: str) -> list[dict[str, Any]]:
    """Every change, oldest first."""
    with session_scope(conn.sessions) as session:
        rows = (
            session.execute(
                select(DiagnosisEvent)
                .where(DiagnosisEvent.study_uid == check_uid(study_uid, "StudyInstanceUID"))
                .order_by(DiagnosisEvent.id)
            )
            .scalars()
            .all()
        )
    return [
        {
            "at": _iso(row.at),
            "who": row.who,
            "role": row.role,
            "from": row.from_status,
            "to": row.to_status,
            "source": row.source,
            "sop_uid": row.sop_uid,
        }
        for row in rows
    ]


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def record(conn: Connections, study_uid: str) -> dict[str, Any]:
    """What study.json holds: the status and its history, read from the index."""
    status = from_index(conn, study_uid)
    return {
        "schema": RECORD_SCHEMA,
        "study_uid": study_uid,
        "diagnosis": {"status": int(status), "name": status.label, "history": history(conn, study_uid)},
    }


def write_record(conn: Connections, study_uid: str) -> bool:
    """Rewrite study.json from the index. The index already holds the change, so a bucket fault is
    logged, not raised; the next change (or `gateway fsck`) writes the record again."""
    try:
        body = json.dumps(record(conn, study_uid), indent=1).encode()
        conn.originals.put_bytes(keys.study_record(study_uid), body)
    except GatewayError as exc:
        log.warning("study.json of %s not written: %s", study_uid, exc.detail)
        return False
    return True


def read_record(conn: Connections, study_uid: str) -> dict[str, Any] | None:
    """study.json as stored, or None (for an index rebuild)."""
    try:
        return json.loads(conn.originals.get_bytes(keys.study_record(study_uid)))
    except ObjectNotFound:
        return None


def apply_record(conn: Connections, data: dict[str, Any]) -> None:
    """Index rebuild: put a study.json's status and history back into a freshly rebuilt index."""
    study_uid = check_uid(str(data["study_uid"]), "StudyInstanceUID")
    diagnosis = data.get("diagnosis") or {}
    status = DiagnosisStatus.parse(diagnosis.get("status", 1))
    with session_scope(conn.sessions) as session:
        session.execute(
            update(Study).where(Study.study_uid == study_uid).values(diagnosis_status=int(status))
        )
        known = session.execute(
            select(DiagnosisEvent.id).where(DiagnosisEvent.study_uid == study_uid)
        ).first()
        if known is None:
            for item in diagnosis.get("history") or []:
                session.add(
                    DiagnosisEvent(
                        study_uid=study_uid,
                        at=datetime.fromisoformat(item["at"]),
                        who=str(item.get("who") or "unknown"),
                        role=item.get("role"),
                        from_status=int(item["from"]),
                        to_status=int(item["to"]),
                        source=str(item.get("source") or "record"),
                        sop_uid=item.get("sop_uid"),
                    )
                )
    remember(conn, study_uid, status)


# --- objects that advance the status ------------------------------------------------------------------------

_COMPLETION_FLAG = "0040A491"
_CONCEPT_NAME = "0040A043"
_CONTENT_TEMPLATE = "0040A504"
_TEMPLATE_ID = "0040DB00"
_CODE_VALUE = "00080100"
_SCHEME = "00080102"
_SOP_UID = "00080018"


def _first(document: dict[str, Any], tag: str) -> Any:
    values = (document.get(tag) or {}).get("Value") or [None]
    return values[0]


def object_facts(sop_class_uid: str, dataset: dict[str, Any] | Dataset) -> ObjectFacts:
    """What the status rules look at, from DICOM JSON (as ingest builds it) or a pydicom data set."""
    if isinstance(dataset, Dataset):
        return _dataset_facts(sop_class_uid, dataset)
    flag = _first(dataset, _COMPLETION_FLAG)
    title = _first(dataset, _CONCEPT_NAME)
    items = (dataset.get(_CONTENT_TEMPLATE) or {}).get("Value") or []
    document_title = None
    if isinstance(title, dict) and _first(title, _CODE_VALUE) is not None:
        document_title = f"{_first(title, _SCHEME)}:{_first(title, _CODE_VALUE)}".upper()
    return ObjectFacts(
        sop_class_uid=sop_class_uid,
        completion_flag=str(flag).upper() if flag else None,
        templates=tuple(str(t) for t in (_first(item, _TEMPLATE_ID) for item in items) if t),
        document_title=document_title,
    )


def _dataset_facts(sop_class_uid: str, ds: Dataset) -> ObjectFacts:
    title = ds.get("ConceptNameCodeSequence") or []
    document_title = None
    if title and title[0].get("CodeValue"):
        document_title = f"{title[0].get('CodingSchemeDesignator', '')}:{title[0].CodeValue}".upper()
    templates = [str(item.get("TemplateIdentifier", "")) for item in ds.get("ContentTemplateSequence") or []]
    flag = ds.get("CompletionFlag")
    return ObjectFacts(
        sop_class_uid=sop_class_uid,
        completion_flag=str(flag).upper() if flag else None,
        templates=tuple(t for t in templates if t),
        document_title=document_title,
    )


def on_instance_stored(
    conn: Connections,
    study_uid: str,
    sop_class_uid: str,
    dataset_json: dict[str, Any] | Dataset,
    who: str = "stored object",
    role: str | None = None,
) -> Change | None:
    """Called by ingest once an instance is stored and indexed (and again for an identical re-store,
    so a retry heals a fault here). Advances the study when the object matches a status rule.

    Raises:
        IndexUnavailable: the index failed (the instance is stored; storing it again retries this).
    """
    rules = [r for r in conn.rules.access.status_rules if r.may_apply(sop_class_uid)]
    if not rules:
        return None  # images: no look inside the data set at all
    rule = status_for(rules, object_facts(sop_class_uid, dataset_json))
    if rule is None:
        return None
    if isinstance(dataset_json, Dataset):
        sop_uid = str(dataset_json.get("SOPInstanceUID", "")) or None
    else:
        sop_uid = _first(dataset_json, _SOP_UID)
    return advance(conn, study_uid, rule.status, who, role, f"rule: {rule.name}", sop_uid)
