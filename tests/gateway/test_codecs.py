"""gateway.codecs against real images: OpenJPH encodes, OpenJPEG (an independent decoder) checks."""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.encaps import generate_frames
from pydicom.pixels import convert_color_space

from gateway import codecs
from gateway.codecs import CodestreamError


def read_image(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """A real file's first frame as pydicom (native) or OpenJPH (the NEMA HTJ2K samples) decodes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            return ds, imagecodecs.htj2k_decode(frame)
        return ds, ds.pixel_array


def assert_rpcl_versions_shape(data: bytes, width: int, height: int) -> codecs.CodestreamInfo:
    info = codecs.validate_codestream(data)
    assert info.problems() == []
    assert (info.progression, info.tlm, info.htj2k) == ("RPCL", True, True)
    assert (info.width, info.height, info.tiles) == (width, height, 1)
    assert max(info.lowest) <= 64 < max(info.size_at(1)) or info.levels == 1
    assert [part.index for part in info.tile_parts] == list(range(info.levels + 1))
    assert info.tile_parts[-1].end == len(data) - 2 and data[-2:] == b"\xff\xd9"
    return info


REAL_LOSSLESS = [
    ("ct1_nema_uncompressed.dcm", "MONOCHROME2"),  # CT, signed 16-bit
    ("ct_series_dcmqi/ct_01.dcm", "MONOCHROME2"),  # CT, signed, Implicit VR
    ("mr_ts/mr_explicit_le.dcm", "MONOCHROME2"),  # MR, 12 of 16 bits
    ("mr_siemens_overlays_private.dcm", "MONOCHROME2"),  # MR, 12-bit, overlays elsewhere
    ("dx_small_monochrome1.dcm", "MONOCHROME1"),  # DX, 8-bit, 211 x 169 (odd sizes)
    ("us_palette_obxxxx1a.dcm", "PALETTE COLOR"),  # palette indices
    ("us1_nema_rgb_uncompressed.dcm", "RGB"),  # RGB, 8-bit
]


@pytest.mark.parametrize(("name", "photometric"), REAL_LOSSLESS)
def test_lossless_real_images_decode_pixel_identical_in_both_decoders(
    shared_data: Path, name: str, photometric: str
) -> None:
    ds, pixels = read_image(shared_data / name)
    assert ds.PhotometricInterpretation == photometric
    signed = ds.PixelRepresentation == 1
    data = codecs.encode_lossless(pixels, bits_stored=ds.BitsStored, signed=signed, photometric=photometric)
    info = assert_rpcl_versions_shape(data, ds.Columns, ds.Rows)
    assert info.reversible and info.colour_transform == (photometric == "RGB")
    # PS3.5 8.2.4: the codestream's precision and sign agree with Bits Stored and Pixel Representation
    assert (info.precision, info.signed, info.components) == (ds.BitsStored, signed, ds.SamplesPerPixel)
    assert np.array_equal(imagecodecs.htj2k_decode(data), pixels)
    assert np.array_equal(imagecodecs.jpeg2k_decode(data), pixels)
    assert np.array_equal(codecs.decode(data), pixels)


def test_real_cr_lossless_and_both_rated_versions(shared_data: Path) -> None:
    """The 2140 x 1760 10-bit CR: six decompositions (34 x 28 lowest), 1/20 and 1/50 within 10%."""
    ds, pixels = read_image(shared_data / "cr_rg2_nema_htj2k_rpcl.dcm")
    data = codecs.encode_lossless(pixels, bits_stored=10, signed=False, photometric="MONOCHROME2")
    info = assert_rpcl_versions_shape(data, 1760, 2140)
    assert (info.levels, info.lowest, info.precision) == (6, (28, 34), 10)
    assert np.array_equal(imagecodecs.htj2k_decode(data), pixels)
    previous = None
    for target in (20, 50):
        result = codecs.encode_lossy(
            pixels, bits_stored=10, signed=False, photometric="MONOCHROME2", target_ratio=target
        )
        assert result.hit and abs(result.ratio / target - 1) <= 0.10
        assert result.ratio == pytest.approx(pixels.nbytes / len(result.data))
        assert result.attempts <= 6
        assert not assert_rpcl_versions_shape(result.data, 1760, 2140).reversible
        independent = codecs.psnr(pixels, imagecodecs.jpeg2k_decode(result.data), 10)
        assert result.psnr == pytest.approx(independent, abs=0.05)
        assert result.psnr > 40
        if previous is not None:
            assert result.psnr < previous.psnr and result.qstep > previous.qstep
        previous = result


@pytest.mark.parametrize(
    ("name", "photometric", "target"),
    [
        ("ct1_nema_uncompressed.dcm", "MONOCHROME2", 10),
        ("ct1_nema_uncompressed.dcm", "MONOCHROME2", 20),
        ("mr_ts/mr_explicit_le.dcm", "MONOCHROME2", 5),
        ("mr_ts/mr_explicit_le.dcm", "MONOCHROME2", 10),
        ("dx_small_monochrome1.dcm", "MONOCHROME1", 20),
        ("us1_nema_rgb_uncompressed.dcm", "RGB", 10),
    ],
)
def test_lossy_hits_the_target_ratio_and_measures_psnr(
    shared_data: Path, name: str, photometric: str, target: float
) -> None:
    ds, pixels = read_image(shared_data / name)
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    result = codecs.encode_lossy(
        pixels, bits_stored=bits, signed=signed, photometric=photometric, target_ratio=target
    )
    assert abs(result.ratio / target - 1) <= 0.10 and result.hit
    assert result.ratio == pytest.approx(pixels.nbytes / len(result.data))
    assert 1 <= result.attempts <= codecs.MAX_ATTEMPTS
    info = assert_rpcl_versions_shape(result.data, ds.Columns, ds.Rows)
    assert not info.reversible and info.colour_transform == (photometric == "RGB")
    assert (info.precision, info.signed) == (bits, signed)
    # OpenJPEG decodes independently and clamps: our PSNR is the one it gives
    independent = imagecodecs.jpeg2k_decode(result.data)
    assert np.abs(codecs.decode(result.data).astype(int) - independent).max() <= 1
    assert result.psnr == pytest.approx(codecs.psnr(pixels, independent, bits), abs=0.05)
    assert 25 < result.psnr < math.inf
    again = codecs.encode_lossy(
        pixels,
        bits_stored=bits,
        signed=signed,
        photometric=photometric,
        target_ratio=target,
        start_qstep=result.qstep,
    )
    assert again.attempts == 1 and again.data == result.data


@pytest.mark.parametrize(
    ("dtype", "bits", "signed", "samples"),
    [
        (np.uint8, 8, False, 1),
        (np.int8, 8, True, 1),
        (np.uint8, 6, False, 1),
        (np.uint16, 10, False, 1),
        (np.int16, 12, True, 1),
        (np.uint16, 16, False, 1),
        (np.int16, 16, True, 1),
        (np.uint16, 12, False, 3),
        (np.uint8, 8, False, 3),
    ],
)
def test_every_depth_and_sign_round_trips_and_lossy_stays_in_range(
    dtype: type, bits: int, signed: bool, samples: int
) -> None:
    """Full-range content with hard edges, so lossy overshoots where a decoder could wrap round."""
    rng = np.random.default_rng(bits * 10 + samples)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    shape = (150, 173, samples) if samples > 1 else (150, 173)
    pixels = np.where(rng.random(shape) < 0.5, lo, hi)
    pixels[40:110, 30:140] = rng.integers(lo, hi, endpoint=True, size=(70, 110) + shape[2:])
    pixels = pixels.astype(dtype)
    photometric = "RGB" if samples > 1 else "MONOCHROME2"
    data = codecs.encode_lossless(pixels, bits_stored=bits, signed=signed, photometric=photometric)
    info = assert_rpcl_versions_shape(data, 173, 150)
    assert (info.precision, info.signed) == (bits, signed)
    assert np.array_equal(imagecodecs.jpeg2k_decode(data), pixels)
    assert np.array_equal(codecs.decode(data), pixels)
    result = codecs.encode_lossy(
        pixels, bits_stored=bits, signed=signed, photometric=photometric, target_ratio=4
    )
    decoded = codecs.decode(result.data)
    assert decoded.min() >= lo and decoded.max() <= hi
    independent = imagecodecs.jpeg2k_decode(result.data)
    # both decoders run the 9/7 in float32: at 16 bits they may part by a few of 65535 steps
    assert np.abs(decoded.astype(int) - independent).max() <= 2 ** max(0, bits - 14)
    assert result.psnr == pytest.approx(codecs.psnr(pixels, independent, bits), abs=0.05)


def test_bits_above_bits_stored_are_not_pixel_data(shared_data: Path) -> None:
    """PS3.5 8.1.1: only bits_stored bits are the pixel; what sits above is dropped (or is the sign)."""
    _, mr = read_image(shared_data / "mr_ts/mr_explicit_le.dcm")
    dirty = mr | np.uint16(0xA000)  # garbage in bits 13 and 15 of a 12-bit image
    data = codecs.encode_lossless(dirty, bits_stored=12, signed=False, photometric="MONOCHROME2")
    assert np.array_equal(imagecodecs.jpeg2k_decode(data), mr)

    signed12 = np.array([[-2048, -1, 0, 2047]] * 8, dtype=np.int16)
    as_stored = (signed12.view(np.uint16) & 0x0FFF) | np.uint16(0x5000)  # sign bit 11, junk above
    data = codecs.encode_lossless(as_stored, bits_stored=12, signed=True, photometric="MONOCHROME2")
    assert np.array_equal(codecs.decode(data), signed12)


def test_ybr_full_is_coded_without_a_colour_transform(shared_data: Path) -> None:
    ds, rgb = read_image(shared_data / "us1_nema_rgb_uncompressed.dcm")
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    data = codecs.encode_lossless(ybr, bits_stored=8, signed=False, photometric="YBR_FULL")
    assert not codecs.validate_codestream(data).colour_transform
    assert np.array_equal(imagecodecs.jpeg2k_decode(data), ybr)
    result = codecs.encode_lossy(ybr, bits_stored=8, signed=False, photometric="YBR_FULL", target_ratio=10)
    assert result.hit and not codecs.validate_codestream(result.data).colour_transform


def test_palette_and_unknown_photometrics_are_refused() -> None:
    pixels = np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="palette"):
        codecs.encode_lossy(pixels, bits_stored=8, signed=False, photometric="PALETTE COLOR", target_ratio=10)
    with pytest.raises(ValueError, match="CMYK"):
        codecs.encode_lossless(pixels, bits_stored=8, signed=False, photometric="CMYK")
    with pytest.raises(ValueError, match="shape"):
        codecs.encode_lossless(pixels, bits_stored=8, signed=False, photometric="RGB")


def test_too_small_an_image_reports_the_miss_instead_of_looping() -> None:
    tiny = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    result = codecs.encode_lossy(
        tiny, bits_stored=8, signed=False, photometric="MONOCHROME2", target_ratio=50
    )
    assert not result.hit and result.ratio < 50 * 0.9
    assert result.attempts <= codecs.MAX_ATTEMPTS
    assert codecs.decode(result.data).shape == (32, 32)


def test_coded_photometric_follows_the_colour_transform() -> None:
    assert codecs.coded_photometric("RGB", lossy=False) == "YBR_RCT"
    assert codecs.coded_photometric("RGB", lossy=True) == "YBR_ICT"
    assert codecs.coded_photometric("YBR_FULL_422", lossy=True) == "YBR_FULL"
    assert codecs.coded_photometric("MONOCHROME1", lossy=True) == "MONOCHROME1"


def test_psnr() -> None:
    zeros = np.zeros((4, 4), np.uint8)
    assert codecs.psnr(zeros, zeros, 8) == math.inf
    assert codecs.psnr(zeros, zeros + 1, 8) == pytest.approx(20 * math.log10(255))
    assert codecs.psnr(zeros.astype(np.uint16), zeros + 16, 12) == pytest.approx(20 * math.log10(4095 / 16))
    with pytest.raises(ValueError, match="shapes"):
        codecs.psnr(zeros, zeros[:2], 8)


@pytest.mark.parametrize(("size", "levels"), [(1, 1), (64, 1), (128, 1), (129, 2), (512, 3), (2140, 6)])
def test_decomposition_levels_bring_the_longer_side_to_64(size: int, levels: int) -> None:
    assert codecs.decomposition_levels(size, 40) == codecs.decomposition_levels(40, size) == levels


def test_validate_reports_what_a_foreign_codestream_lacks(shared_data: Path) -> None:
    _, pixels = read_image(shared_data / "ct1_nema_uncompressed.dcm")
    openjpeg = imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K")  # LRCP, no TLM, Part 1
    problems = codecs.validate_codestream(openjpeg).problems()
    assert "progression LRCP, not RPCL" in problems and "no TLM marker" in problems
    assert "not an HTJ2K (ISO 15444-15) codestream" in problems

    photo = read_image_frame(shared_data / "sc_rgb_htj2k_lossless_4_201.dcm")
    info = codecs.validate_codestream(photo)
    assert info.htj2k and info.progression == "RPCL" and not info.tlm
    assert "1 tile-parts for 6 resolutions" in info.problems()
    with pytest.raises(CodestreamError, match="prefix"):
        codecs.resolution_prefix(photo, 2)


def test_prefixes_of_another_encoders_rpcl_codestream(shared_data: Path) -> None:
    """The NEMA CR as 1.2.840.10008.1.2.4.202 from another encoder: five decompositions leave 55 x 67,
    which PS3.5 10.18 allows ("width or height" <= 64) but our versions do not; prefixes still work."""
    frame = read_image_frame(shared_data / "cr_rg2_nema_htj2k_rpcl.dcm")
    info = codecs.validate_codestream(frame)
    assert info.problems() == ["lowest resolution (55, 67) exceeds 64 px"]
    prefix = codecs.resolution_prefix(frame, 2)
    assert np.array_equal(
        imagecodecs.htj2k_decode(prefix, skipres=3), imagecodecs.htj2k_decode(frame, skipres=3)
    )
    assert codecs.decode_reduced(prefix, 2).shape == (268, 220)


def read_image_frame(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def test_garbage_and_truncation_raise_codestream_errors(shared_data: Path) -> None:
    _, pixels = read_image(shared_data / "dx_small_monochrome1.dcm")
    data = codecs.encode_lossless(pixels, bits_stored=8, signed=False, photometric="MONOCHROME1")
    for broken in (b"", b"\x00" * 64, data[:60], data[: len(data) // 2]):
        with pytest.raises(CodestreamError):
            codecs.validate_codestream(broken)
    assert CodestreamError.status == 500


SMALL_CODESTREAM = codecs.encode_lossless(
    np.arange(90 * 70, dtype=np.uint16).reshape(90, 70) % 4096,
    bits_stored=12,
    signed=False,
    photometric="MONOCHROME2",
)


@given(cut=st.integers(min_value=0, max_value=400), at=st.integers(0, 300), value=st.integers(0, 255))
def test_damaged_codestreams_parse_or_raise_codestream_errors(cut: int, at: int, value: int) -> None:
    """Truncated (then closed by an EOC) or with one byte changed: never any other exception."""
    for data in (SMALL_CODESTREAM[:cut] + b"\xff\xd9", bytearray(SMALL_CODESTREAM)):
        if isinstance(data, bytearray):
            data[at] = value
        try:
            info = codecs.validate_codestream(bytes(data))
        except CodestreamError:
            continue
        assert info.tile_parts and info.tile_parts[-1].end <= len(data)


def tlm_entries(data: bytes) -> list[tuple[int, int]]:
    at = data.find(b"\xff\x55")
    length, _z, stlm = struct.unpack(">HBB", data[at + 2 : at + 6])
    assert stlm == 0x60  # Ttlm 16-bit, Ptlm 32-bit
    return [struct.unpack(">HI", data[i : i + 6]) for i in range(at + 6, at + 2 + length, 6)]


@pytest.mark.parametrize(
    ("name", "photometric"),
    [("ct1_nema_uncompressed.dcm", "MONOCHROME2"), ("us1_nema_rgb_uncompressed.dcm", "RGB")],
)
@pytest.mark.parametrize("lossy", [False, True])
def test_resolution_prefixes_decode_to_each_level(
    shared_data: Path, name: str, photometric: str, lossy: bool
) -> None:
    ds, pixels = read_image(shared_data / name)
    kwargs = dict(bits_stored=ds.BitsStored, signed=ds.PixelRepresentation == 1, photometric=photometric)
    data = (
        codecs.encode_lossy(pixels, target_ratio=10, **kwargs).data
        if lossy
        else codecs.encode_lossless(pixels, **kwargs)
    )
    info = codecs.validate_codestream(data)
    assert codecs.resolution_prefix(data, info.levels) == data
    for level in range(info.levels + 1):
        prefix = codecs.resolution_prefix(data, level)
        skip = info.levels - level
        cut = info.tile_parts[level].end
        # the original bytes up to the end of tile-part `level`, less the dropped TLM entries, plus EOC
        assert len(prefix) == cut - 6 * skip + 2 and prefix.endswith(b"\xff\xd9")
        kept = codecs.validate_codestream(prefix)
        assert len(kept.tile_parts) == level + 1
        assert tlm_entries(prefix) == [(0, p.end - p.start) for p in kept.tile_parts]
        assert all(prefix[p.start + 11] == level + 1 for p in kept.tile_parts)  # TNsot
        reduced = imagecodecs.htj2k_decode(prefix, skipres=skip)
        assert reduced.shape[:2] == info.size_at(level)[::-1]
        assert np.array_equal(reduced, imagecodecs.htj2k_decode(data, skipres=skip))
        assert np.array_equal(codecs.decode_reduced(prefix, level), codecs.decode_reduced(data, level))
        # OpenJPEG accepts the prefix too; it reconstructs full size from the resolutions present
        blurred = imagecodecs.jpeg2k_decode(prefix)
        assert blurred.shape == pixels.shape
        assert np.abs(blurred.astype(int) - codecs.decode(prefix)).max() <= (1 if lossy else 0)


def test_decode_reduced_clamps_the_low_pass_overshoot(shared_data: Path) -> None:
    """The 5/3 low-pass of hard RGB edges leaves 0..255 (-122..367 here); the same pixels coded as
    signed 16-bit (lifting is shift-equivariant, so the same subbands bar the DC) decode without
    wrapping, and clamped they are what decode_reduced gives."""
    _, pixels = read_image(shared_data / "us1_nema_rgb_uncompressed.dcm")
    data = codecs.encode_lossless(pixels, bits_stored=8, signed=False, photometric="RGB")
    levels = codecs.validate_codestream(data).levels
    wide = imagecodecs.htj2k_encode(pixels.astype(np.int16), resolutions=levels)
    for level in range(levels):
        expected = np.clip(imagecodecs.htj2k_decode(wide, skipres=levels - level), 0, 255)
        assert np.array_equal(codecs.decode_reduced(data, level), expected)
    with pytest.raises(ValueError, match="level"):
        codecs.decode_reduced(data, levels + 1)


def test_level_for_display_takes_the_smallest_covering_level() -> None:
    # CR 1760 x 2140, six decompositions: 28x34, 55x67, 110x134, 220x268, 440x535, 880x1070, 1760x2140
    assert codecs.level_for_display(1760, 2140, 6, 500, 500) == 5
    assert codecs.level_for_display(1760, 2140, 6, 440, 535) == 4
    assert codecs.level_for_display(1760, 2140, 6, 256) == 3  # one number: the longer side
    assert codecs.level_for_display(1760, 2140, 6, 20, 20) == 0
    assert codecs.level_for_display(1760, 2140, 6, 4000, 4000) == 6


@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    display_w=st.integers(1, 6000),
    display_h=st.integers(1, 6000),
)
def test_chosen_level_covers_the_display_and_the_one_below_does_not(
    width: int, height: int, display_w: int, display_h: int
) -> None:
    levels = codecs.decomposition_levels(width, height)
    level = codecs.level_for_display(width, height, levels, display_w, display_h)

    def size(k: int) -> tuple[int, int]:
        return math.ceil(width / 2 ** (levels - k)), math.ceil(height / 2 ** (levels - k))

    covers = lambda k: size(k)[0] >= display_w and size(k)[1] >= display_h  # noqa: E731
    assert covers(level) or level == levels
    assert level == 0 or not covers(level - 1)
