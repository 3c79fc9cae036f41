"""The large-instance case: one multi-frame instance of BENCH_BIG_MB (default 2 GB) stored in one STOW.

Neither side of the bench may hold it in memory: the file is written as a pydicom header plus pixel bytes
appended in chunks, and uploaded from the file through a sized multipart iterator (Content-Length known, so
no chunked encoding). The server's peak RSS during the upload is the figure that shows it streams too.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from bench.dataset import SIDE, _slices, uid
from bench.measure import Failed
from bench.servers import Server, reset_peak_rss, status_kb

MB = 1 << 20
FRAME = SIDE * SIDE * 2
MULTIFRAME_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


@dataclass(frozen=True)
class BigFile:
    path: Path
    size: int
    frames: int
    study_uid: str
    series_uid: str
    sop_uid: str


def write(path: Path, size_mb: int, seed: int = 11) -> BigFile:
    """Write a Multi-frame Grayscale Word SC instance of about size_mb MB, frame by frame."""
    frames = max(1, size_mb * MB // FRAME)
    length = frames * FRAME
    if length >= 0xFFFFFFFF:  # PS3.5 7.1.1: a defined 32-bit length, 0xFFFFFFFF means undefined
        raise Failed(f"{size_mb} MB does not fit one Pixel Data element")
    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME_GRAYSCALE_WORD_SC
    ds.SOPInstanceUID = uid(seed, "big", "sop", size_mb)
    ds.StudyInstanceUID = uid(seed, "big", "study", size_mb)
    ds.SeriesInstanceUID = uid(seed, "big", "series", size_mb)
    ds.PatientName = "BIG^MULTIFRAME"
    ds.PatientID = "BENCHBIG"
    ds.StudyDate = "20240101"
    ds.StudyDescription = f"BENCH {size_mb} MB MULTIFRAME"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = SIDE
    ds.Columns = SIDE
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    slices = _slices(4, seed)
    with path.open("wb") as out:
        ds.save_as(out, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length (PS3.5 7.1.2)
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for index in range(frames):
            out.write(slices[index % len(slices)])
    return BigFile(
        path, path.stat().st_size, frames, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )


class MultipartUpload:
    """A one-part multipart/related body read from a file in 1 MB chunks; len() gives Content-Length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.boundary = uuid.uuid4().hex
        self.head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.size = path.stat().st_size

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        with self.path.open("rb") as source:
            while chunk := source.read(MB):
                yield chunk
        yield self.tail


@dataclass
class BigResult:
    seconds: float
    mb_per_s: float
    peak_rss_mb: float
    baseline_rss_mb: float


def store(server: Server, big: BigFile, pids: list[int], timeout: float = 3600) -> BigResult:
    """STOW the file once; peak RSS is the highest VmHWM among `pids` (reset first) or sampled VmRSS."""
    baseline = max((status_kb(pid, "VmRSS") for pid in pids), default=0)
    reset = all(reset_peak_rss(pid) for pid in pids)
    sampled = {"peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            sampled["peak"] = max(sampled["peak"], max((status_kb(pid, "VmRSS") for pid in pids), default=0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    upload = MultipartUpload(big.path)
    headers = {"Content-Type": upload.content_type, "Accept": "application/dicom+json"}
    start = time.perf_counter()
    try:
        response = requests.post(f"{server.root}/studies", data=upload, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise Failed(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise Failed(f"HTTP {response.status_code}: {response.text[:300]}")
    peak = sampled["peak"]
    if reset:
        peak = max(peak, max((status_kb(pid, "VmHWM") for pid in pids), default=0))
    return BigResult(seconds, big.size / MB / seconds, peak / 1024, baseline / 1024)
