"""Frame decoding with imagecodecs through pydicom's bookkeeping, against the real shared files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from gateway import pixels
from gateway.pixels import PixelModule, UndecodablePixelData

BROKEN = {"odd_mr_truncated_pixeldata.dcm"}
NO_PIXELS = {"sr_comprehensive_dcmtk.dcm", "sr_tid1500_highdicom.dcm", "odd_no_file_meta.dcm"}


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, force=True)


def _frames(ds: pydicom.Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def test_mr_in_seven_transfer_syntaxes_decodes_identically(shared_data: Path) -> None:
    paths = sorted((shared_data / "mr_ts").glob("*.dcm"))
    assert len(paths) == 7
    arrays = {path.name: pixels.decode_dataset(_read(path))[0] for path in paths}
    reference = arrays.pop("mr_explicit_le.dcm")
    for name, arr in arrays.items():
        assert arr.shape == reference.shape, name
        assert np.array_equal(arr, reference), name


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("ct1_nema_htj2k_rpcl.dcm", "ct1_nema_uncompressed.dcm"),
        ("us1_nema_htj2k_rpcl.dcm", "us1_nema_rgb_uncompressed.dcm"),
    ],
)
def test_htj2k_decodes_to_the_uncompressed_pixels(
    shared_data: Path, compressed: str, uncompressed: str
) -> None:
    arr, properties = pixels.decode_dataset(_read(shared_data / compressed))
    reference = _read(shared_data / uncompressed).pixel_array
    assert arr.dtype == reference.dtype
    assert np.array_equal(arr, reference)
    if compressed.startswith("us1"):
        assert properties["photometric_interpretation"] == "RGB"  # YBR_RCT undone by the decoder


def _image_files(shared_data: Path) -> list[Path]:
    return sorted(path for path in shared_data.rglob("*.dcm") if path.name not in NO_PIXELS)


def test_every_image_file_decodes_or_fails_clearly(shared_data: Path) -> None:
    decoded = 0
    for path in _image_files(shared_data):
        ds = _read(path)
        if path.name in BROKEN:
            with pytest.raises(UndecodablePixelData) as failure:
                pixels.decode_dataset(ds)
            assert "less than expected" in failure.value.detail or "bytes" in failure.value.detail
            continue
        arr, properties = pixels.decode_dataset(ds)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        assert arr.shape[: 3 if frames > 1 else 2][-2:] == (ds.Rows, ds.Columns), path.name
        assert properties["rows"] == ds.Rows
        decoded += 1
    assert decoded >= 35


def test_frame_by_frame_equals_whole_decode(shared_data: Path) -> None:
    for path in _image_files(shared_data):
        ds = _read(path)
        syntax = ds.file_meta.get("TransferSyntaxUID") if "TransferSyntaxUID" in ds.file_meta else None
        if path.name in BROKEN or syntax is None or not syntax.is_encapsulated:
            continue
        whole, _ = pixels.decode_dataset(ds)
        frames = _frames(ds)
        stacked = np.stack([pixels.decode_frame(ds, frame, syntax)[0] for frame in frames])
        assert np.array_equal(stacked if len(frames) > 1 else stacked[0], whole), path.name


def test_signedness_follows_pixel_representation(shared_data: Path) -> None:
    """The J2K stream says unsigned 13-bit, Pixel Representation says signed: pydicom's rule wins."""
    ds = _read(shared_data / "odd_j2k_pixelrep_mismatch.dcm")
    arr, _ = pixels.decode_dataset(ds)
    assert arr.dtype == np.int16
    assert arr.min() < 0  # CT air, about -1000 HU before rescale, is negative once sign-corrected
    assert -(1 << 12) <= arr.min() and arr.max() < (1 << 12)
    if importlib.util.find_spec("PIL") is not None:  # an independent decoder, same bookkeeping
        reference = pydicom.pixels.pixel_array(ds, decoding_plugin="pillow")
        assert np.array_equal(arr, reference)


def test_ybr_full_422_jpeg_becomes_rgb_like_pydicom(shared_data: Path) -> None:
    ds = _read(shared_data / "us_ybr422_30frame_jpeg_baseline.dcm")
    arr, properties = pixels.decode_frame(ds, _frames(ds)[0], ds.file_meta.TransferSyntaxUID)
    assert properties["photometric_interpretation"] == "RGB"
    assert properties["planar_configuration"] == 0
    assert arr.shape == (240, 320, 3)
    if importlib.util.find_spec("PIL") is not None:
        reference = pydicom.pixels.pixel_array(ds, index=0, decoding_plugin="pillow")
        assert np.abs(arr.astype(int) - reference.astype(int)).max() <= 1


def test_native_frame_bytes_are_little_endian(shared_data: Path) -> None:
    big = _read(shared_data / "mr_ts/mr_explicit_be.dcm")
    data, _ = pixels.native_frame_bytes(big, bytes(big.PixelData), big.file_meta.TransferSyntaxUID)
    little = _read(shared_data / "mr_ts/mr_explicit_le.dcm")
    assert data == bytes(little.PixelData)


def test_one_bit_frames_are_packed() -> None:
    arr = np.zeros((8, 16), dtype=np.uint8)
    arr[0, :8] = 1
    packed = pixels.native_bytes(arr, 1)
    assert len(packed) == 16 and packed[0] == 0xFF and set(packed[1:]) == {0}


def test_corrupt_codestreams_fail_with_a_reason(shared_data: Path) -> None:
    ds = _read(shared_data / "ct1_nema_jpegls_nearlossless.dcm")
    frame = _frames(ds)[0]
    for broken in (frame[: len(frame) // 3], b"\xff\xd8garbage", b""):
        with pytest.raises(UndecodablePixelData) as failure:
            pixels.decode_frame(ds, broken, ds.file_meta.TransferSyntaxUID)
        assert "JPEG-LS" in failure.value.detail
        assert failure.value.status == 406
    with pytest.raises(UndecodablePixelData):
        pixels.decode_frame(ds, frame, "1.2.840.10008.1.2.4.100")  # MPEG-2: no frame decoder


def test_pixel_module_needs_its_attributes() -> None:
    ds = pydicom.Dataset()
    ds.Rows = 4
    with pytest.raises(UndecodablePixelData):
        PixelModule.from_dataset(ds)
    ds.Columns, ds.BitsAllocated, ds.NumberOfFrames = 5, 1, 3
    module = PixelModule.from_dataset(ds)
    assert module.frame_bits == 20 and module.total_bytes == 8  # 60 bits, packed without gaps


def test_no_gpl_decoder_is_used() -> None:
    assert importlib.util.find_spec("libjpeg") is None  # pylibjpeg-libjpeg (GPL) stays out
    for syntax in pixels.IMAGECODECS_SYNTAXES & pixels.DECODABLE:
        assert pixels._plugin_for(syntax) == pixels.PLUGIN
