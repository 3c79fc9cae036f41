"""Frame codecs: any stored frame to native little-endian pixels. Pure: no I/O, no Flask.

pydicom 3 does the pixel bookkeeping (sign of J2K/JPEG-LS codestreams against Pixel Representation,
YBR to RGB, planar configuration, unused bits); imagecodecs (BSD) does the decoding, registered
here as a pydicom decoding plugin and called frame by frame. RLE uses pydicom's own numpy decoder.
The GPL pylibjpeg-libjpeg is never used (DESIGN.md "Licences")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from gateway.errors import NotAcceptable

log = logging.getLogger(__name__)

PLUGIN = "imagecodecs"
NATIVE = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
_JPEG8 = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
_LJPEG = frozenset({JPEGLossless, JPEGLosslessSV1})
_JPEGLS = frozenset({JPEGLSLossless, JPEGLSNearLossless})
_J2K = frozenset({JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC})
_HTJ2K = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
IMAGECODECS_SYNTAXES = _JPEG8 | _LJPEG | _JPEGLS | _J2K | _HTJ2K

# Syntaxes whose codestream may be lossy; the first two always are (PS3.5 8.2.1, A.4).
ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
MAYBE_LOSSY = frozenset({JPEGLSNearLossless, JPEG2000, JPEG2000MC, HTJ2K})
# PS3.3 C.7.6.1.1.5.1: Lossy Image Compression Method defined terms.
LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEG2000MC: "ISO_15444_2",
    HTJ2K: "ISO_15444_15",
}


class UndecodablePixelData(NotAcceptable):
    """The stored pixel data cannot be decoded, so it can only be sent as stored."""

    title = "Pixel data cannot be decoded"


# --- the imagecodecs decoding plugin, in pydicom's plugin protocol (module-level names) ---

DECODER_DEPENDENCIES = {uid: ("imagecodecs",) for uid in IMAGECODECS_SYNTAXES}


def is_available(uid: str) -> bool:
    return uid in IMAGECODECS_SYNTAXES


def _decode_with_imagecodecs(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's codestream -> raw samples, telling pydicom how they are laid out.

    Colour is left as coded (YCbCr stays YCbCr) so pydicom's own conversion applies, except where
    the JPEG 2000 decoders invert the multiple-component transform themselves (YBR_ICT / YBR_RCT)."""
    syntax = runner.transfer_syntax
    samples = runner.samples_per_pixel
    if syntax in _JPEG8:
        if samples == 3:
            # No colour conversion in libjpeg-turbo: raw components, as the other pydicom plugins give.
            arr = imagecodecs.jpeg8_decode(src, colorspace="YCbCr", outcolorspace="YCbCr")
        else:
            arr = imagecodecs.jpeg8_decode(src)
    elif syntax in _LJPEG:
        try:
            arr = imagecodecs.ljpeg_decode(src)
        except Exception:  # some lossless JPEG streams only libjpeg-turbo 3 reads
            arr = imagecodecs.jpeg8_decode(src)
    elif syntax in _JPEGLS:
        arr = imagecodecs.jpegls_decode(src)
    elif syntax in _HTJ2K and syntax != HTJ2K:
        try:
            arr = imagecodecs.htj2k_decode(src, planar=False)
        except Exception:  # a plain Part 1 codestream is allowed here too; OpenJPEG reads both
            arr = imagecodecs.jpeg2k_decode(src)
    else:
        # JPEG 2000, and lossy HTJ2K: OpenJPEG clamps lossy values where OpenJPH lets them wrap.
        arr = imagecodecs.jpeg2k_decode(src)
    arr = np.asarray(arr)
    if syntax in _J2K | _HTJ2K and runner.photometric_interpretation in ("YBR_ICT", "YBR_RCT"):
        runner.set_option("photometric_interpretation", "RGB")
    runner.set_option("bits_allocated", arr.dtype.itemsize * 8)
    if samples > 1:
        runner.set_option("planar_configuration", 0)
    return np.ascontiguousarray(arr).tobytes()


_registered = threading.Lock()


def _register() -> None:
    """Add the imagecodecs plugin to pydicom's decoders once per process (add_plugin is not thread-safe)."""
    with _registered:
        for syntax in sorted(IMAGECODECS_SYNTAXES):
            try:
                decoder = get_decoder(syntax)
            except NotImplementedError:
                continue
            if PLUGIN not in decoder.available_plugins and PLUGIN not in decoder._unavailable:
                decoder.add_plugin(PLUGIN, (__name__, "_decode_with_imagecodecs"))


_register()


def _decodable() -> frozenset[UID]:
    found = set(NATIVE | {RLELossless})
    for syntax in IMAGECODECS_SYNTAXES:
        try:
            if PLUGIN in get_decoder(syntax).available_plugins:
                found.add(syntax)
        except NotImplementedError:  # pydicom has no decoder class for it (e.g. JPEG 2000 Part 2)
            pass
    return frozenset(found)


DECODABLE = _decodable()


class _PluginFailureFilter(logging.Filter):
    """pydicom logs each plugin failure with a traceback at ERROR; we raise UndecodablePixelData with
    the reason instead, so inside our calls those records are dropped (corrupt data is not a bug)."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)


_FILTER = _PluginFailureFilter()
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_FILTER)


@contextmanager
def _quiet() -> Iterator[None]:
    previous = getattr(_FILTER.local, "active", False)
    _FILTER.local.active = True
    try:
        yield
    finally:
        _FILTER.local.active = previous


# --- public API ---


@dataclass(frozen=True)
class PixelModule:
    """The Image Pixel attributes a decoder needs (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelModule:
        """Raises UndecodablePixelData when a required attribute is missing or not a number."""
        try:
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            bits_allocated = int(ds.BitsAllocated)
            return cls(
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                samples_per_pixel=samples,
                bits_allocated=bits_allocated,
                bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
                pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
                photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
                planar_configuration=int(ds.get("PlanarConfiguration", 0) or 0) if samples > 1 else 0,
                number_of_frames=max(1, int(ds.get("NumberOfFrames", 1) or 1)),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise UndecodablePixelData(f"the Image Pixel module is incomplete: {exc}") from exc

    @property
    def frame_bits(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated

    @property
    def frame_bytes(self) -> int:
        """Bytes of one native frame; for 1-bit data only exact when frame_bits is a multiple of 8."""
        return (self.frame_bits + 7) // 8

    @property
    def total_bytes(self) -> int:
        """Bytes of all native frames (PS3.5 8.1.1: 1-bit frames are packed without padding between)."""
        return (self.frame_bits * self.number_of_frames + 7) // 8

    def options(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric_interpretation,
            "planar_configuration": self.planar_configuration,
        }


def is_decodable(transfer_syntax: str) -> bool:
    return transfer_syntax in DECODABLE


def _plugin_for(syntax: UID) -> str:
    if syntax in IMAGECODECS_SYNTAXES:
        return PLUGIN
    if syntax == RLELossless:
        return "pydicom"
    return ""


def decode_frame(
    header: Dataset | PixelModule, frame: bytes, transfer_syntax: str, pixel_vr: str = "OW"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one frame: its codestream (fragments joined) or, for native syntaxes, its bytes.

    Returns the array shaped (rows, columns[, samples]) and the Image Pixel values describing it
    (pydicom's: YBR_FULL/YBR_FULL_422 become RGB, planar configuration 0, sign per Pixel
    Representation). pixel_vr matters only for Explicit VR Big Endian (8-bit data in OW is swapped).

    Raises:
        UndecodablePixelData: unsupported syntax or a corrupt frame.
    """
    pm = header if isinstance(header, PixelModule) else PixelModule.from_dataset(header)
    syntax = UID(transfer_syntax)
    if syntax not in DECODABLE:
        raise UndecodablePixelData(f"no decoder for transfer syntax {syntax} ({syntax.name})")
    if syntax == DeflatedExplicitVRLittleEndian:
        syntax = ExplicitVRLittleEndian  # a frame taken out of an inflated data set is plain native data
    if not frame:
        raise UndecodablePixelData(f"frame is empty; nothing to decode as {syntax.name}")
    options = pm.options()
    options["number_of_frames"] = 1
    if syntax.is_encapsulated:
        source: bytes = encapsulate([frame])
    else:
        source = frame
        options["pixel_vr"] = pixel_vr
        options["pixel_keyword"] = "PixelData"
    try:
        with _quiet():
            arr, properties = get_decoder(syntax).as_array(
                source, index=0, decoding_plugin=_plugin_for(syntax), **options
            )
    except Exception as exc:  # codec errors come as many types; all mean this frame cannot be decoded
        raise UndecodablePixelData(f"frame does not decode as {syntax.name}: {_reason(exc)}") from exc
    return arr, properties


def native_bytes(arr: np.ndarray, bits_allocated: int) -> bytes:
    """Little-endian native Pixel Data bytes of a decoded array (PS3.5 8.1.1; 1-bit data packed)."""
    if bits_allocated == 1:
        return pack_bits(arr, pad=False)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    container = np.dtype(f"{'i' if arr.dtype.kind == 'i' else 'u'}{max(1, bits_allocated // 8)}")
    if arr.dtype.itemsize != container.itemsize:
        arr = arr.astype(container)
    return np.ascontiguousarray(arr).tobytes()


def native_frame_bytes(
    header: Dataset | PixelModule, frame: bytes, transfer_syntax: str, pixel_vr: str = "OW"
) -> tuple[bytes, dict[str, Any]]:
    """One frame as Explicit VR Little Endian pixel bytes, and the Image Pixel values they follow."""
    pm = header if isinstance(header, PixelModule) else PixelModule.from_dataset(header)
    arr, properties = decode_frame(pm, frame, transfer_syntax, pixel_vr)
    return native_bytes(arr, pm.bits_allocated), properties


def decode_dataset(ds: Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    """Every frame of a whole data set (Pixel Data loaded); for objects whose frame boundaries are unknown.

    Raises:
        UndecodablePixelData: no pixel data, an unsupported syntax, or corrupt data.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not syntax and getattr(ds, "original_encoding", None) is not None:
        # No File Meta (ACR-NEMA style): the encoding pydicom found while reading it.
        implicit, little = ds.original_encoding
        syntax = (
            ImplicitVRLittleEndian
            if implicit and little
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = syntax
    if "PixelData" not in ds:
        raise UndecodablePixelData("the instance has no Pixel Data")
    if syntax not in DECODABLE:
        raise UndecodablePixelData(f"no decoder for transfer syntax {syntax or 'unknown'}")
    PixelModule.from_dataset(ds)
    try:
        with _quiet():
            return get_decoder(syntax).as_array(ds, decoding_plugin=_plugin_for(syntax))
    except Exception as exc:
        raise UndecodablePixelData(f"pixel data does not decode as {syntax.name}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]
