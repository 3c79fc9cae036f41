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
