"""A 200 MB multi-frame instance is streamed to disk and bucket, never held whole in memory."""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import requests

from gateway import keys
from gateway.connections import Connections
from gateway.uids import InstanceRef
from tests.factories import make_ct, to_bytes

ROWS = COLUMNS = 1024
FRAMES = 100  # 1024 x 1024 x 2 bytes x 100 = 200 MiB


def write_large_instance(path: Path) -> tuple[InstanceRef, str]:
    """Header through pydicom, then the Pixel Data element appended in chunks (no 200 MB buffer)."""
    ds = make_ct(rows=ROWS, columns=COLUMNS, frames=1)
    ds.NumberOfFrames = FRAMES
    del ds.PixelData
    header = to_bytes(ds)
    length = ROWS * COLUMNS * 2 * FRAMES
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for chunk in (header, struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)):
            handle.write(chunk)
            digest.update(chunk)
        block = bytes(range(256)) * (ROWS * COLUMNS * 2 // 256)
        for _ in range(FRAMES):
            handle.write(block)
            digest.update(block)
    return InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID), digest.hexdigest()


def multipart_stream(path: Path, boundary: str) -> Iterator[bytes]:
    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


class PeakMemory(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


def test_200mb_instance_streams_with_bounded_memory(tmp_path: Path, live_server, settings) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "large.dcm"
    ref, sha256 = write_large_instance(source)
    base = live_server(settings)
    monitor = PeakMemory()
    monitor.start()
    response = requests.post(
        f"{base}/dicomweb/studies",
        data=multipart_stream(source, "bigboundary"),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=bigboundary'},
        timeout=300,
    )
    monitor.running = False
    monitor.join()
    assert response.status_code == 200, response.text
    growth = monitor.peak - monitor.baseline
    assert growth < 80 * 1024 * 1024, f"memory grew by {growth / 1e6:.0f} MB while storing 200 MB"
    conn = Connections(settings)
    info = conn.originals.head(keys.original(ref))
    assert info is not None and info.size == source.stat().st_size and info.sha256 == sha256
    conn.close()
