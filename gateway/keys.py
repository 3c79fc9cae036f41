"""Every object key of DESIGN.md's bucket layout, and nothing else."""

from __future__ import annotations

from gateway.uids import InstanceRef, check_uid


def study_prefix(study_uid: str) -> str:
    return f"studies/{check_uid(study_uid, 'StudyInstanceUID')}/"


def series_prefix(study_uid: str, series_uid: str) -> str:
    return f"{study_prefix(study_uid)}series/{check_uid(series_uid, 'SeriesInstanceUID')}/"


def original(ref: InstanceRef) -> str:
    ref.checked()
    return f"studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}.dcm"


def instance_prefix(ref: InstanceRef) -> str:
    ref.checked()
    return f"studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}/"


def version(ref: InstanceRef, version_id: str) -> str:
    return f"{instance_prefix(ref)}{version_id}.dcm"


def reduced(ref: InstanceRef, version_id: str, columns: int, rows: int) -> str:
    return f"{instance_prefix(ref)}{version_id}@{columns}x{rows}.dcm"


def thumbnail(ref: InstanceRef) -> str:
    return f"{instance_prefix(ref)}thumbnail.jpg"


def series_metadata(study_uid: str, series_uid: str) -> str:
    return f"{series_prefix(study_uid, series_uid)}metadata.json.gz"


def study_record(study_uid: str) -> str:
    return f"{study_prefix(study_uid)}study.json"
