"""The instances both servers receive: the valid real files of ../shared/data plus generated CT studies.

Generated instances are deterministic (seeded UIDs and values), so every run and both servers get the same
set; the pixels come from a few precomputed slices, so making 2,000 instances takes seconds, not minutes.
One study holds the long series that the metadata row needs; the others vary patient names, dates and
descriptions the way a study list does.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SIDE = 512

FAMILY = (
    "SMITH",
    "JOHNSON",
    "MÜLLER",
    "GARCIA",
    "NGUYEN",
    "KOWALSKI",
    "ROSSI",
    "DUBOIS",
    "TANAKA",
    "OKAFOR",
    "SILVA",
    "JOHANSSON",
    "O'BRIEN",
    "VAN DER BERG",
    "PETROV",
    "ANDERSEN",
    "MARTIN",
    "LOPEZ",
    "KIM",
    "SINGH",
)
GIVEN = (
    "ANNA",
    "JOHN",
    "MARIA",
    "PETER",
    "LINH",
    "JAN",
    "GIULIA",
    "CLAIRE",
    "HIRO",
    "CHIDI",
    "ANA",
    "ERIK",
    "SEAN",
    "SOPHIE",
    "IVAN",
    "METTE",
    "LUC",
    "CARMEN",
    "MIN",
    "PRIYA",
    "JO",
    "JOHANNA",
)
STUDIES = (
    "CT CHEST W CONTRAST",
    "CT ABDOMEN PELVIS",
    "CT HEAD WO CONTRAST",
    "CT ANGIO PULMONARY",
    "CT LUMBAR SPINE",
    "CT SINUS",
    "CT KNEE RIGHT",
    "CT CARDIAC CALCIUM SCORE",
    "CT THORAX LOW DOSE",
    "CT FOLLOW-UP NODULE",
)
SERIES = ("AXIAL 5MM", "AXIAL 1.25MM", "CORONAL MPR", "SAGITTAL MPR", "SCOUT", "BONE WINDOW", "LUNG WINDOW")
PHYSICIANS = ("WELBY^MARCUS", "HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA", "")


@dataclass(frozen=True)
class Item:
    """One instance to send: its bytes, UIDs and whether its pixels are the generated 512x512 CT."""

    data: bytes
    study_uid: str
    series_uid: str
    sop_uid: str
    source: str
    generated_ct: bool = False


@dataclass(frozen=True)
class BenchSet:
    items: list[Item]
    long_series: tuple[str, str]  # (study, series) of the metadata row's series
    long_series_size: int

    @property
    def total_bytes(self) -> int:
        return sum(len(item.data) for item in self.items)

    def studies(self) -> int:
        return len({item.study_uid for item in self.items})


def uid(*parts: object) -> str:
    """A 2.25 UID derived from the parts (deterministic, so both servers and every run agree)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(UID_PATTERN.match(text))


def shared_items(folder: Path = SHARED_DATA) -> list[Item]:
    """The real files a conformant server must accept: File Meta present, valid UIDs, unique SOP UID.

    The `odd_*` files are broken on purpose and skipped; where two files carry the same SOP Instance UID
    (same image in two syntaxes), only the first in name order is sent, since one store cannot hold both.
    """
    items: list[Item] = []
    seen: set[str] = set()
    for path in sorted(folder.rglob("*.dcm")):
        if path.name.startswith("odd_"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not part of the set
            continue
        uids = [ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not ds.file_meta or not all(valid_uid(u) for u in uids) or str(uids[2]) in seen:
            continue
        seen.add(str(uids[2]))
        items.append(Item(path.read_bytes(), str(uids[0]), str(uids[1]), str(uids[2]), path.name))
    return items


def _slices(count: int, seed: int) -> list[bytes]:
    """A few CT-like slices (body ellipse, bone ring, noise) as little-endian int16 bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) - SIDE / 2
    out = []
    for k in range(count):
        r = (x / (200 + 8 * k)) ** 2 + (y / (150 + 5 * k)) ** 2
        image = np.where(r < 1.0, 40.0, -1000.0)
        image = np.where((r > 0.85) & (r < 0.95), 900.0, image)
        image += rng.normal(0, 25, image.shape)
        out.append(np.clip(image + 1024, 0, 4095).astype("<i2").tobytes())
    return out


def _base() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH"
    ds.InstitutionName = "Bench Hospital"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "5.0"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = SIDE
    ds.Columns = SIDE
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _encode(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def generated_items(count: int, long_series: int = 300, seed: int = 7) -> tuple[list[Item], tuple[str, str]]:
    """`count` CT instances: one study with a `long_series`-instance series, then small varied studies."""
    rng = random.Random(seed)
    slices = _slices(6, seed)
    base = _base()
    items: list[Item] = []
    long_series = min(long_series, count)
    plan: list[tuple[int, list[int]]] = [(0, [long_series])]  # (study index, series sizes)
    left = count - long_series
    study = 1
    while left > 0:
        sizes = []
        for _ in range(rng.randint(1, 3)):
            if left <= 0:
                break
            n = min(left, rng.randint(2, 8))
            sizes.append(n)
            left -= n
        plan.append((study, sizes))
        study += 1
    for study_index, sizes in plan:
        patient = study_index // 2  # two studies per patient, as priors are
        study_uid = uid(seed, "study", study_index)
        day = 1 + (study_index * 37) % 3650
        study_date = f"{2015 + day // 365:04d}{1 + (day % 365) // 31:02d}{1 + day % 28:02d}"
        family = FAMILY[patient % len(FAMILY)]
        given = GIVEN[(patient * 7) % len(GIVEN)]
        ds_study = {
            "PatientName": f"{family}^{given}" + ("^M" if patient % 5 == 0 else ""),
            "PatientID": f"BENCH{patient:05d}",
            "PatientBirthDate": f"{1930 + patient % 80:04d}{1 + patient % 12:02d}{1 + patient % 28:02d}",
            "PatientSex": "MF"[patient % 2],
            "StudyInstanceUID": study_uid,
            "StudyDate": study_date,
            "StudyTime": f"{8 + study_index % 10:02d}{study_index % 60:02d}00",
            "StudyDescription": STUDIES[study_index % len(STUDIES)],
            "StudyID": str(1000 + study_index),
            "AccessionNumber": f"ACC{study_index:07d}",
            "ReferringPhysicianName": PHYSICIANS[study_index % len(PHYSICIANS)],
            "FrameOfReferenceUID": uid(seed, "for", study_index),
        }
        for series_index, size in enumerate(sizes):
            series_uid = uid(seed, "series", study_index, series_index)
            for number in range(1, size + 1):
                ds = Dataset()
                ds.update(base)
                for keyword, value in ds_study.items():
                    setattr(ds, keyword, value)
                sop_uid = uid(seed, "sop", study_index, series_index, number)
                ds.SOPInstanceUID = sop_uid
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = series_index + 1
                ds.SeriesDescription = SERIES[(study_index + series_index) % len(SERIES)]
                ds.SeriesDate = study_date
                ds.InstanceNumber = number
                z = -5.0 * number
                ds.ImagePositionPatient = [-179.2, -179.2, z]
                ds.SliceLocation = str(z)
                ds.PixelData = slices[(number + study_index) % len(slices)]
                items.append(Item(_encode(ds), study_uid, series_uid, sop_uid, "generated", True))
    first = items[0]
    return items, (first.study_uid, first.series_uid)


def build(count: int, long_series: int = 300, with_shared: bool = True) -> BenchSet:
    generated, long_ref = generated_items(count, long_series)
    shared = shared_items() if with_shared else []
    return BenchSet(shared + generated, long_ref, min(long_series, count))
