"""WADO-RS frames and bulk data: stored codestreams for transfer-syntax=*, uncompressed frames by
default, one range read per frame, out-of-range and malformed lists, Range on single parts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from gateway import pixels
from tests.gateway.wado_support import app, parts, store, with_retrieve_blueprints  # noqa: F401

EVRLE = "1.2.840.10008.1.2.1"
OCTET = "multipart/related; type=application/octet-stream"
OHIF = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def _base(ds: pydicom.Dataset) -> str:
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )


def _frames(client: Any, ds: pydicom.Dataset, numbers: str, accept: str | None = None, **headers: str) -> Any:
    if accept:
        headers["Accept"] = accept
    return client.get(f"{_base(ds)}/frames/{numbers}", headers=headers)


def _stored_frames(ds: pydicom.Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def _native(ds: pydicom.Dataset) -> list[bytes]:
    arr, _ = pixels.decode_dataset(ds)
    frames = arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[None, ...]
    return [pixels.native_bytes(frame, int(ds.BitsAllocated)) for frame in frames]


def test_rle_ten_frames_uncompressed_by_default(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_palette_10frame_rle.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    expected = _native(ds)
    response = _frames(client, ds, "1,3,10")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["X-Served-Version"] == "original"
    found = parts(response)
    assert [p.body for p in found] == [expected[0], expected[2], expected[9]]
    assert all(p.media_type == "application/octet-stream" and p.transfer_syntax == EVRLE for p in found)


def test_rle_ten_frames_as_stored(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_palette_10frame_rle.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    stored = _stored_frames(ds)
    found = parts(_frames(client, ds, "2,5", OHIF))
    assert [p.body for p in found] == [stored[1], stored[4]]
    assert all(p.transfer_syntax == "1.2.840.10008.1.2.5" for p in found)


def test_thirty_frame_jpeg_frames(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_ybr422_30frame_jpeg_baseline.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    [stored] = parts(_frames(client, ds, "30", OHIF))
    assert stored.body == _stored_frames(ds)[29]
    assert stored.media_type == "image/jpeg"
    assert stored.transfer_syntax == "1.2.840.10008.1.2.4.50"
    explicit = 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'
    [named] = parts(_frames(client, ds, "30", explicit))
    assert named.body == stored.body
    [decoded] = parts(_frames(client, ds, "30", f"{OCTET}; transfer-syntax={EVRLE}"))
    assert decoded.body == _native(ds)[29]
    assert len(decoded.body) == 240 * 320 * 3


def test_ohif_htj2k_frame_is_the_codestream(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_htj2k_rpcl.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    [part] = parts(_frames(client, ds, "1", OHIF))
    assert part.headers["content-type"] == "image/jphc; transfer-syntax=1.2.840.10008.1.2.4.202"
    reference = pydicom.dcmread(shared_data / "ct1_nema_uncompressed.dcm").pixel_array
    assert np.array_equal(imagecodecs.htj2k_decode(part.body), reference)


@pytest.mark.parametrize(
    "name",
    [
        "mr_enhanced_small_10frame.dcm",
        "mr_ts/mr_explicit_be.dcm",
        "mr_ts/mr_implicit_le.dcm",
        "ot_deflated.dcm",
        "seg_liver_on_ct_series.dcm",
    ],
)
def test_native_frames_are_little_endian_pixels(client: Any, shared_data: Path, name: str) -> None:
    path = shared_data / name
    store(client, path)
    ds = pydicom.dcmread(path)
    expected = _native(ds)
    last = len(expected)
    for accept in (None, OHIF, 'multipart/related; type="*/*"'):  # dicomweb-client sends type="*/*"
        found = parts(_frames(client, ds, f"1,{last}", accept))
        assert [p.body for p in found] == [expected[0], expected[-1]], accept
        assert all(p.transfer_syntax == EVRLE for p in found)


def test_frame_numbers_out_of_range_or_malformed(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_palette_10frame_rle.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    response = _frames(client, ds, "1,11")
    assert response.status_code == 404
    assert "11" in response.get_json()["detail"] and "10 frame" in response.get_json()["detail"]
    for bad in ("0", "1,,2", "a", "1;2", "-1", "1.5"):
        response = _frames(client, ds, bad)
        assert response.status_code == 400, bad
        assert response.get_json()["parameter"] == "frames"


def test_frames_of_an_instance_without_pixels_are_404(client: Any, shared_data: Path) -> None:
    path = shared_data / "sr_comprehensive_dcmtk.dcm"
    store(client, path)
    response = _frames(client, pydicom.dcmread(path), "1")
    assert response.status_code == 404
    assert "no pixel data" in response.get_json()["detail"]


def test_other_frame_syntaxes_are_encoded_and_unfit_ones_406(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_jpegls_nearlossless.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    response = _frames(client, ds, "1", 'multipart/related; type="image/jp2"')
    assert response.status_code == 200, response.get_data(as_text=True)
    [part] = parts(response)
    assert part.media_type == "image/jp2" and part.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert np.array_equal(imagecodecs.jpeg2k_decode(part.body), ds.pixel_array)
    response = _frames(
        client, ds, "1", 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'
    )
    assert response.status_code == 406
    assert "8-bit samples only" in response.get_json()["detail"]
    # two frames cannot be one single part
    mr = shared_data / "mr_enhanced_small_10frame.dcm"
    store(client, mr)
    response = _frames(
        client, pydicom.dcmread(mr, stop_before_pixels=True), "1,2", "application/octet-stream"
    )
    assert response.status_code == 406


def test_single_part_frame_honours_range(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_htj2k_rpcl.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    codestream = _stored_frames(ds)[0]
    accept = "application/octet-stream; transfer-syntax=*"
    whole = _frames(client, ds, "1", accept)
    assert whole.status_code == 200 and whole.get_data() == codestream
    assert whole.headers["Accept-Ranges"] == "bytes"
    part = _frames(client, ds, "1", accept, Range="bytes=100-1099")
    assert part.status_code == 206
    assert part.get_data() == codestream[100:1100]
    assert part.headers["Content-Range"] == f"bytes 100-1099/{len(codestream)}"
    beyond = _frames(client, ds, "1", accept, Range=f"bytes={len(codestream) + 10}-")
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(codestream)}"


def test_one_range_read_per_frame_on_s3(make_settings: Any, shared_data: Path) -> None:
    from gateway.app import create_app
    from gateway.connections import Connections

    settings = make_settings(storage="s3")
    conn = Connections(settings)
    try:
        client = with_retrieve_blueprints(create_app(settings, conn)).test_client()
        path = shared_data / "us_ybr422_30frame_jpeg_baseline.dcm"
        store(client, path)
        reads: list[str | None] = []

        def count(params: dict[str, Any], **_: Any) -> None:
            reads.append(params.get("Range"))

        conn.originals.client.meta.events.register("provide-client-params.s3.GetObject", count)
        ds = pydicom.dcmread(path)
        found = parts(_frames(client, ds, "3,7,29", OHIF))
        stored = _stored_frames(ds)
        assert [p.body for p in found] == [stored[2], stored[6], stored[28]]
        assert len(reads) == 3 and all(r and r.startswith("bytes=") for r in reads), reads
        reads.clear()
        found = parts(_frames(client, ds, "4", f"{OCTET}; transfer-syntax={EVRLE}"))
        assert found[0].body == _native(ds)[3]
        assert len(reads) == 1 and reads[0], reads
    finally:
        conn.close()


# --- bulk data ---


def _bulk_uris(client: Any, ds: pydicom.Dataset) -> dict[str, str]:
    response = client.get(f"{_base(ds)}/metadata", headers={"Accept": "application/dicom+json"})
    body = response.get_data()
    if response.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    [document] = json.loads(body)
    found: dict[str, str] = {}

    def walk(dataset: dict[str, Any], prefix: str) -> None:
        for tag, element in dataset.items():
            if "BulkDataURI" in element:
                found[prefix + tag] = element["BulkDataURI"]
            for index, item in enumerate(element.get("Value") or []):
                if element.get("vr") == "SQ":
                    walk(item, f"{prefix}{tag}/{index}/")

    walk(document, "")
    return found


def test_bulkdata_of_pixels_and_other_elements(client: Any, shared_data: Path) -> None:
    path = shared_data / "mr_siemens_overlays_private.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    uris = _bulk_uris(client, ds)
    assert set(uris) >= {"7FE00010", "60003000", "00291110", "00880200/0/7FE00010"}
    for tag, expected in (
        ("7FE00010", ds.PixelData),
        ("60003000", ds[0x60003000].value),
        ("00880200/0/7FE00010", ds[0x00880200][0].PixelData),
        ("00880200/0/00281201", ds[0x00880200][0][0x00281201].value),
    ):
        url = uris.get(tag) or uris["7FE00010"].replace("7FE00010", tag)
        path_only = url[url.index("/dicomweb/") :]
        [part] = parts(client.get(path_only))
        assert part.body == expected, tag
        single = client.get(path_only, headers={"Accept": "application/octet-stream", "Range": "bytes=2-9"})
        assert single.status_code == 206
        assert single.get_data() == expected[2:10]
    base = f"{_base(ds)}/bulkdata"
    assert client.get(f"{base}/00100010x").status_code == 400
    assert client.get(f"{base}/00880200/zero/7FE00010").status_code == 400
    assert client.get(f"{base}/00431029").status_code == 404
    assert client.get(f"{base}/00880200/5/7FE00010").status_code == 404


def test_bulkdata_pixels_of_a_compressed_multiframe(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_ybr422_30frame_jpeg_baseline.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    url = f"{_base(ds)}/bulkdata/7FE00010"
    stored = parts(client.get(url, headers={"Accept": OHIF}))
    assert [p.body for p in stored] == _stored_frames(ds)
    [native] = parts(client.get(url))
    assert native.body == b"".join(_native(ds))


def test_bulkdata_pixels_of_a_large_native_object_use_ranges(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct_enhanced_2frame.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    url = f"{_base(ds)}/bulkdata/7FE00010"
    response = client.get(url, headers={"Accept": "application/octet-stream", "Range": "bytes=524288-"})
    assert response.status_code == 206
    assert response.get_data() == ds.PixelData[524288:]
