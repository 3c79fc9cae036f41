"""Reading a Part 10 file from disk without loading its pixel data: the header, and where the pixel
data lies (offsets of each frame), so frames can be served later with range reads. No Flask, no I/O
beyond the one local file."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.uid import UID

from gateway.errors import CANNOT_UNDERSTAND, InstanceRejected

# Values stored as received are not ours to judge at read time (DESIGN.md: malformed but harmless).
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM = 0xFFFEE000
_SEQ_END = 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV"}


@dataclass(frozen=True)
class PixelLayout:
    """Where the Pixel Data value sits in the file; frames as [offset, length] slices.

    Native: frames[i] = [offset, length]. Encapsulated: frames[i] = [[offset, length], ...] fragments.
    frames is None when the frame boundaries cannot be known without decoding."""

    encapsulated: bool
    offset: int
    length: int
    frames: list | None
    vr: str = "OB"

    @classmethod
    def from_json(cls, text: str | None) -> PixelLayout | None:
        if not text:
            return None
        raw = json.loads(text)
        return cls(
            encapsulated=bool(raw.get("encapsulated")),
            offset=int(raw.get("offset", -1)),
            length=int(raw.get("length", -1)),
            frames=raw.get("frames"),
            vr=str(raw.get("vr") or "OB"),
        )

    @property
    def seekable(self) -> bool:
        """The value can be found by offset (not inside a deflated stream)."""
        return self.offset >= 0

    def element_start(self, transfer_syntax: str) -> int:
        """File offset of the Pixel Data element's tag: 8 header bytes if implicit VR, else 12 (OB/OW)."""
        return self.offset - (8 if UID(transfer_syntax).is_implicit_VR else 12)

    def value_end(self) -> int | None:
        """Offset just past the Pixel Data element (after the sequence delimiter when encapsulated)."""
        if not self.seekable:
            return None
        if not self.encapsulated:
            return self.offset + self.length if self.length >= 0 else None
        if not self.frames:
            return None
        last = self.frames[-1][-1]
        return int(last[0]) + int(last[1]) + 8  # PS3.5 A.4: (FFFE,E0DD) delimiter, 8 bytes

    def frame_slices(self, index: int) -> list[tuple[int, int]]:
        assert self.frames is not None
        frame = self.frames[index]
        if self.encapsulated:
            return [(int(offset), int(length)) for offset, length in frame]
        return [(int(frame[0]), int(frame[1]))]

    def compressed_size(self) -> int:
        """Total bytes of all fragments (for a lossy ratio); 0 when unknown."""
        if not self.encapsulated or not self.frames:
            return 0
        return sum(int(length) for frame in self.frames for _offset, length in frame)

    def to_json(self) -> str:
        return json.dumps(
            {
                "encapsulated": self.encapsulated,
                "offset": self.offset,
                "length": self.length,
                "frames": self.frames,
                "vr": self.vr,
            },
            separators=(",", ":"),
        )


def _stop_at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in PIXEL_TAGS


def read_header(path: str) -> tuple[Dataset, PixelLayout | None]:
    """Parse a Part 10 file up to its pixel data, and locate the pixel data.

    Raises:
        InstanceRejected: not a DICOM Part 10 file, or truncated.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        try:
            ds = read_partial(
                fp, stop_when=_stop_at_pixels, defer_size=None, force=_starts_with_file_meta(fp)
            )
        except InvalidDicomError as exc:
            raise InstanceRejected(
                CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no 128-byte preamble and DICM prefix)"
            ) from exc
        except Exception as exc:  # pydicom raises many types on garbage; any of them means unreadable
            raise InstanceRejected(CANNOT_UNDERSTAND, f"unreadable DICOM data: {exc}") from exc
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            raise InstanceRejected(CANNOT_UNDERSTAND, "File Meta Information has no Transfer Syntax UID")
        syntax = UID(meta.TransferSyntaxUID)
        if syntax.is_deflated:
            return _deflated(path, ds)
        if fp.tell() >= size:  # no pixel data at all (SR, KO, PR...)
            return ds, None
        layout = _locate(fp, size, syntax, ds)
    return ds, layout


def _starts_with_file_meta(fp: BinaryIO) -> bool:
    """Some clients (dicomweb-client writing a dataset without a preamble) send the File Meta group
    without the 128-byte preamble and DICM prefix; accept that, but nothing else that lacks them."""
    start = fp.read(8)
    fp.seek(0)
    return start[:2] == b"\x02\x00" and start[4:6].isalpha()  # File Meta is Explicit VR LE (PS3.10 7.1)


def _deflated(path: str, header: Dataset) -> tuple[Dataset, PixelLayout | None]:
    """Deflated data sets cannot be range-read: parse whole (they are small) and check the pixel length."""
    try:
        full = pydicom.dcmread(path)
    except Exception as exc:
        raise InstanceRejected(CANNOT_UNDERSTAND, f"deflated data set does not inflate: {exc}") from exc
    if "PixelData" in full:
        _check_native_length(full, len(full.PixelData))
        del full.PixelData
        return full, PixelLayout(False, -1, -1, None, "OB" if full.get("BitsAllocated", 8) <= 8 else "OW")
    return full, None


def _locate(fp: BinaryIO, size: int, syntax: UID, ds: Dataset) -> PixelLayout:
    little = syntax.is_little_endian
    implicit = syntax.is_implicit_VR
    end = "<" if little else ">"
    head = fp.read(8)
    if len(head) < 8:
        raise InstanceRejected(CANNOT_UNDERSTAND, "truncated in the Pixel Data element header")
    group, element = struct.unpack(end + "HH", head[:4])
    if implicit:
        vr = "OW" if ds.get("BitsAllocated", 16) > 8 else "OB"
        (length,) = struct.unpack(end + "L", head[4:8])
        value_offset = fp.tell()
    else:
        raw_vr = head[4:6]
        vr = raw_vr.decode("ascii", "replace")
        if raw_vr in _LONG_VRS:
            extra = fp.read(4)
            if len(extra) < 4:
                raise InstanceRejected(CANNOT_UNDERSTAND, "truncated in the Pixel Data element header")
            (length,) = struct.unpack(end + "L", extra)
        else:
            (length,) = struct.unpack(end + "H", head[6:8])
        value_offset = fp.tell()
    if length == 0xFFFFFFFF:
        return _encapsulated(fp, size, value_offset, ds)
    if value_offset + length > size:
        raise InstanceRejected(
            CANNOT_UNDERSTAND,
            f"truncated: Pixel Data declares {length} bytes but the stream ends after {size - value_offset}",
        )
    expected = _check_native_length(ds, length)
    frames_count = _frames(ds)
    frames: list | None = None
    frame_bits = expected * 8 // frames_count if expected else 0
    if (
        expected
        and int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel", 1) or 1)
        * int(ds.BitsAllocated)
        % 8
        == 0
    ):
        frame_size = frame_bits // 8
        frames = [[value_offset + i * frame_size, frame_size] for i in range(frames_count)]
    return PixelLayout(False, value_offset, length, frames, vr)


def _frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def native_size(ds: Dataset) -> int:
    """Rows x Columns x Samples x Frames x Bits Allocated / 8 (bits packed for 1-bit data)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return 0
    total_bits = rows * columns * samples * _frames(ds) * bits
    return (total_bits + 7) // 8


def _check_native_length(ds: Dataset, length: int) -> int:
    expected = native_size(ds)
    if expected and length < expected:
        raise InstanceRejected(
            CANNOT_UNDERSTAND,
            f"native Pixel Data has {length} bytes, its attributes require {expected}",
        )
    return expected


def _encapsulated(fp: BinaryIO, size: int, value_offset: int, ds: Dataset) -> PixelLayout:
    """Walk the items of encapsulated pixel data (PS3.5 A.4) without reading fragment bytes."""
    items: list[tuple[int, int, int]] = []  # (item start, value offset, length)
    position = value_offset
    while True:
        fp.seek(position)
        head = fp.read(8)
        if len(head) < 8:
            raise InstanceRejected(
                CANNOT_UNDERSTAND, "truncated: encapsulated Pixel Data has no end delimiter"
            )
        group, element, length = struct.unpack("<HHL", head)
        tag = (group << 16) | element
        if tag == _SEQ_END:
            break
        if tag != _ITEM:
            raise InstanceRejected(CANNOT_UNDERSTAND, f"malformed encapsulated Pixel Data: tag {tag:08X}")
        if position + 8 + length > size:
            raise InstanceRejected(CANNOT_UNDERSTAND, "truncated: a Pixel Data fragment runs past the end")
        items.append((position, position + 8, length))
        position += 8 + length
    if not items:
        raise InstanceRejected(CANNOT_UNDERSTAND, "encapsulated Pixel Data has no Basic Offset Table item")
    bot_item, fragments = items[0], items[1:]
    frame_count = _frames(ds)
    frames = _map_fragments(fp, bot_item, fragments, frame_count, ds)
    return PixelLayout(True, value_offset, -1, frames, "OB")


def _map_fragments(
    fp: BinaryIO,
    bot: tuple[int, int, int],
    fragments: list[tuple[int, int, int]],
    frame_count: int,
    ds: Dataset,
) -> list | None:
    if not fragments:
        return None
    slices = [[value, length] for _start, value, length in fragments]
    if frame_count == 1:
        return [slices]
    first = fragments[0][0]
    starts: list[int] = []
    if "ExtendedOffsetTable" in ds:
        table = ds.ExtendedOffsetTable
        starts = list(struct.unpack(f"<{len(table) // 8}Q", table))
    elif bot[2] >= 4 * frame_count:
        fp.seek(bot[1])
        starts = list(struct.unpack(f"<{bot[2] // 4}L", fp.read(bot[2])))
    if len(starts) == frame_count:
        frames: list[list[list[int]]] = [[] for _ in range(frame_count)]
        index = 0
        for start, value, length in fragments:
            relative = start - first
            while index + 1 < frame_count and relative >= starts[index + 1]:
                index += 1
            frames[index].append([value, length])
        if all(frames):
            return frames
    if len(fragments) == frame_count:
        return [[s] for s in slices]
    return None


def read_frame(fp: BinaryIO, layout: PixelLayout, index: int) -> bytes:
    """Frame `index` (0-based) of a local file: a native slice, or the frame's fragments joined."""
    assert layout.frames is not None
    entry = layout.frames[index]
    slices = entry if layout.encapsulated else [entry]
    chunks = []
    for offset, length in slices:
        fp.seek(offset)
        chunks.append(fp.read(length))
    return b"".join(chunks)
