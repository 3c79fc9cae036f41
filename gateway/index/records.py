"""Index writes: one instance (with its study and series rows), and look-ups STOW needs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gateway.index.models import Instance, Series, Study, Version

# PS3.18 Table 10.6.3-3 and the Patient / General Study modules: kept on the study row for includefield.
STUDY_TAGS = frozenset(
    {
        "00080005",
        "00080020",
        "00080030",
        "00080050",
        "00080051",
        "00080056",
        "00080090",
        "00080201",
        "00081030",
        "00081032",
        "00081060",
        "00100010",
        "00100020",
        "00100021",
        "00100030",
        "00100032",
        "00100040",
        "00101000",
        "00101001",
        "00101010",
        "00101020",
        "00101030",
        "00102160",
        "00104000",
        "0020000D",
        "00200010",
        "00321032",
        "00321060",
        "00401012",
    }
)
SERIES_TAGS = frozenset(
    {
        "00080021",
        "00080031",
        "00080060",
        "00080070",
        "00080080",
        "00081010",
        "00081040",
        "0008103E",
        "00081050",
        "00081070",
        "00081090",
        "00180015",
        "00181030",
        "0020000E",
        "00200011",
        "00200052",
        "00200060",
        "00400244",
        "00400245",
        "00400275",
        "00080064",
    }
)


@dataclass(frozen=True)
class InstanceFacts:
    """Everything the index keeps of one stored instance, extracted once at ingest."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    metadata_gz: bytes
    pixel_layout: str | None
    dataset_json: dict[str, Any]


def _first(document: dict[str, Any], tag: str) -> Any:
    values = document.get(tag, {}).get("Value") or [None]
    return values[0]


def _text(document: dict[str, Any], tag: str, limit: int) -> str | None:
    value = _first(document, tag)
    if value is None:
        return None
    if isinstance(value, dict):  # person name
        value = value.get("Alphabetic")
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def _int(document: dict[str, Any], tag: str) -> int | None:
    value = _first(document, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


_DATE = re.compile(r"^\d{8}$")


def _date(document: dict[str, Any], tag: str) -> str | None:
    """A DA value, or NULL when malformed (DESIGN.md: stored as received, indexed as NULL)."""
    value = _text(document, tag, 16)
    return value if value and _DATE.match(value) else None


def name_norm(value: str | None) -> str | None:
    return value.upper() if value else None


def name_words(value: str | None) -> str | None:
    """' DOE JOHN Q ' - every name component upper-cased, for fuzzy prefix matching with LIKE '% JO%'."""
    if not value:
        return None
    words = [w for w in re.split(r"[\^= ]+", value.upper()) if w]
    return (" " + " ".join(words) + " ") if words else None


def _subset(document: dict[str, Any], tags: frozenset[str]) -> str:
    return json.dumps({tag: document[tag] for tag in sorted(tags) if tag in document}, separators=(",", ":"))


def _insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    session.execute(module.insert(table).values(**values).on_conflict_do_nothing())


def record_instance(session: Session, facts: InstanceFacts) -> None:
    """Index an object already in the originals bucket; never called before the put succeeded.

    Study and series rows are created by the first instance that names them (concurrent stores of one
    study are safe: insert-or-ignore)."""
    doc = facts.dataset_json
    patient_name = _text(doc, "00100010", 324)
    referring = _text(doc, "00080090", 324)
    _insert_ignore(
        session,
        Study.__table__,
        {
            "study_uid": facts.study_uid,
            "patient_id": _text(doc, "00100020", 64),
            "patient_name": patient_name,
            "patient_name_norm": name_norm(patient_name),
            "patient_name_words": name_words(patient_name),
            "patient_birth_date": _date(doc, "00100030"),
            "patient_sex": _text(doc, "00100040", 16),
            "study_date": _date(doc, "00080020"),
            "study_time": _text(doc, "00080030", 16),
            "accession_number": _text(doc, "00080050", 64),
            "study_id": _text(doc, "00200010", 16),
            "study_description": _text(doc, "00081030", 64),
            "referring_physician_name": referring,
            "referring_physician_name_norm": name_norm(referring),
            "referring_physician_name_words": name_words(referring),
            "attributes": _subset(doc, STUDY_TAGS),
            "diagnosis_status": 1,
        },
    )
    _insert_ignore(
        session,
        Series.__table__,
        {
            "series_uid": facts.series_uid,
            "study_uid": facts.study_uid,
            "modality": _text(doc, "00080060", 16),
            "series_number": _int(doc, "00200011"),
            "series_description": _text(doc, "0008103E", 64),
            "series_date": _date(doc, "00080021"),
            "series_time": _text(doc, "00080031", 16),
            "body_part_examined": _text(doc, "00180015", 16),
            "pps_start_date": _date(doc, "00400244"),
            "pps_start_time": _text(doc, "00400245", 16),
            "attributes": _subset(doc, SERIES_TAGS),
        },
    )
    session.add(
        Instance(
            sop_uid=facts.sop_uid,
            series_uid=facts.series_uid,
            study_uid=facts.study_uid,
            sop_class_uid=facts.sop_class_uid,
            instance_number=_int(doc, "00200013"),
            rows=_int(doc, "00280010"),
            columns=_int(doc, "00280011"),
            bits_allocated=_int(doc, "00280100"),
            number_of_frames=_int(doc, "00280008"),
            transfer_syntax_uid=facts.transfer_syntax_uid,
            size=facts.size,
            sha256=facts.sha256,
            pixel_layout=facts.pixel_layout,
            metadata_gz=facts.metadata_gz,
        )
    )
    session.flush()


def find_instance(session: Session, sop_uid: str) -> Instance | None:
    return session.execute(select(Instance).where(Instance.sop_uid == sop_uid)).scalar_one_or_none()


def series_of(session: Session, series_uid: str) -> Series | None:
    return session.get(Series, series_uid)


def record_versions(
    session: Session,
    study_uid: str,
    sop_uid: str,
    version_ids: list[str],
    state: str,
    reason: str | None = None,
) -> None:
    """One row per derived version, in the same transaction as its instance: the index knows what is owed."""
    for version_id in version_ids:
        session.add(
            Version(sop_uid=sop_uid, version_id=version_id, study_uid=study_uid, state=state, reason=reason)
        )
    session.flush()
