"""A stored instance re-encoded as Explicit VR Little Endian Part 10 bytes, streamed.

Used when a client asks for 1.2.840.10008.1.2.1 and the original is compressed, or is Implicit VR
Little Endian / Explicit VR Big Endian, which PS3.18 8.7.3.5.1 keeps off the web. The header is read
with one range request, frames are read and decoded one at a time, so memory stays at one frame.
Core: no Flask. Issue 4 adds the other syntaxes here, from the version the policy allows."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from io import BytesIO

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gateway import pixels
from gateway.pixels import PixelModule, UndecodablePixelData
from gateway.retrieve import Layout, StoredInstance, read_frame, stream_range, swap_words
from gateway.storage import Bucket

log = logging.getLogger(__name__)

# PS3.18 8.7.3.5.1: these may not be sent on the web; `transfer-syntax=*` gets them re-encoded.
OFF_THE_WEB = frozenset({ImplicitVRLittleEndian, ExplicitVRBigEndian})
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_TAGS = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}


def is_explicit_le(transfer_syntax: str) -> bool:
    return transfer_syntax == ExplicitVRLittleEndian


def can_transcode(instance: StoredInstance) -> bool:
    """Whether an Explicit VR Little Endian form can be made (decodable, or no pixel data at all)."""
    if instance.layout is None or not instance.layout.encapsulated:
        return True
    return pixels.is_decodable(instance.transfer_syntax)


def explicit_le(bucket: Bucket, instance: StoredInstance) -> Iterator[bytes]:
    """The instance as Explicit VR Little Endian Part 10 bytes: same elements, decoded pixels.

    The header and the first frame are read and decoded before this returns, so a corrupt object
    fails here (not halfway through a response); later frames are read as the iterator advances.

    Raises:
        UndecodablePixelData: the pixel data cannot be decoded (406 for a retrieve).
        ObjectNotFound, StorageUnavailable: the original cannot be read.
    """
    layout = instance.layout
    if (
        layout is None
        or not layout.seekable
        or layout.frames is None
        or instance.transfer_syntax == DeflatedExplicitVRLittleEndian
    ):
        return iter([_whole(bucket, instance)])
    header, element, tail = _read_parts(bucket, instance, layout)
    if layout.encapsulated:
        if int(header.get("BitsAllocated", 0) or 0) == 1:
            return iter([_whole(bucket, instance)])  # 1-bit frames need not end on a byte boundary
        return _encapsulated(bucket, instance, layout, header, tail)
    return _native(bucket, instance, layout, header, element, tail)


# --- the header and what follows the pixel data ---


def _read_parts(
    bucket: Bucket, instance: StoredInstance, layout: Layout
) -> tuple[Dataset, bytes, Dataset | None]:
    """(header data set, the Pixel Data element's own header bytes, trailing data set or None)."""
    syntax = UID(instance.transfer_syntax)
    data = bucket.get_range(instance.key, 0, layout.offset)
    start = layout.element_start(instance.transfer_syntax)
    header = dcmread(BytesIO(data[:start]), force=True)
    tail = None
    end = layout.value_end()
    if end is not None and end < instance.size:
        raw = bucket.get_range(instance.key, end, instance.size - end)
        try:
            tail = read_dataset(BytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian)
        except Exception as exc:  # keep serving the image; say what was dropped
            log.warning("elements after Pixel Data of %s not parsed: %s", instance.ref.sop_uid, exc)
        if tail is not None:
            for tag in [t for t in tail.keys() if t == 0xFFFCFFFC]:
                del tail[tag]  # Data Set Trailing Padding may be dropped (PS3.10 7.2)
    return header, data[start:], tail


def _to_explicit_le(ds: Dataset, source: UID) -> None:
    """In place: File Meta for Explicit VR LE; values a byte order change affects; stale elements gone."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    for keyword in ("ImplementationVersionName", "FileMetaInformationGroupLength"):
        if keyword in meta:
            delattr(meta, keyword)
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)  # they index the encapsulated fragments, which are gone
    _clean(ds, swap=source == ExplicitVRBigEndian)


def _clean(ds: Dataset, swap: bool) -> None:
    """Drop group lengths (retired; wrong once VRs are explicit) and, from Big Endian, swap binary words."""
    for element in list(ds):
        if element.tag.element == 0 and element.tag.group != 2:
            del ds[element.tag]
            continue
        if element.VR == "SQ":
            for item in element.value or []:
                _clean(item, swap)
        elif swap and element.VR in _WORD and isinstance(element.value, bytes | bytearray):
            element.value = swap_words(bytes(element.value), _WORD[element.VR])


def _pixel_attributes(ds: Dataset, properties: dict[str, object], instance: StoredInstance) -> None:
    """The Image Pixel values of the decoded pixels, and the lossy history of a lossy original."""
    photometric = str(properties.get("photometric_interpretation") or ds.get("PhotometricInterpretation", ""))
    if photometric:
        ds.PhotometricInterpretation = photometric
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = 0
    syntax = UID(instance.transfer_syntax)
    lossy = syntax in pixels.ALWAYS_LOSSY or str(ds.get("LossyImageCompression", "")).strip() == "01"
    if not lossy:
        return
    # PS3.3 C.7.6.1.1.5: once lossy, always labelled lossy, with each method and ratio applied.
    ds.LossyImageCompression = "01"
    method = pixels.LOSSY_METHOD.get(syntax)
    if method and "LossyImageCompressionMethod" not in ds:
        ds.LossyImageCompressionMethod = method
        compressed = instance.layout.compressed_size() if instance.layout else 0
        if compressed and "LossyImageCompressionRatio" not in ds:
            native = PixelModule.from_dataset(ds).total_bytes
            ds.LossyImageCompressionRatio = f"{native / compressed:.4g}"[:16]


def _encode_header(ds: Dataset) -> bytes:
    buffer = BytesIO()
    if not getattr(ds, "preamble", None):
        ds.preamble = b"\x00" * 128
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _encode_tail(tail: Dataset | None) -> bytes:
    if tail is None or not len(tail):
        return b""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, tail)
    return buffer.getvalue()


def _element_header(tag: int, vr: str, length: int) -> bytes:
    """An Explicit VR LE element header for a long VR (PS3.5 7.1.2: tag, VR, 2 reserved, 4-byte length)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)


# --- compressed originals: decode frame by frame ---


def _encapsulated(
    bucket: Bucket, instance: StoredInstance, layout: Layout, header: Dataset, tail: Dataset | None
) -> Iterator[bytes]:
    pm = PixelModule.from_dataset(header)
    frames = len(layout.frames or [])
    if frames < pm.number_of_frames:
        raise UndecodablePixelData(
            f"Pixel Data holds {frames} frames, Number of Frames says {pm.number_of_frames}"
        )
    first, properties = pixels.native_frame_bytes(
        pm, read_frame(bucket, instance.key, layout, 0), instance.transfer_syntax
    )
    _to_explicit_le(header, UID(instance.transfer_syntax))
    _pixel_attributes(header, properties, instance)
    total = pm.frame_bytes * pm.number_of_frames
    vr = "OB" if pm.bits_allocated <= 8 else "OW"
    prefix = _encode_header(header) + _element_header(0x7FE00010, vr, total + total % 2)
    suffix = (b"\x00" if total % 2 else b"") + _encode_tail(tail)

    def chunks() -> Iterator[bytes]:
        yield prefix
        yield first
        for index in range(1, pm.number_of_frames):
            frame = read_frame(bucket, instance.key, layout, index)
            data, _ = pixels.native_frame_bytes(pm, frame, instance.transfer_syntax)
            yield data
        if suffix:
            yield suffix

    return chunks()


# --- native originals in Implicit VR LE or Explicit VR BE: same pixels, new byte order ---


def _native(
    bucket: Bucket,
    instance: StoredInstance,
    layout: Layout,
    header: Dataset,
    element: bytes,
    tail: Dataset | None,
) -> Iterator[bytes]:
    syntax = UID(instance.transfer_syntax)
    order = "<" if syntax.is_little_endian else ">"
    group, number = struct.unpack(order + "HH", element[:4])
    tag = (group << 16) | number
    bits = int(header.get("BitsAllocated", 16) or 16)
    if syntax.is_implicit_VR:
        vr = _PIXEL_TAGS.get(tag, "OW")
        if tag == 0x7FE00010 and bits <= 8:
            vr = "OB"
    else:
        vr = element[4:6].decode("ascii", "replace")
    # Big Endian OW words are swapped even for 8-bit samples (PS3.5 A.3); OB never.
    width = 1 if syntax.is_little_endian else _WORD.get(vr, 1)
    if width == 2 and bits > 16:
        width = bits // 8
    _to_explicit_le(header, syntax)
    prefix = _encode_header(header) + _element_header(tag, vr, layout.length)
    suffix = _encode_tail(tail)

    def chunks() -> Iterator[bytes]:
        yield prefix
        for data in stream_range(bucket, instance.key, layout.offset, layout.length):  # 1 MiB: whole words
            yield swap_words(data, width) if width > 1 else data
        if suffix:
            yield suffix

    return chunks()


# --- anything else: the whole object, once (deflated, no pixel data, frame boundaries unknown) ---


def _whole(bucket: Bucket, instance: StoredInstance) -> bytes:
    raw = bucket.get_bytes(instance.key)
    ds = dcmread(BytesIO(raw), force=True)
    syntax = UID(instance.transfer_syntax)
    if "PixelData" in ds and syntax.is_encapsulated:
        arr, properties = pixels.decode_dataset(ds)
        pm = PixelModule.from_dataset(ds)
        data = pixels.native_bytes(arr, pm.bits_allocated)
        _to_explicit_le(ds, syntax)
        _pixel_attributes(ds, properties, instance)
        ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")
        ds["PixelData"].VR = "OB" if pm.bits_allocated <= 8 else "OW"
    else:
        _to_explicit_le(ds, syntax)  # from Big Endian, OW pixel words are swapped with the other values
    return _encode_header(ds)
