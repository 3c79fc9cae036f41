"""Index tables: studies, series, instances. Dates are kept as DICOM strings (YYYYMMDD) so
range matching is a string comparison, identical on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    # Upper-cased copy for case-insensitive matching, and " WORD WORD " for fuzzy prefix matching.
    patient_name_norm: Mapped[str | None] = mapped_column(String(324), index=True)
    patient_name_words: Mapped[str | None] = mapped_column(String(330))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    referring_physician_name_norm: Mapped[str | None] = mapped_column(String(324))
    referring_physician_name_words: Mapped[str | None] = mapped_column(String(330))
    # Study- and patient-level attributes as DICOM JSON text (for includefield).
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    diagnosis_status: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Series(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_date: Mapped[str | None] = mapped_column(String(8))
    series_time: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    pps_start_date: Mapped[str | None] = mapped_column(String(8))
    pps_start_time: Mapped[str | None] = mapped_column(String(16))
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Instance(Base):
    __tablename__ = "instances"

    sop_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid", ondelete="CASCADE"), index=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # Where the pixel data sits in the original: JSON {"native": bool, "frames": [[offset, length], ...]}.
    pixel_layout: Mapped[str | None] = mapped_column(Text)
    # gzip of this instance's DICOM JSON; BulkDataURI values are relative (see gateway.dicomjson).
    metadata_gz: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("ix_instances_series_number", "series_uid", "instance_number"),)


class Version(Base):
    """One derived version of one instance: its state (pending, ready, failed, skipped) and its facts."""

    __tablename__ = "versions"

    sop_uid: Mapped[str] = mapped_column(
        ForeignKey("instances.sop_uid", ondelete="CASCADE"), primary_key=True
    )
    version_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    target_ratio: Mapped[float | None] = mapped_column(Float)
    ratio: Mapped[float | None] = mapped_column(Float)
    psnr: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    # Where each frame's codestream sits in the version object: [[offset, length], ...].
    frames: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class DiagnosisEvent(Base):
    """One change of a study's diagnosis status: who, when, from, to, and what caused it (an API call,
    or the status rule an object stored in the study matched). Mirrored in the study's study.json."""

    __tablename__ = "diagnosis_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    who: Mapped[str] = mapped_column(String(256))
    role: Mapped[str | None] = mapped_column(String(32))
    from_status: Mapped[int] = mapped_column(Integer)
    to_status: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(200))
    sop_uid: Mapped[str | None] = mapped_column(String(64))


class ClientProfileRecord(Base):
    """A client profile an admin registered for a user ("user:NAME") or a group ("group:NAME"):
    display size, decode capability, location, bandwidth. Redis holds the hot copy."""

    __tablename__ = "client_profiles"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    body: Mapped[str] = mapped_column(Text)
    updated_by: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Location(Base):
    """One copy of one object (an original, or a version: version_id set) in one tier's bucket: its
    storage class, size and SHA-256, since when, and the state of an archive restore. An object without
    any row is in its home bucket (originals, or hot for versions) in STANDARD (gateway/tiers.py)."""

    __tablename__ = "locations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_uid: Mapped[str] = mapped_column(ForeignKey("instances.sop_uid", ondelete="CASCADE"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "original" or "version"
    version_id: Mapped[str | None] = mapped_column(String(32))
    tier: Mapped[str] = mapped_column(String(16))  # originals, hot or cold
    bucket: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(512))
    storage_class: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # ok; leaving (the mover deletes this copy: another one is verified); corrupt (checksum mismatch)
    state: Mapped[str] = mapped_column(String(16), default="ok", server_default="ok")
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    restore_state: Mapped[str | None] = mapped_column(String(16))  # requested, ready
    restore_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    restore_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pinned_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("uq_locations_tier_key", "tier", "key", unique=True),)
