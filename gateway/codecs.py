"""HTJ2K versions: lossless and rate-targeted lossy RPCL codestreams, PSNR, resolution prefixes.

Core: arrays in, bytes out; no I/O, no Flask. OpenJPH (through imagecodecs) codes ISO/IEC 15444-15;
what DICOM asks of 1.2.840.10008.1.2.4.202 (PS3.5 A.4.4, 10.18) is written and checked here."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np

from gateway.errors import CodestreamError

MAX_LOWEST = 64  # PS3.5 10.18: the base resolution is at most 64 pixels wide and high
RATIO_TOLERANCE = 0.10  # DESIGN.md "Versions": a lossy version hits its target within +-10%
MAX_ATTEMPTS = 10
_AIM = 0.05  # stop inside +-5%: 3.4 encodes on average instead of 3.1, and |error| <= 5%
_QSTEP_MIN, _QSTEP_MAX = 2e-5, 1.0  # imagecodecs treats a step below 1e-5 as "use OpenJPH's default"
_SLOPE = 0.75  # typical d ln(ratio) / d ln(qstep) of medical images, for the first extrapolations
_PROGRESSIONS = ("LRCP", "RLCP", "RPCL", "PCRL", "CPRL")  # ISO 15444-1 Table A.16
_RGB = frozenset({"RGB", "YBR_RCT", "YBR_ICT"})  # J2K decoders hand back RGB for the last two
_YBR = frozenset({"YBR_FULL", "YBR_FULL_422"})  # decoded YBR_FULL_422 is full resolution
_MONO = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})


@dataclass(frozen=True)
class EncodeResult:
    data: bytes
    ratio: float  # uncompressed size (at the input's Bits Allocated) over the codestream size
    psnr: float  # dB against the input, peak 2**bits_stored - 1; inf when identical
    qstep: float  # the quantisation step that made `data` (start the next slice of a series from it)
    attempts: int
    target_ratio: float

    @property
    def hit(self) -> bool:
        return abs(self.ratio / self.target_ratio - 1) <= RATIO_TOLERANCE


@dataclass(frozen=True)
class TilePart:
    tile: int
    index: int  # TPsot; in our codestreams tile-part k holds resolution k
    start: int  # offset of its SOT marker
    end: int  # offset just past its last byte


@dataclass(frozen=True)
class CodestreamInfo:
    width: int
    height: int
    components: int
    precision: int
    signed: bool
    htj2k: bool  # Rsiz says Part 15 and a CAP marker is present
    progression: str
    levels: int  # decompositions: resolutions 0 (lowest) .. levels (full size)
    reversible: bool  # 5/3 wavelet, so lossless
    colour_transform: bool
    tiles: int
    tlm: bool
    tile_parts: tuple[TilePart, ...]
    header_end: int  # offset of the first SOT

    def size_at(self, level: int) -> tuple[int, int]:
        """(width, height) of resolution `level` (ISO 15444-1 B.5, image origin 0)."""
        shift = self.levels - level
        return -(-self.width // (1 << shift)), -(-self.height // (1 << shift))

    @property
    def lowest(self) -> tuple[int, int]:
        return self.size_at(0)

    def problems(self) -> list[str]:
        """What keeps this codestream from 1.2.840.10008.1.2.4.202 (PS3.5 10.18) and from prefix decoding."""
        found = []
        if not self.htj2k:
            found.append("not an HTJ2K (ISO 15444-15) codestream")
        if self.progression != "RPCL":
            found.append(f"progression {self.progression}, not RPCL")
        if not self.tlm:
            found.append("no TLM marker")
        if max(self.lowest) > MAX_LOWEST:
            found.append(f"lowest resolution {self.lowest} exceeds {MAX_LOWEST} px")
        if len(self.tile_parts) != self.tiles * (self.levels + 1):
            found.append(f"{len(self.tile_parts)} tile-parts for {self.levels + 1} resolutions")
        return found


def decomposition_levels(width: int, height: int) -> int:
    """Fewest decompositions that bring the longer side to <= 64 px; at least one (imagecodecs
    reads 0 as "OpenJPH's default of 5")."""
    levels, side = 0, max(width, height)
    while -(-side // (1 << levels)) > MAX_LOWEST:
        levels += 1
    return max(levels, 1)


def coded_photometric(photometric: str, *, lossy: bool) -> str:
    """Photometric Interpretation the header must carry for what encode_* made of `photometric`
    (PS3.5 8.2.14 / Table 8.2.4-1: RGB goes through the RCT or ICT, YBR_FULL is coded as is)."""
    if photometric in _RGB:
        return "YBR_ICT" if lossy else "YBR_RCT"
    if photometric in _YBR:
        return "YBR_FULL"
    return photometric


def encode_lossless(pixels: np.ndarray, *, bits_stored: int, signed: bool, photometric: str) -> bytes:
    """Reversible 5/3 HTJ2K, RPCL, TLM, one tile-part per resolution: 1.2.840.10008.1.2.4.202.

    Bits above `bits_stored` are not pixel data (PS3.5 8.1.1) and are dropped (unsigned) or replaced
    by the sign (signed), as pydicom does; the codestream's precision is `bits_stored` (PS3.5 8.2.4:
    the header's Bits Stored must match the codestream)."""
    values = _pixel_values(pixels, bits_stored, signed, photometric)
    return _encode(values, bits_stored, signed, photometric, qstep=None)


def encode_lossy(
    pixels: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    photometric: str,
    target_ratio: float,
    start_qstep: float | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> EncodeResult:
    """Irreversible 9/7 HTJ2K (RPCL, TLM, tile-parts per resolution) at `target_ratio`.

    OpenJPH has no rate control, so this searches the quantisation step (imagecodecs' `level`, relative
    to full scale): secant steps on ln(ratio) against ln(qstep), kept inside the inner 70% of the
    bracket found so far, at most `max_attempts` encodes. The closest try is returned; `hit` says
    whether it is within +-10% (tiny images may miss: the headers alone are ~150 bytes). Pass the
    previous slice's `qstep` as `start_qstep` to hit in one encode. RGB goes through the ICT."""
    if photometric == "PALETTE COLOR":
        raise ValueError("palette indices cannot be coded lossy; convert them to RGB first")
    if target_ratio <= 1:
        raise ValueError(f"target ratio {target_ratio} must be above 1")
    values = _pixel_values(pixels, bits_stored, signed, photometric)
    raw = pixels.size * pixels.dtype.itemsize
    goal = math.log(target_ratio)
    q = start_qstep or 1e-3 * (target_ratio / 10) ** (1 / _SLOPE)
    tried: list[tuple[float, float, bytes]] = []  # (ln qstep, ln ratio, data)
    for _ in range(max_attempts):
        q = min(max(q, _QSTEP_MIN), _QSTEP_MAX)
        data = _encode(values, bits_stored, signed, photometric, qstep=q)
        tried.append((math.log(q), math.log(raw / len(data)), data))
        error = tried[-1][1] - goal
        if abs(math.expm1(error)) <= _AIM:
            break
        if (error < 0 and q >= _QSTEP_MAX) or (error > 0 and q <= _QSTEP_MIN):
            break  # the target is outside what any step reaches
        q = math.exp(_next_log_qstep(tried, goal))
    lq, lr, data = min(tried, key=lambda t: abs(t[1] - goal))
    quality = psnr(values, decode(data), bits_stored)
    return EncodeResult(data, math.exp(lr), quality, math.exp(lq), len(tried), target_ratio)


def _next_log_qstep(tried: list[tuple[float, float, bytes]], goal: float) -> float:
    below = [t for t in tried if t[1] < goal]  # ratio too low: the step must grow
    above = [t for t in tried if t[1] > goal]
    if below and above:
        lo, hi = max(below, key=lambda t: t[0]), min(above, key=lambda t: t[0])
        share = (goal - lo[1]) / (hi[1] - lo[1]) if hi[1] > lo[1] else 0.5
        return lo[0] + min(max(share, 0.15), 0.85) * (hi[0] - lo[0])
    side = below or above
    (q1, r1, _), (q2, r2, _) = side[-2:] if len(side) > 1 else side * 2
    slope = min(max((r2 - r1) / (q2 - q1), 0.3), 3.0) if q1 != q2 else _SLOPE
    return q2 + max(min((goal - r2) / slope, 3.0), -3.0)  # at most a factor of 20 in one step


def psnr(reference: np.ndarray, candidate: np.ndarray, bits_stored: int) -> float:
    """Peak signal-to-noise ratio in dB with peak 2**bits_stored - 1 over every sample; inf when equal."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
    diff = reference.astype(np.float64) - candidate.astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0:
        return math.inf
    peak = float((1 << bits_stored) - 1)
    return 10 * math.log10(peak * peak / mse)


def validate_codestream(data: bytes) -> CodestreamInfo:
    """Parse the main header (SIZ, CAP, COD, TLM) and walk the tile-parts by their SOT lengths.

    Raises:
        CodestreamError: not a J2K codestream, or truncated."""
    if data[:4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("not a JPEG 2000 codestream (no SOC followed by SIZ)")
    segments = _main_segments(data)
    siz = segments.get(0xFF51)
    cod = segments.get(0xFF52)
    if siz is None or cod is None or len(siz[0]) < 39 or len(cod[0]) < 10:
        raise CodestreamError("main header lacks a complete SIZ or COD marker")
    rsiz, width, height, xo, yo, tw, th, txo, tyo, count = struct.unpack(">H8IH", siz[0][:36])
    width, height = width - xo, height - yo
    if min(width, height, tw, th, count) <= 0:
        raise CodestreamError("SIZ declares an empty image, tile or component list")
    ssiz = siz[0][36]  # the first component's; ours are all alike
    tiles = -(-(width + xo - txo) // tw) * -(-(height + yo - tyo) // th)
    progression = _PROGRESSIONS[cod[0][1]] if cod[0][1] < len(_PROGRESSIONS) else f"unknown {cod[0][1]}"
    return CodestreamInfo(
        width=width,
        height=height,
        components=count,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        htj2k=bool(rsiz & 0x4000) and 0xFF50 in segments,
        progression=progression,
        levels=cod[0][5],
        reversible=cod[0][9] == 1,
        colour_transform=cod[0][4] == 1,
        tiles=tiles,
        tlm=0xFF55 in segments,
        tile_parts=tuple(_tile_parts(data, segments[0xFF90][1] - 4)),
        header_end=segments[0xFF90][1] - 4,
    )


def _main_segments(data: bytes) -> dict[int, tuple[bytes, int]]:
    """First body and body offset of each main-header marker segment, up to the first SOT."""
    found: dict[int, tuple[bytes, int]] = {}
    at = 2
    while True:
        if at + 4 > len(data):
            raise CodestreamError("main header truncated before the first tile-part")
        marker, length = struct.unpack(">HH", data[at : at + 4])
        if marker >> 8 != 0xFF or length < 2:
            raise CodestreamError(f"bad marker {marker:#06x} at offset {at}")
        found.setdefault(marker, (data[at + 4 : at + 2 + length], at + 4))
        if marker == 0xFF90:
            return found
        at += 2 + length


def _tile_parts(data: bytes, at: int) -> list[TilePart]:
    parts = []
    while at < len(data) and data[at : at + 2] != b"\xff\xd9":
        if data[at : at + 2] != b"\xff\x90" or at + 12 > len(data):
            raise CodestreamError(f"expected a tile-part (SOT) at offset {at}")
        tile, length, index, _count = struct.unpack(">HIBB", data[at + 4 : at + 12])
        end = len(data) - 2 if length == 0 else at + length  # Psot 0: up to the EOC
        if end > len(data) or length and length < 14:
            raise CodestreamError(f"tile-part at offset {at} claims {length} bytes; the data ends first")
        parts.append(TilePart(tile, index, at, end))
        at = end
    if at >= len(data):
        raise CodestreamError("no EOC marker: the codestream is truncated")
    return parts


def resolution_prefix(data: bytes, level: int) -> bytes:
    """The codestream cut after resolution `level` (0 = lowest): the main header with its TLM listing
    the kept tile-parts, tile-parts 0..level with TNsot = level + 1, then EOC (ISO 15444-1 A.4.2,
    A.7.1), so strict decoders accept it. It still declares the full image size: a decoder shows it
    full size but blurred, or at the reduced size when told to skip resolutions (htj2k skipres).
    The plain byte prefix for an HTTP Range is data[:info.tile_parts[level].end].

    Raises:
        CodestreamError: not one tile cut into one tile-part per resolution."""
    info = validate_codestream(data)
    if info.progression != "RPCL" or info.tiles != 1 or len(info.tile_parts) != info.levels + 1:
        raise CodestreamError(
            f"no resolution prefix: {info.progression}, {info.tiles} tile(s), "
            f"{len(info.tile_parts)} tile-part(s) for {info.levels + 1} resolutions"
        )
    if not 0 <= level <= info.levels:
        raise ValueError(f"resolution level {level} outside 0..{info.levels}")
    kept = info.tile_parts[: level + 1]
    out, at, tlm_done = bytearray(data[:2]), 2, False
    while at < info.header_end:
        marker, length = struct.unpack(">HH", data[at : at + 4])
        if marker != 0xFF55:
            out += data[at : at + 2 + length]
        elif not tlm_done:  # one TLM for all: Ttlm 16-bit, Ptlm 32-bit (ISO 15444-1 A.7.1)
            entries = b"".join(struct.pack(">HI", p.tile, p.end - p.start) for p in kept)
            out += struct.pack(">HHBB", 0xFF55, 4 + len(entries), 0, 0x60) + entries
            tlm_done = True
        at += 2 + length
    for part in kept:
        body = bytearray(data[part.start : part.end])
        body[11] = level + 1  # TNsot
        out += body
    return bytes(out + b"\xff\xd9")


def level_for_display(
    width: int, height: int, levels: int, display_w: int, display_h: int | None = None
) -> int:
    """Smallest resolution level whose columns and rows both cover the display; with one number, the
    level whose longer side covers it (DESIGN.md "Choosing the version")."""
    for level in range(levels + 1):
        shift = levels - level
        w, h = -(-width // (1 << shift)), -(-height // (1 << shift))
        if (max(w, h) >= display_w) if display_h is None else (w >= display_w and h >= display_h):
            return level
    return levels


def decode(data: bytes) -> np.ndarray:
    """Full-size decode, clamped to the codestream's sample range (8- or 16-bit by its precision)."""
    return decode_reduced(data, validate_codestream(data).levels)


def decode_reduced(data: bytes, level: int) -> np.ndarray:
    """Decode resolution `level` (0 = lowest) only, skipping the finer resolutions' code-blocks.

    imagecodecs casts OpenJPH's output to the sample type without clamping, so a lossy overshoot
    or a 5/3 low-pass overshoot at a reduced level wraps round (255 + 1 -> 0). The SIZ precision is
    therefore raised to >= 20 bits, signed, before decoding (no level shift; irreversible values come
    out scaled by 2**extra bits), and the result is shifted back, rounded and clamped here.

    Raises:
        CodestreamError: the codestream cannot be decoded."""
    info = validate_codestream(data)
    if not 0 <= level <= info.levels:
        raise ValueError(f"resolution level {level} outside 0..{info.levels}")
    if info.precision > 16:
        raise CodestreamError(f"{info.precision}-bit samples are not supported")
    wide = info.precision + 8 if info.precision >= 12 else 20
    extra = 0 if info.reversible else wide - info.precision
    try:
        raw = imagecodecs.htj2k_decode(
            _with_precision(data, wide, True), skipres=info.levels - level, planar=False
        )
    except (imagecodecs.Htj2kError, ValueError) as exc:
        raise CodestreamError(f"HTJ2K decoding failed: {exc}") from exc
    values = raw.astype(np.int32)
    if extra:
        values = (values + (1 << (extra - 1))) >> extra
    half = 1 << (info.precision - 1)
    if not info.signed:
        values += half
    lo, hi = (-half, half - 1) if info.signed else (0, 2 * half - 1)
    return np.clip(values, lo, hi).astype(_dtype(info.precision, info.signed))


def _pixel_values(pixels: np.ndarray, bits_stored: int, signed: bool, photometric: str) -> np.ndarray:
    """The samples as int32, reduced to `bits_stored` bits (sign-extended when signed)."""
    samples = 3 if photometric in _RGB | _YBR else 1 if photometric in _MONO else 0
    if samples == 0:
        raise ValueError(f"photometric interpretation {photometric!r} is not supported")
    if pixels.dtype.kind not in "ui" or pixels.dtype.itemsize > 2:
        raise ValueError(f"pixels of type {pixels.dtype} (need 8- or 16-bit integers)")
    if not 1 <= bits_stored <= 8 * pixels.dtype.itemsize:
        raise ValueError(f"bits stored {bits_stored} does not fit {pixels.dtype}")
    if pixels.ndim < 2 or pixels.shape[2:] != ((samples,) if samples > 1 else ()):
        raise ValueError(f"pixels of shape {pixels.shape} for {samples} sample(s) per pixel")
    values = pixels.astype(np.int32) & ((1 << bits_stored) - 1)
    if signed:
        values -= (values >> (bits_stored - 1)) << bits_stored
    return values


def _encode(
    values: np.ndarray, bits_stored: int, signed: bool, photometric: str, qstep: float | None
) -> bytes:
    """imagecodecs declares the container's bit depth (8 or 16), so a narrower `bits_stored` is fed as
    signed, level-shifted (and, for 9/7, left-aligned) container samples and the SIZ precision set to
    `bits_stored` afterwards: decoders then undo exactly that shift (ISO 15444-1 G.1.2) and, for 9/7,
    the smaller nominal range scales the step sizes back (E.1.1.1), so every decoder sees a true
    `bits_stored`-bit codestream."""
    container = 8 if bits_stored <= 8 else 16
    height, width = values.shape[:2]
    options = dict(
        resolutions=decomposition_levels(width, height),
        tlm=True,
        tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS,
        rgb=photometric in _RGB,
        reversible=qstep is None,
    )
    narrow = bits_stored < container
    samples = values
    if narrow:
        samples = values - (0 if signed else 1 << (bits_stored - 1))
        if qstep is not None:
            samples = samples << (container - bits_stored)
    dtype = _dtype(container, signed or narrow)
    data = imagecodecs.htj2k_encode(np.ascontiguousarray(samples.astype(dtype)), qstep, **options)
    return _with_precision(data, bits_stored, signed) if narrow else bytes(data)


def _with_precision(data: bytes, precision: int, signed: bool) -> bytes:
    """The codestream with every component's SIZ Ssiz (ISO 15444-1 A.5.1) set."""
    out = bytearray(data)
    count = struct.unpack(">H", out[40:42])[0]  # SOC (2) + SIZ marker, Lsiz, Rsiz, 8 x 32 bits
    for component in range(count):
        out[42 + 3 * component] = (0x80 if signed else 0) | (precision - 1)
    return bytes(out)


def _dtype(bits: int, signed: bool) -> np.dtype:
    return np.dtype(f"{'i' if signed else 'u'}{1 if bits <= 8 else 2}")
