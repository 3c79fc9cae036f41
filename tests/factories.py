"""Synthetic DICOM for tests: a valid CT image with random pixels, Part 10 bytes, STOW request bodies."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from gateway.uids import new_uid

DEFAULT_BOUNDARY = "gateway-test-boundary-5f1c9a"


def make_ct(
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
    frames: int = 1,
    **attrs: Any,
) -> Dataset:
    """A CT Image Storage instance, Explicit VR Little Endian, 16-bit random pixels (12 stored).

    `attrs` are DICOM keywords set last (PatientName="Doe^Jane", Modality="MR"); None deletes the element,
    so a test can build an instance that lacks something. With frames > 1 it carries Number of Frames."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or new_uid()
    ds.StudyInstanceUID = study_uid or new_uid()
    ds.SeriesInstanceUID = series_uid or new_uid()
    ds.FrameOfReferenceUID = new_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Gateway Tests"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDescription = "Test study"
    ds.SeriesDescription = "Test series"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.SliceThickness = "1.0"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = "0.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    shape: tuple[int, ...] = (rows, columns)
    if frames > 1:
        ds.NumberOfFrames = frames
        shape = (frames, rows, columns)
    pixels = np.random.default_rng().integers(0, 4096, size=shape, dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", new_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Part 10 bytes: 128-byte preamble, DICM, File Meta group, then the data set in its transfer syntax."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def multipart_body(
    parts: list[bytes] | list[bytes | tuple[str, bytes]],
    boundary: str = DEFAULT_BOUNDARY,
    part_type: str = "application/dicom",
) -> tuple[bytes, str]:
    """A STOW-RS request body and its Content-Type (PS3.18 10.5.1.2, multipart/related).

    A part given as (content type, bytes) carries its own Content-Type instead of `part_type`."""
    chunks: list[bytes] = []
    for part in parts:
        kind, data = part if isinstance(part, tuple) else (part_type, part)
        chunks.append(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return b"".join(chunks), content_type
