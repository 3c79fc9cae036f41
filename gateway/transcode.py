"""Stored objects (an original or a version) in the transfer syntax a client asks for, made on the fly.

Explicit VR Little Endian is streamed: the header is read with one range request, frames are read and
decoded one at a time, so memory stays at one frame (also how Implicit VR LE / Explicit VR BE, which
PS3.18 8.7.3.5.1 keeps off the web, are sent). JPEG 2000 (lossless, lossy), JPEG-LS lossless, JPEG
baseline (8-bit), RLE and HTJ2K are encoded frame by frame from the decoded pixels (imagecodecs, and
pydicom's own RLE encoder) into a Part 10 object built by gateway.versions, lossy results labelled
(PS3.3 C.7.6.1.1.5). Objects without pixel data only change their File Meta. Core: no Flask."""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO

import imagecodecs
import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels import apply_color_lut
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from gateway import codecs, pixels
from gateway.errors import NotAcceptable
from gateway.pixels import PixelModule, UndecodablePixelData
from gateway.retrieve import FrameReader, Layout, StoredInstance, read_frame, stream_range, swap_words
from gateway.storage import Bucket
from gateway.versions import LossyFacts, version_dataset

log = logging.getLogger(__name__)

# PS3.18 8.7.3.5.1: these may not be sent on the web; `transfer-syntax=*` gets them re-encoded.
OFF_THE_WEB = frozenset({ImplicitVRLittleEndian, ExplicitVRBigEndian})
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_TAGS = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}

# What can be made on the fly, in the order offered when a client's media range allows several
# (image/jpeg, image/*): lossless before lossy. Explicit VR LE is streamed by explicit_le().
ENCODABLE = (
    HTJ2KLosslessRPCL,
    HTJ2KLossless,
    HTJ2K,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    JPEG2000,
    JPEGBaseline8Bit,
)
PRODUCIBLE = frozenset({ExplicitVRLittleEndian, *ENCODABLE})
LOSSY_TARGETS = frozenset({JPEG2000, JPEGBaseline8Bit})
# The same codestream is valid under these other HTJ2K syntaxes (PS3.5 A.4.4: 4.202 is a 4.201 with
# RPCL, and 4.203 admits any HTJ2K codestream), so it is sent as stored under the new name.
SAME_BYTES: dict[str, tuple[str, ...]] = {
    HTJ2KLosslessRPCL: (HTJ2KLossless, HTJ2K),
    HTJ2KLossless: (HTJ2K,),
}
JPEG_QUALITY = 90  # JPEG baseline on the fly: 4:4:4, quality 90 (visually lossless for most images)
J2K_PSNR = 54.0  # dB over the image's own range for lossy JPEG 2000 (~ 1/2 grey level of 8 bits)
_HTJ2K_OUT = frozenset({HTJ2KLosslessRPCL, HTJ2KLossless, HTJ2K})


def is_explicit_le(transfer_syntax: str) -> bool:
    return transfer_syntax == ExplicitVRLittleEndian


def refusal(pm: PixelModule | None, target: str) -> str | None:
    """Why `target` cannot carry this image at all (a 406), or None when it can be made.

    pm is None for an object without pixel data: every producible syntax carries it."""
    syntax = UID(target)
    name = f"{syntax.name} ({target})" if syntax.is_valid else target
    if target not in PRODUCIBLE:
        return f"{name} is not a transfer syntax this gateway produces"
    if pm is None or target == ExplicitVRLittleEndian:
        return None
    if pm.bits_allocated == 1:
        return f"{name} cannot carry 1-bit pixels (binary segmentations are sent uncompressed)"
    if pm.samples_per_pixel not in (1, 3):
        return f"{name} cannot carry {pm.samples_per_pixel} samples per pixel"
    if target == RLELossless:
        return None
    if pm.bits_allocated > 16 or pm.bits_stored > 16:
        return f"{name} carries at most 16-bit samples; this image has {pm.bits_stored} bits stored"
    if target == JPEGBaseline8Bit:
        if pm.bits_stored > 8 or pm.bits_allocated > 8:
            return f"{name} carries 8-bit samples only; this image has {pm.bits_stored} bits stored"
        if pm.pixel_representation == 1:
            return f"{name} carries unsigned samples only; this image is signed"
    return None


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


# --- other syntaxes: decode each frame, encode it again ---


@dataclass(frozen=True)
class EncodedFrame:
    data: bytes
    photometric: str
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    palette_converted: bool = False


def _sample_values(array: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """The samples cut to `bits_stored` bits (PS3.5 8.1.1: higher bits are not pixel data), sign-extended
    when signed, in the array's own container type."""
    width = 8 * array.dtype.itemsize
    if bits_stored >= width:
        return array
    values = array.astype(np.int32) & ((1 << bits_stored) - 1)
    if signed:
        values -= (values >> (bits_stored - 1)) << bits_stored
    return values.astype(array.dtype)


def _unsigned_view(values: np.ndarray, bits_stored: int) -> np.ndarray:
    """Two's complement samples as the unsigned codes JPEG-LS carries (PS3.5 8.2.3: the decoder
    applies Pixel Representation)."""
    if values.dtype.kind == "u":
        return values
    unsigned = values.view(values.dtype.str.replace("i", "u"))
    return unsigned & np.array((1 << bits_stored) - 1, dtype=unsigned.dtype)


def _j2k_level(values: np.ndarray, bits_stored: int) -> float:
    """imagecodecs' lossy JPEG 2000 `level` is a PSNR against 2**bits: aim at J2K_PSNR over the range
    the image actually uses, so a 12-bit CT in 16 bits is not coded as if it spanned 16."""
    span = float(values.max()) - float(values.min()) if values.size else 0.0
    return J2K_PSNR + 20 * math.log10((1 << bits_stored) / max(span, 1.0))


def encode_frame(
    array: np.ndarray,
    properties: dict[str, object],
    pm: PixelModule,
    target: str,
    header: Callable[[], Dataset] | None = None,
) -> EncodedFrame:
    """One decoded frame in `target` (one of ENCODABLE); colour arrives as RGB (pixels.decode_frame).

    Palette colour becomes RGB for the lossy targets (`header` supplies the lookup tables).

    Raises:
        NotAcceptable: the target cannot carry the image (see refusal()).
    """
    why = refusal(pm, target)
    if why is not None:
        raise NotAcceptable(why)
    photometric = str(properties.get("photometric_interpretation") or pm.photometric_interpretation)
    bits_stored, signed = pm.bits_stored, pm.pixel_representation == 1
    bits_allocated, converted = pm.bits_allocated, False
    if photometric == "PALETTE COLOR" and target in LOSSY_TARGETS:
        if header is None:
            raise NotAcceptable("palette colour needs its lookup tables to be coded lossy")
        rgb = apply_color_lut(array, header())
        # 16-bit lookup table entries keep their top 8 bits: colour displays show 8 bits per channel
        array = (rgb >> 8 if rgb.max() > 255 else rgb).astype(np.uint8)
        bits_allocated = bits_stored = 8
        photometric, signed, converted = "RGB", False, True
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # from Explicit VR Big Endian
    colour = array.ndim == 3 and array.shape[2] == 3
    array = np.ascontiguousarray(array)
    values = _sample_values(array, bits_stored, signed)
    data: bytes
    if target in _HTJ2K_OUT:
        data = codecs.encode_lossless(values, bits_stored=bits_stored, signed=signed, photometric=photometric)
        photometric = codecs.coded_photometric(photometric, lossy=False)
    elif target in (JPEG2000Lossless, JPEG2000):
        lossless = target == JPEG2000Lossless
        data = bytes(
            imagecodecs.jpeg2k_encode(
                values,
                level=0 if lossless else _j2k_level(values, bits_stored),
                codecformat="J2K",
                reversible=lossless,
                mct=colour,
                bitspersample=bits_stored,
            )
        )
        if colour:
            photometric = "YBR_RCT" if lossless else "YBR_ICT"  # PS3.5 8.2.4: the MCT is recorded
    elif target == JPEGLSLossless:
        data = bytes(imagecodecs.jpegls_encode(_unsigned_view(values, bits_stored)))
    elif target == JPEGBaseline8Bit:
        options = {"subsampling": "444"} if colour else {}
        data = bytes(imagecodecs.jpeg8_encode(values.astype(np.uint8), level=JPEG_QUALITY, **options))
        if colour:
            photometric = "YBR_FULL"  # PS3.5 8.2.1: YCbCr, not subsampled
    else:  # RLE Lossless (PS3.5 Annex G), pydicom's own encoder
        data = RLELosslessEncoder.encode(
            values,
            encoding_plugin="pydicom",
            rows=values.shape[0],
            columns=values.shape[1],
            samples_per_pixel=3 if colour else 1,
            bits_allocated=bits_allocated,
            bits_stored=bits_stored,
            pixel_representation=1 if signed else 0,
            photometric_interpretation=photometric,
            planar_configuration=0,
            number_of_frames=1,
        )
    return EncodedFrame(
        data, photometric, 3 if colour else 1, bits_allocated, bits_stored, 1 if signed else 0, converted
    )


def _earlier_lossy(header: Dataset, instance: StoredInstance, pm: PixelModule) -> LossyFacts | None:
    """A JPEG baseline/extended source is lossy even when its header forgot to say so (PS3.5 8.2.1)."""
    syntax = instance.transfer_syntax
    if syntax not in pixels.ALWAYS_LOSSY or str(header.get("LossyImageCompression", "")) == "01":
        return None
    compressed = instance.layout.compressed_size() if instance.layout else 0
    ratio = pm.total_bytes / compressed if compressed else 1.0
    return LossyFacts(ratio, pixels.LOSSY_METHOD[syntax])


def encoded(
    bucket: Bucket,
    instance: StoredInstance,
    target: str,
    pixel_module_loader: Callable[[], PixelModule] | None = None,
) -> bytes:
    """The object as Part 10 bytes in `target` (one of ENCODABLE): its elements, every frame decoded
    and encoded again, the Image Pixel attributes of the result, lossy history appended when the
    target is lossy. Built whole: the encoded frames are small beside the decoded ones.

    Raises:
        UndecodablePixelData: the stored pixel data cannot be decoded.
        NotAcceptable: the target cannot carry the image.
    """
    reader = FrameReader(bucket, instance, pixel_module_loader)
    tail: Dataset | None = None
    layout = instance.layout
    if reader.indexed and layout is not None and layout.seekable:
        header, _element, tail = _read_parts(bucket, instance, layout)
    else:
        header = reader.header()
    reader.use_header(header)
    pm = reader.pixel_module()
    frames = [
        encode_frame(*reader.array(index), pm, target, reader.header) for index in range(pm.number_of_frames)
    ]
    first = frames[0]
    _to_explicit_le(header, UID(instance.transfer_syntax))
    if tail is not None:
        for element in tail:
            header[element.tag] = element
    lossy = None
    if target in LOSSY_TARGETS:
        size = sum(len(frame.data) for frame in frames)
        native = pm.rows * pm.columns * first.samples_per_pixel * first.bits_allocated // 8 * len(frames)
        lossy = LossyFacts(native / max(1, size), pixels.LOSSY_METHOD[UID(target)])
    ds = version_dataset(
        header,
        target,
        [frame.data for frame in frames],
        photometric=first.photometric,
        samples_per_pixel=first.samples_per_pixel,
        bits_allocated=first.bits_allocated,
        bits_stored=first.bits_stored,
        pixel_representation=first.pixel_representation,
        lossy=lossy,
        earlier=_earlier_lossy(header, instance, pm),
        earlier_method=pixels.LOSSY_METHOD.get(UID(instance.transfer_syntax)),
        drop_palette=first.palette_converted,
    )
    _name_the_method(ds, UID(instance.transfer_syntax))
    return _encode_header(ds)


def _name_the_method(ds: Dataset, source: UID) -> None:
    """A lossy JPEG source whose header gives ratios without a method gets its method named, one
    per ratio (PS3.3 C.7.6.1.1.5.2: the values correspond)."""
    if source not in pixels.ALWAYS_LOSSY or "LossyImageCompressionMethod" in ds:
        return
    if str(ds.get("LossyImageCompression", "")) != "01":
        return
    count = ds["LossyImageCompressionRatio"].VM if "LossyImageCompressionRatio" in ds else 1
    methods = [pixels.LOSSY_METHOD[source]] * max(1, count)
    ds.LossyImageCompressionMethod = methods if len(methods) > 1 else methods[0]


def relabelled(bucket: Bucket, instance: StoredInstance, target: str) -> bytes:
    """The object with only its File Meta Transfer Syntax changed: for objects without pixel data (the
    data set is Explicit VR LE under every encapsulated syntax, PS3.5 A.4) and for an HTJ2K codestream
    that is valid as stored under `target` (SAME_BYTES)."""
    ds = dcmread(BytesIO(bucket.get_bytes(instance.key)), force=True)
    _to_explicit_le(ds, UID(instance.transfer_syntax))
    ds.file_meta.TransferSyntaxUID = UID(target)
    return _encode_header(ds)
