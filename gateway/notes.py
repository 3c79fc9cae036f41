"""Reading notes as a DICOM instance: a Basic Text SR (Completion Flag PARTIAL, the gateway's own
Document Title) in the study, stored through ingest like any STOW part, so every viewer that
retrieves the study gets the notes with the images. Core: no Flask."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from sqlalchemy import func, select

from gateway import diagnosis, logs
from gateway.connections import Connections
from gateway.errors import InvalidParameter, ObjectNotFound
from gateway.index.db import session_scope
from gateway.index.models import Instance, Study
from gateway.ingest import Stored, ingest
from gateway.uids import check_uid, new_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
# The Document Title that marks gateway notes; access.yaml's "reading notes" rule matches on it.
# A private coding scheme (PS3.16 8.2: "99" prefix for local schemes).
NOTES_TITLE = ("NOTES", "99DCMWEBGW", "Reading notes")
COMMENT = ("121106", "DCM", "Comment")
PERSON_OBSERVER = ("121008", "DCM", "Person Observer Name")
MAX_TEXT = 100_000
SERIES_NUMBER = 9901


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def notes_series_uid(study_uid: str, uid_root: str) -> str:
    """One notes series per study, the same UID every time (UUID-derived from the study UID)."""
    digits = str(uuid.uuid5(uuid.NAMESPACE_OID, f"dicomweb-gateway-notes:{study_uid}").int)
    return (uid_root + digits)[:64].rstrip(".")


def notes_dataset(
    study_attributes: str, text: str, author: str, series_uid: str, sop_uid: str, number: int
) -> Dataset:
    """The SR: the study's patient and study attributes, then a container titled NOTES_TITLE holding
    the author (HAS OBS CONTEXT) and one TEXT item (PS3.3 A.35.1 Basic Text SR)."""
    ds = Dataset.from_json(json.loads(study_attributes or "{}"))
    now = datetime.now(UTC)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the notes and the copied names, whatever they hold
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "SR"
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "Reading notes"
    ds.InstanceNumber = number
    ds.Manufacturer = "dicomweb-s3-gateway"
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        if keyword not in ds:
            setattr(ds, keyword, "")  # Type 2 in the Patient and General Study modules
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code(*NOTES_TITLE)])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    observer = Dataset()
    observer.RelationshipType = "HAS OBS CONTEXT"
    observer.ValueType = "PNAME"
    observer.ConceptNameCodeSequence = Sequence([_code(*PERSON_OBSERVER)])
    observer.PersonName = author.replace("^", " ").replace("=", " ").replace("\\", " ")[:64]
    comment = Dataset()
    comment.RelationshipType = "CONTAINS"
    comment.ValueType = "TEXT"
    comment.ConceptNameCodeSequence = Sequence([_code(*COMMENT)])
    comment.TextValue = text
    ds.ContentSequence = Sequence([observer, comment])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def store_notes(conn: Connections, study_uid: str, text: str, who: str, role: str) -> Stored:
    """Make the notes SR and store it through ingest (original, index, status rules).

    Raises:
        InvalidParameter: empty or oversized text. ObjectNotFound: no such study.
        Unavailable: S3, Redis or the index failed (nothing half-written, as for STOW).
    """
    check_uid(study_uid, "StudyInstanceUID")
    text = text.strip()
    if not text:
        raise InvalidParameter("the notes are empty", parameter="text")
    if len(text) > MAX_TEXT:
        raise InvalidParameter(f"the notes exceed {MAX_TEXT} characters", parameter="text")
    series_uid = notes_series_uid(study_uid, conn.settings.uid_root)
    with session_scope(conn.sessions) as session:
        attributes = session.execute(select(Study.attributes).where(Study.study_uid == study_uid)).scalar()
        if attributes is None:
            raise ObjectNotFound(f"no study {study_uid}")
        count = session.execute(select(func.count()).where(Instance.series_uid == series_uid)).scalar() or 0
    sop_uid = new_uid(conn.settings.uid_root)
    ds = notes_dataset(attributes, text, who, series_uid, sop_uid, int(count) + 1)
    spool = Path(conn.settings.data_dir) / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(dir=spool, prefix="notes-", suffix=".dcm")
    os.close(handle)
    try:
        dcmwrite(path, ds, enforce_file_format=True)
        data = Path(path).read_bytes()
        stored = ingest(conn, path, hashlib.sha256(data).hexdigest(), len(data), study_uid)
    finally:
        Path(path).unlink(missing_ok=True)
    # ingest applies the status rules too once wired; a second pass is a no-op (never backwards).
    diagnosis.on_instance_stored(conn, study_uid, BASIC_TEXT_SR, ds, who=who, role=role)
    logs.audit("notes", who, role, study=study_uid, series=series_uid, instance=sop_uid, why="reading notes")
    return stored
