"""Whole instances re-encoded as Explicit VR Little Endian: same elements, decoded pixels, lossy
history kept, streamed a frame at a time from a real bucket."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

from gateway import pixels, transcode
from gateway.dicomfile import read_header
from gateway.retrieve import Layout, StoredInstance
from gateway.storage.local import LocalBucket
from gateway.uids import InstanceRef, new_uid
from tests.factories import make_ct, to_bytes

EVRLE = "1.2.840.10008.1.2.1"
UNREADABLE_AT_STOW = {
    "odd_cr_chest_no_meta_acrnema.dcm",
    "odd_no_file_meta.dcm",
    "odd_mr_truncated_pixeldata.dcm",
}


@pytest.fixture
def bucket(tmp_path: Path) -> LocalBucket:
    return LocalBucket("originals", tmp_path / "originals")


def _put(bucket: LocalBucket, path: Path) -> StoredInstance:
    header, layout = read_header(str(path))
    ref = InstanceRef(new_uid(), new_uid(), new_uid())
    data = path.read_bytes()
    instance = StoredInstance(
        ref,
        str(header.get("SOPClassUID", "")),
        str(header.file_meta.TransferSyntaxUID),
        len(data),
        hashlib.sha256(data).hexdigest(),
        int(header.get("NumberOfFrames", 1) or 1),
        None,
        Layout.from_json(layout.to_json()) if layout else None,
    )
    bucket.put_file(instance.key, str(path), instance.sha256)
    return instance


def _transcoded(bucket: LocalBucket, instance: StoredInstance) -> Dataset:
    return pydicom.dcmread(io.BytesIO(b"".join(transcode.explicit_le(bucket, instance))))


def _files(shared_data: Path) -> list[Path]:
    return sorted(p for p in shared_data.rglob("*.dcm") if p.name not in UNREADABLE_AT_STOW)


def test_every_readable_file_becomes_explicit_le_with_the_same_content(
    bucket: LocalBucket, shared_data: Path
) -> None:
    for path in _files(shared_data):
        instance = _put(bucket, path)
        served = _transcoded(bucket, instance)
        original = pydicom.dcmread(path)
        assert served.file_meta.TransferSyntaxUID == EVRLE, path.name
        assert served.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        for element in original:
            if element.tag in (0x7FE00010, 0xFFFCFFFC) or element.tag.element == 0:
                continue
            if element.tag in (0x00280004, 0x00280006, 0x00282110, 0x00282112, 0x00282114):
                continue  # the decoded pixels' description, checked below
            assert element.tag in served, (path.name, element.tag)
            assert served[element.tag].value == element.value, (path.name, element)
        if "PixelData" in original:
            expected, properties = pixels.decode_dataset(original)
            assert np.array_equal(served.pixel_array, expected), path.name
            assert served.PhotometricInterpretation == properties["photometric_interpretation"]
            if original.file_meta.TransferSyntaxUID.is_encapsulated:
                assert len(served.PixelData) % 2 == 0  # PS3.5 7.1.1: even value length


def test_lossy_originals_stay_labelled_lossy(bucket: LocalBucket, shared_data: Path) -> None:
    for name, method in (
        ("us_ybr422_30frame_jpeg_baseline.dcm", "ISO_10918_1"),
        ("cr_rg2_nema_jpeg_extended_12bit.dcm", "ISO_10918_1"),
        ("ct1_nema_jpegls_nearlossless.dcm", "ISO_14495_1"),
    ):
        served = _transcoded(bucket, _put(bucket, shared_data / name))
        assert served.LossyImageCompression == "01", name
        assert method in list(np.atleast_1d(served.LossyImageCompressionMethod)), name
        assert float(np.atleast_1d(served.LossyImageCompressionRatio)[0]) > 1
    lossless = _transcoded(bucket, _put(bucket, shared_data / "mr_ts/mr_jpegls_lossless_gdcm.dcm"))
    assert lossless.get("LossyImageCompression", "00") != "01"


def test_frames_are_streamed_one_at_a_time(bucket: LocalBucket, shared_data: Path) -> None:
    instance = _put(bucket, shared_data / "us_ybr422_30frame_jpeg_baseline.dcm")
    chunks = list(transcode.explicit_le(bucket, instance))
    frame = 240 * 320 * 3
    assert len(chunks) >= 31
    assert max(len(chunk) for chunk in chunks[1:]) <= frame + 1


def _big_endian_with_overlay() -> bytes:
    ds = make_ct(rows=16, columns=16)
    ds.add_new(0x60000010, "US", 16)
    ds.add_new(0x60000011, "US", 16)
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60003000, "OW", bytes(range(32)))
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pixels_le = np.frombuffer(ds.PixelData, dtype="<u2").reshape(16, 16)
    ds.PixelData = pixels_le.astype(">u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True, little_endian=False, implicit_vr=False)
    return buffer.getvalue()


def test_big_endian_words_are_swapped_everywhere(bucket: LocalBucket, tmp_path: Path) -> None:
    path = tmp_path / "be.dcm"
    path.write_bytes(_big_endian_with_overlay())
    original = pydicom.dcmread(path)
    served = _transcoded(bucket, _put(bucket, path))
    assert np.array_equal(served.pixel_array, original.pixel_array)
    # OW words as numbers are unchanged; their bytes are in the other order
    overlay = np.frombuffer(served[0x60003000].value, dtype="<u2")
    assert np.array_equal(overlay, np.frombuffer(bytes(range(32)), dtype=">u2"))


def test_elements_after_pixel_data_are_kept(bucket: LocalBucket, tmp_path: Path) -> None:
    ds = make_ct(rows=8, columns=8)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    block = ds.private_block(0x7FE1, "GATEWAY TEST", create=True)
    block.add_new(0x01, "LO", "after the pixels")
    path = tmp_path / "tail.dcm"
    path.write_bytes(to_bytes(ds))
    served = _transcoded(bucket, _put(bucket, path))
    value = served[0x7FE11001].value  # UN: an implicit private tag's VR is unknown (PS3.5 6.2.2)
    assert (value if isinstance(value, bytes) else value.encode()) == b"after the pixels"
    assert np.array_equal(served.pixel_array, pydicom.dcmread(path).pixel_array)


def test_a_corrupt_first_frame_fails_before_any_byte(
    bucket: LocalBucket, shared_data: Path, tmp_path: Path
) -> None:
    raw = bytearray((shared_data / "mr_ts/mr_jpegls_lossless_gdcm.dcm").read_bytes())
    header, layout = read_header(str(shared_data / "mr_ts/mr_jpegls_lossless_gdcm.dcm"))
    assert layout is not None and layout.frames
    offset, length = layout.frames[0][0]
    raw[offset + 2 : offset + length] = b"\x00" * (length - 2)  # keep SOI, destroy the rest
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(bytes(raw))
    with pytest.raises(pixels.UndecodablePixelData) as failure:
        transcode.explicit_le(bucket, _put(bucket, path))
    assert failure.value.status == 406


def test_can_transcode_says_what_is_decodable(bucket: LocalBucket, shared_data: Path) -> None:
    rle = _put(bucket, shared_data / "mr_ts/mr_rle.dcm")
    assert rle.transfer_syntax == RLELossless and transcode.can_transcode(rle)
    video = StoredInstance(
        rle.ref, "", "1.2.840.10008.1.2.4.102", 1, "", 1, 1, Layout(True, 0, -1, [[[0, 2]]])
    )
    assert not transcode.can_transcode(video)
    sr = _put(bucket, shared_data / "sr_comprehensive_dcmtk.dcm")
    assert transcode.can_transcode(sr)


def test_output_is_deterministic(bucket: LocalBucket, shared_data: Path) -> None:
    instance = _put(bucket, shared_data / "ct_series_dcmqi/ct_01.dcm")
    first = b"".join(transcode.explicit_le(bucket, instance))
    second = b"".join(transcode.explicit_le(bucket, instance))
    assert first == second
    assert first[128:132] == b"DICM"


LOSSLESS_TARGETS = [
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.5",
]


@pytest.mark.parametrize("target", LOSSLESS_TARGETS)
@pytest.mark.parametrize(
    "name",
    [
        "ct1_nema_uncompressed.dcm",  # signed 16-bit
        "mr_ts/mr_explicit_be.dcm",  # 12-bit in Big Endian
        "us1_nema_rgb_uncompressed.dcm",  # RGB
        "us_ybr422_30frame_jpeg_baseline.dcm",  # lossy original, 30 frames of YBR_FULL_422
        "us_palette_10frame_rle.dcm",  # palette colour
        "nm1_nema_jpeg_lossless_sv1.dcm",
        "ot_deflated.dcm",  # frames found only by inflating the whole object
    ],
)
def test_lossless_targets_carry_the_decoded_pixels_exactly(
    bucket: LocalBucket, shared_data: Path, name: str, target: str
) -> None:
    path = shared_data / name
    instance = _put(bucket, path)
    original = pydicom.dcmread(path)
    served = pydicom.dcmread(io.BytesIO(transcode.encoded(bucket, instance, target)))
    assert served.file_meta.TransferSyntaxUID == target
    assert served.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(pixels.decode_dataset(served)[0], pixels.decode_dataset(original)[0])
    if original.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50":
        assert served.LossyImageCompression == "01"  # a lossy original stays labelled lossy
        assert served.LossyImageCompressionMethod == "ISO_10918_1"
    else:
        assert served.get("LossyImageCompression", "00") == "00"


def test_lossy_targets_append_to_the_history(bucket: LocalBucket, shared_data: Path) -> None:
    path = shared_data / "cr_rg2_nema_jpeg_extended_12bit.dcm"  # already lossy, ratio without a method
    instance = _put(bucket, path)
    served = pydicom.dcmread(io.BytesIO(transcode.encoded(bucket, instance, "1.2.840.10008.1.2.4.91")))
    assert served.LossyImageCompression == "01"
    assert list(served.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    ratios = [float(v) for v in served.LossyImageCompressionRatio]
    assert len(ratios) == 2 and ratios[1] > 1
    original = pixels.decode_dataset(pydicom.dcmread(path))[0].astype(int)
    assert np.abs(pixels.decode_dataset(served)[0].astype(int) - original).mean() < 4


def test_refusal_says_why_a_syntax_cannot_carry_an_image() -> None:
    ct = pixels.PixelModule(512, 512, 1, 16, 12, 0, "MONOCHROME2", 0, 1)
    rgb8 = pixels.PixelModule(480, 640, 3, 8, 8, 0, "RGB", 0, 1)
    seg = pixels.PixelModule(512, 512, 1, 1, 1, 0, "MONOCHROME2", 0, 3)
    assert "8-bit samples only" in (transcode.refusal(ct, "1.2.840.10008.1.2.4.50") or "")
    assert transcode.refusal(rgb8, "1.2.840.10008.1.2.4.50") is None
    assert "1-bit" in (transcode.refusal(seg, "1.2.840.10008.1.2.4.90") or "")
    assert transcode.refusal(seg, EVRLE) is None
    assert transcode.refusal(None, "1.2.840.10008.1.2.4.203") is None  # no pixels: any syntax
    assert "not a transfer syntax this gateway produces" in (
        transcode.refusal(ct, "1.2.840.10008.1.2.4.100") or ""
    )


def test_objects_without_pixels_are_relabelled_only(bucket: LocalBucket, shared_data: Path) -> None:
    path = shared_data / "sr_comprehensive_dcmtk.dcm"
    instance = _put(bucket, path)
    served = pydicom.dcmread(io.BytesIO(transcode.relabelled(bucket, instance, "1.2.840.10008.1.2.4.203")))
    original = pydicom.dcmread(path)
    assert served.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.203"
    assert served.ContentSequence == original.ContentSequence
