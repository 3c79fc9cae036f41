"""Stored frames -> consumer images (PS3.18 8.3.5 and 10.4.1.1.3-4): Modality LUT, VOI (the header's or
the request's window), palette colour, MONOCHROME1 inversion, viewport and source region, JPEG or PNG by
Pillow; and the precomputed thumbnails kept beside the versions in the hot bucket.

Core: no Flask. gateway/rendered.py serves it and workers/thumbnails.py precomputes with it."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import (
    EncapsulatedCDAStorage,
    EncapsulatedMTLStorage,
    EncapsulatedOBJStorage,
    EncapsulatedPDFStorage,
    EncapsulatedSTLStorage,
    MPEGTransferSyntaxes,
)

from gateway import keys
from gateway.errors import InvalidParameter, ObjectNotFound
from gateway.retrieve import StoredInstance
from gateway.storage import Bucket
from gateway.uids import InstanceRef

JPEG = "image/jpeg"
PNG = "image/png"
PDF = "application/pdf"
DOCUMENT_TYPES = {  # PS3.18 Table 8.7.4-2; the MIME Type of Encapsulated Document (0042,0012) wins
    EncapsulatedPDFStorage: PDF,
    EncapsulatedCDAStorage: "text/xml",
    EncapsulatedSTLStorage: "model/stl",
    EncapsulatedOBJStorage: "model/obj",
    EncapsulatedMTLStorage: "model/mtl",
}
VIDEO_SYNTAXES = frozenset(MPEGTransferSyntaxes)  # MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 streams
THUMBNAIL_SIZE = 256  # long side of a thumbnail, precomputed or not (OHIF asks viewport=256,256)
JPEG_QUALITY = 90  # PS3.18 leaves the default to the origin server
THUMBNAIL_QUALITY = 85
# PS3.18 8.3.5.1.4: the window parameter's function names -> VOI LUT Function (0028,1056)
FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
_LARGEST = 1 << 14  # a viewport side beyond this is a mistake, not a display


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID


@dataclass(frozen=True)
class Viewport:
    """viewport=vw,vh[,sx,sy,sw,sh]: the display box, and the source region (a negative sw or sh flips)."""

    width: int
    height: int
    region: tuple[float, float, float | None, float | None] | None = None


@dataclass(frozen=True)
class Options:
    media_type: str = JPEG
    quality: int | None = None
    window: Window | None = None
    viewport: Viewport | None = None
    max_width: int | None = None  # device pixels the client's display has (Viewport-Width x DPR)
    max_side: int | None = None  # thumbnails: never larger than this on the long side


def is_document(instance: StoredInstance) -> bool:
    return instance.sop_class_uid in DOCUMENT_TYPES


def is_video(instance: StoredInstance) -> bool:
    return instance.transfer_syntax in VIDEO_SYNTAXES


def is_image(instance: StoredInstance) -> bool:
    """Pixel data a frame decoder takes: not a video stream, not an encapsulated document."""
    return instance.layout is not None and not is_video(instance) and not is_document(instance)


# --- parameters ---------------------------------------------------------------------------------------------


def _numbers(text: str, parameter: str, count: tuple[int, ...]) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in count:
        expected = " or ".join(str(c) for c in count)
        raise InvalidParameter(
            f"{parameter}={text[:60]!r} must have {expected} comma-separated values", parameter=parameter
        )
    return parts


def _float(text: str, parameter: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidParameter(f"{parameter}: {text[:30]!r} is not a number", parameter=parameter) from None
    if not math.isfinite(value):
        raise InvalidParameter(f"{parameter}: {text[:30]!r} is not a finite number", parameter=parameter)
    return value


def parse_window(text: str) -> Window:
    """window=center,width,function (PS3.18 8.3.5.1.4); function is linear, linear-exact or sigmoid.

    Raises:
        InvalidParameter: naming the window parameter and what is wrong.
    """
    center, width, function = _numbers(text, "window", (3,))
    name = FUNCTIONS.get(function.lower())
    if name is None:
        raise InvalidParameter(
            f"window function {function[:30]!r} is not one of {', '.join(FUNCTIONS)}", parameter="window"
        )
    window = Window(_float(center, "window"), _float(width, "window"), name)
    if window.width <= 0 or (name == "LINEAR" and window.width < 1):
        raise InvalidParameter(
            f"window width {width} is too small ({'>= 1' if name == 'LINEAR' else '> 0'} for {function})",
            parameter="window",
        )
    return window


def parse_viewport(text: str) -> Viewport:
    """viewport=vw,vh or vw,vh,sx,sy,sw,sh (PS3.18 8.3.5.1.3); empty sx..sh take their defaults.

    Raises:
        InvalidParameter: naming the viewport parameter.
    """
    parts = _numbers(text, "viewport", (2, 6))
    size = []
    for part in parts[:2]:
        if not part.isdigit() or not 1 <= int(part) <= _LARGEST:
            raise InvalidParameter(
                f"viewport width and height must be integers 1..{_LARGEST}, not {part[:20]!r}",
                parameter="viewport",
            )
        size.append(int(part))
    if len(parts) == 2:
        return Viewport(size[0], size[1])
    sx, sy = (_float(p, "viewport") if p else 0.0 for p in parts[2:4])
    sw, sh = (_float(p, "viewport") if p else None for p in parts[4:6])
    if sw == 0 or sh == 0:
        raise InvalidParameter("viewport source width and height must not be 0", parameter="viewport")
    return Viewport(size[0], size[1], (sx, sy, sw, sh))


def parse_quality(text: str) -> int:
    """quality=1..100, the JPEG quality (PS3.18 8.3.5.1.2)."""
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise InvalidParameter(f"quality {text[:20]!r} must be an integer 1..100", parameter="quality")
    return int(text)


# --- pixels to display values -------------------------------------------------------------------------------

_VOI_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


def frame_header(header: Dataset, index: int = 0) -> Dataset:
    """The Modality LUT and VOI attributes that apply to one frame: the top-level ones, overridden by
    the shared then the per-frame functional groups of an enhanced multi-frame (PS3.3 C.7.6.16)."""
    ds = Dataset()
    for keyword in _VOI_KEYWORDS:
        if keyword in header:
            setattr(ds, keyword, header[keyword].value)
    groups = []
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for sequence, names in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            items = group.get(sequence)
            if items:
                for keyword in names:
                    if keyword in items[0]:
                        setattr(ds, keyword, items[0][keyword].value)
    return ds


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def header_window(ds: Dataset) -> Window | None:
    """The first window the header gives (Window Center and Width are multi-valued: PS3.3 C.11.2.1.2)."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in FUNCTIONS.values():
        function = "LINEAR"
    if function == "LINEAR" and width < 1:
        width = 1.0
    return Window(center, width, function)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output 0..255."""
    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
    else:
        out = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) * 255.0 if w > 1 else (x > c - 0.5) * 255.0
    return out


def _stretch(values: np.ndarray) -> np.ndarray:
    """No VOI in the header nor the request: the frame's own range, full scale."""
    x = values.astype(np.float64, copy=False)
    low, high = float(np.min(x)), float(np.max(x))
    if high <= low:
        return np.zeros_like(x)
    return (x - low) * (255.0 / (high - low))


def _to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if bits <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    return np.clip(arr.astype(np.int64) >> (bits - 8), 0, 255).astype(np.uint8)


def display_array(
    arr: np.ndarray, properties: dict[str, Any], header: Dataset, index: int = 0, window: Window | None = None
) -> np.ndarray:
    """One decoded frame -> 8-bit grey (rows, columns) or RGB (rows, columns, 3) for display.

    Grey: Modality LUT, then the requested window, else the header's VOI LUT or window, else the
    frame's range; MONOCHROME1 is inverted last. Colour: palette through its LUT, YBR to RGB; the
    window applies to grey images only (PS3.18 8.3.5.1.4)."""
    ds = frame_header(header, index)
    named = properties.get("photometric_interpretation") or ds.get("PhotometricInterpretation")
    photometric = str(named or "MONOCHROME2").strip().upper()
    bits = int(properties.get("bits_stored") or ds.get("BitsStored") or 8 * arr.dtype.itemsize)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, header)
        return _to_8bit(rgb, 16 if rgb.dtype != np.uint8 else 8)
    if arr.ndim == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            arr = convert_color_space(arr, photometric, "RGB")
        return _to_8bit(arr, bits)
    ds.PhotometricInterpretation = photometric
    values = apply_modality_lut(arr, ds) if _has_modality_lut(ds) else arr
    if window is not None:
        out = apply_window(values, window)
    elif "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        depth = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
        out = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64) * (255.0 / ((1 << depth) - 1))
    else:
        found = header_window(ds)
        out = apply_window(values, found) if found is not None else _stretch(values)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _has_modality_lut(ds: Dataset) -> bool:
    return "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds


# --- geometry and encoding ----------------------------------------------------------------------------------


def _region(image: Image.Image, region: tuple[float, float, float | None, float | None]) -> Image.Image:
    sx, sy, sw, sh = region
    width = sw if sw is not None else image.width - sx
    height = sh if sh is not None else image.height - sy
    left, right = sorted((sx, sx + width))
    top, bottom = sorted((sy, sy + height))
    box = (
        max(0, round(left)),
        max(0, round(top)),
        min(image.width, round(right)),
        min(image.height, round(bottom)),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InvalidParameter("viewport source region lies outside the image", parameter="viewport")
    image = image.crop(box)
    if width < 0:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if height < 0:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _fit(width: int, height: int, box_width: float, box_height: float) -> tuple[int, int]:
    scale = min(box_width / width, box_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def shape(image: Image.Image, options: Options) -> Image.Image:
    """Crop to the source region, then scale to fit the viewport keeping the aspect ratio; without a
    viewport, only shrink: to the client's display width, and for thumbnails to THUMBNAIL_SIZE."""
    viewport = options.viewport
    if viewport is not None and viewport.region is not None:
        image = _region(image, viewport.region)
    if viewport is not None:
        size = _fit(image.width, image.height, viewport.width, viewport.height)
        if options.max_side is not None and max(size) > options.max_side:
            size = _fit(image.width, image.height, options.max_side, options.max_side)
    else:
        box_width = min(x for x in (options.max_width, options.max_side, image.width) if x)
        box_height = min(x for x in (options.max_side, image.height) if x)
        size = image.size
        if box_width < image.width or box_height < image.height:
            size = _fit(image.width, image.height, box_width, box_height)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def encode(image: Image.Image, media_type: str, quality: int | None = None) -> bytes:
    out = io.BytesIO()
    if media_type == PNG:
        image.save(out, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(out, format="JPEG", quality=quality or JPEG_QUALITY, optimize=True)
    return out.getvalue()


def render(
    arr: np.ndarray, properties: dict[str, Any], header: Dataset, options: Options, index: int = 0
) -> bytes:
    """One decoded frame -> the JPEG or PNG bytes the options ask for."""
    pixels = display_array(arr, properties, header, index, options.window)
    image = Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L")
    return encode(shape(image, options), options.media_type, options.quality)


def reshape_encoded(data: bytes, options: Options) -> bytes:
    """An image already rendered (a precomputed thumbnail) in the size and format the options ask for;
    the same bytes when nothing changes."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert(opened.mode if opened.mode in ("L", "RGB") else "RGB")
    shaped = shape(image, options)
    if shaped.size == image.size and options.media_type == JPEG and options.quality is None:
        return data
    return encode(shaped, options.media_type, options.quality or THUMBNAIL_QUALITY)


# --- precomputed thumbnails ---------------------------------------------------------------------------------


def thumbnail_options() -> Options:
    return Options(JPEG, THUMBNAIL_QUALITY, None, None, None, THUMBNAIL_SIZE)


def cached_thumbnail(hot: Bucket, ref: InstanceRef) -> bytes | None:
    """The thumbnail.jpg kept beside the instance's versions, or None when there is none yet."""
    try:
        return hot.get_bytes(keys.thumbnail(ref))
    except ObjectNotFound:
        return None


def store_thumbnail(hot: Bucket, ref: InstanceRef, data: bytes) -> None:
    hot.put_bytes(keys.thumbnail(ref), data)
