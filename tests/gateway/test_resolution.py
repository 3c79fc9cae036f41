"""Resolution (DESIGN.md "Resolution"): `resolution=` on frames gives the RPCL prefix that decodes to
the covering level, an HTTP Range on a frame gives bytes of the stored codestream (as Cornerstone3D's
HTJ2K streaming asks), and an instance or series retrieve with `resolution=` gives derived instances
made by decoding at the reduced level, cached in the hot bucket."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from gateway import codecs, keys, pixels, resolution
from gateway.connections import Connections
from gateway.errors import InvalidParameter
from gateway.multipart import content_type_params
from tests.gateway.test_versions_served import one_part, ref, rows, stored_and_derived, url, version_object
from tests.gateway.wado_support import app, parts  # noqa: F401

STAR = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# What Cornerstone3D's dicom-image-loader sends for a WADO-RS frame (loadImage.ts, rangeRequest.ts)
CORNERSTONE = "multipart/related; type=application/octet-stream; transfer-syntax=*"
SINGLE_STAR = "application/octet-stream; transfer-syntax=*"
EOC = b"\xff\xd9"


def first_frame(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


@pytest.fixture
def cr(client: Any, conn: Connections, shared_data: Path) -> pydicom.Dataset:
    """NEMA RG2: a 1760 x 2140 CR stored as HTJ2K RPCL, with its versions made."""
    [ds] = stored_and_derived(client, conn, shared_data / "cr_rg2_nema_htj2k_rpcl.dcm")
    assert rows(conn, ds.SOPInstanceUID)["lossless"].state == "ready"
    return ds


def test_display_parsing() -> None:
    assert resolution.parse_display("2000") == resolution.Display(long_side=2000)
    assert resolution.parse_display("1024x768") == resolution.Display(columns=1024, rows=768)
    for bad in ("", "0", "12x", "x12", "1x2x3", "-5", "abc", "99999999"):
        with pytest.raises(InvalidParameter):
            resolution.parse_display(bad)


@pytest.mark.parametrize(
    ("display", "expected"),
    [("512", (440, 535)), ("440x500", (440, 535)), ("500x500", (880, 1070)), ("4000", (1760, 2140))],
)
def test_frame_prefix_decodes_to_the_covering_level(
    client: Any, conn: Connections, cr: pydicom.Dataset, display: str, expected: tuple[int, int]
) -> None:
    lossless = first_frame(version_object(conn, cr, "lossless"))
    response = client.get(
        url(cr) + f"/frames/1?version=lossless&resolution={display}", headers={"Accept": CORNERSTONE}
    )
    part = one_part(response)
    assert response.headers["X-Served-Version"] == "lossless"
    assert response.headers["X-Served-Resolution"] == resolution.label(*expected)
    info = codecs.validate_codestream(part.body)
    assert (info.width, info.height) == (1760, 2140)  # the frame keeps its geometry...
    level = next(k for k in range(info.levels + 1) if info.size_at(k) == expected)
    reduced = codecs.decode_reduced(part.body, level)  # ...and decodes at the covering level
    assert reduced.shape == (expected[1], expected[0])
    assert np.array_equal(reduced, codecs.decode_reduced(lossless, level))
    if expected != (1760, 2140):
        assert len(part.body) < len(lossless) / 3
    else:
        assert part.body == lossless


def test_frame_prefix_of_the_original_codestream(client: Any, cr: pydicom.Dataset) -> None:
    response = client.get(url(cr) + "/frames/1?resolution=250", headers={"Accept": SINGLE_STAR})
    assert response.status_code == 200
    assert response.headers["X-Served-Version"] == "original"
    assert response.headers["X-Served-Resolution"] == "220x268"
    body = response.get_data()
    full = first_frame(cr)
    info = codecs.validate_codestream(full)
    assert np.array_equal(
        codecs.decode_reduced(body, info.levels - 3), codecs.decode_reduced(full, info.levels - 3)
    )
    # uncompressed frames keep their full size: nothing to cut
    native = client.get(url(cr) + "/frames/1?resolution=250", headers={"Accept": "application/octet-stream"})
    assert native.headers["X-Served-Resolution"] == "1760x2140"
    assert len(native.get_data()) == 1760 * 2140 * 2


def test_cornerstone_range_requests_stream_the_stored_codestream(
    client: Any, conn: Connections, cr: pydicom.Dataset
) -> None:
    lossless = first_frame(version_object(conn, cr, "lossless"))
    frame_url = url(cr) + "/frames/1?version=lossless"
    whole = client.get(frame_url, headers={"Accept": CORNERSTONE})
    assert whole.status_code == 200
    body = whole.get_data()
    first = client.get(frame_url, headers={"Accept": CORNERSTONE, "Range": "bytes=0-65535"})
    assert first.status_code == 206
    assert first.headers["Content-Range"] == f"bytes 0-65535/{len(body)}"
    assert first.headers["Content-Type"] == whole.headers["Content-Type"]  # same boundary every time
    rest = client.get(frame_url, headers={"Accept": CORNERSTONE, "Range": "bytes=65536-"})
    assert rest.status_code == 206
    assert first.get_data() + rest.get_data() == body
    [part] = parts(whole)
    assert part.body == lossless and part.transfer_syntax == "1.2.840.10008.1.2.4.202"
    # the first 64 KiB hold the levels X-Served-Resolution names: they decode to that size
    columns, rows_ = (int(v) for v in first.headers["X-Served-Resolution"].split("x"))
    info = codecs.validate_codestream(lossless)
    level = next(k for k in range(info.levels + 1) if info.size_at(k) == (columns, rows_))
    start = first.get_data().index(b"\r\n\r\n") + 4
    held = first.get_data()[start:]
    assert info.tile_parts[level].end <= len(held) < info.tile_parts[level + 1].end
    prefix = held[: info.tile_parts[level].end] + EOC
    assert np.array_equal(codecs.decode_reduced(prefix, level), codecs.decode_reduced(lossless, level))
    assert rest.headers["X-Served-Resolution"] == "1760x2140"


def test_single_part_range_is_a_byte_range_of_the_versions_codestream(
    client: Any, conn: Connections, cr: pydicom.Dataset
) -> None:
    q50 = first_frame(version_object(conn, cr, "q50"))
    response = client.get(
        url(cr) + "/frames/1?version=q50", headers={"Accept": SINGLE_STAR, "Range": "bytes=0-9999"}
    )
    assert response.status_code == 206
    assert response.get_data() == q50[:10000]
    assert response.headers["Content-Range"] == f"bytes 0-9999/{len(q50)}"
    media, params = content_type_params(response.headers["Content-Type"])
    assert media == "image/jphc" or media == "application/octet-stream"
    assert params["transfer-syntax"] == "1.2.840.10008.1.2.4.203"
    # a Range over a prefix: the representation is the prefix
    prefix = client.get(
        url(cr) + "/frames/1?version=q50&resolution=256", headers={"Accept": SINGLE_STAR, "Range": "bytes=0-"}
    )
    assert prefix.status_code == 206
    assert len(prefix.get_data()) < len(q50)


def _derived(body: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(body))


def test_instance_with_resolution_is_a_derived_instance_cached_once(
    client: Any, conn: Connections, cr: pydicom.Dataset
) -> None:
    response = client.get(url(cr) + "?resolution=512", headers={"Accept": STAR})
    part = one_part(response)
    assert response.headers["X-Served-Resolution"] == "440x535"
    assert part.headers["x-served-resolution"] == "440x535"
    derived = _derived(part.body)
    assert derived.SOPInstanceUID != cr.SOPInstanceUID
    assert derived.SOPInstanceUID.startswith("2.25.")
    assert derived.file_meta.MediaStorageSOPInstanceUID == derived.SOPInstanceUID
    assert (
        derived.StudyInstanceUID == cr.StudyInstanceUID and derived.SeriesInstanceUID == cr.SeriesInstanceUID
    )
    assert derived.ImageType[0] == "DERIVED"
    [source] = derived.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == cr.SOPInstanceUID
    assert source.ReferencedSOPClassUID == cr.SOPClassUID
    assert (derived.Rows, derived.Columns) == (535, 440)
    assert [float(v) for v in derived.PixelSpacing] == [0.8, 0.8]  # 0.2 mm x 4
    expected = codecs.decode_reduced(first_frame(cr), codecs.validate_codestream(first_frame(cr)).levels - 2)
    assert np.array_equal(pixels.decode_dataset(derived)[0], expected)
    key = keys.reduced(ref(cr), "original", 440, 535)
    cached = conn.hot.head(key)
    assert cached is not None and cached.metadata["sop-instance-uid"] == derived.SOPInstanceUID
    # the second request is served from the cache: mark the cached object and see the mark come back
    marked = _derived(conn.hot.get_bytes(key))
    marked.PatientComments = "served from the cache"
    buffer = io.BytesIO()
    marked.save_as(buffer, enforce_file_format=True)
    conn.hot.put_bytes(key, buffer.getvalue(), cached.metadata)
    again = _derived(one_part(client.get(url(cr) + "?resolution=512", headers={"Accept": STAR})).body)
    assert again.SOPInstanceUID == derived.SOPInstanceUID
    assert again.PatientComments == "served from the cache"
    # a display the full image only covers: the instance itself, under its own UID
    full = client.get(url(cr) + "?resolution=3000", headers={"Accept": STAR})
    assert full.headers["X-Served-Resolution"] == "1760x2140"
    assert _derived(one_part(full).body).SOPInstanceUID == cr.SOPInstanceUID


def test_series_with_resolution_derives_every_image_from_the_chosen_version(
    client: Any, conn: Connections, shared_data: Path
) -> None:
    slices = sorted((shared_data / "ct_series_dcmqi").glob("*.dcm"))
    datasets = stored_and_derived(client, conn, *slices)
    response = client.get(
        url(datasets[0], "series") + "?resolution=128&version=q50",
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
        },
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["X-Served-Version"] == "q50"
    assert response.headers["X-Served-Resolution"] == "128x128"
    found = [_derived(part.body) for part in parts(response)]
    assert len({ds.SOPInstanceUID for ds in found}) == 3
    by_source = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID: ds for ds in found}
    for original in datasets:
        derived = by_source[original.SOPInstanceUID]
        assert derived.SOPInstanceUID != original.SOPInstanceUID
        assert derived.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert derived.LossyImageCompression == "01"  # made from the lossy version: still labelled lossy
        assert [float(v) for v in derived.PixelSpacing] == pytest.approx(
            [float(v) * 4 for v in original.PixelSpacing]
        )
        q50 = first_frame(version_object(conn, original, "q50"))
        expected = codecs.decode_reduced(q50, codecs.validate_codestream(q50).levels - 2)
        assert np.array_equal(derived.pixel_array, expected.astype(derived.pixel_array.dtype))
        assert conn.hot.head(keys.reduced(ref(original), "q50", 128, 128)) is not None


def test_reduced_palette_images_are_reduced_in_colour(
    client: Any, conn: Connections, shared_data: Path
) -> None:
    [us] = stored_and_derived(client, conn, shared_data / "us_palette_10frame_rle.dcm")
    response = client.get(url(us) + "?resolution=150", headers={"Accept": STAR})
    derived = _derived(one_part(response).body)
    assert (derived.Rows, derived.Columns, derived.NumberOfFrames) == (108, 150, 10)
    assert derived.PhotometricInterpretation == "YBR_RCT" and "RedPaletteColorLookupTableData" not in derived
    array = pixels.decode_dataset(derived)[0]
    assert array.shape == (10, 108, 150, 3)
    rgb = pydicom.pixels.apply_color_lut(us.pixel_array[0], us)
    rgb8 = (rgb >> 8 if rgb.max() > 255 else rgb).astype(np.int32)
    coarse = rgb8[: 108 * 4 : 4, : 150 * 4 : 4]
    assert np.abs(array[0].astype(np.int32)[: coarse.shape[0], : coarse.shape[1]] - coarse).mean() < 40


def test_versions_and_reduced_instances_on_s3(make_settings: Any, shared_data: Path) -> None:
    from gateway.app import create_app
    from tests.gateway.wado_support import with_retrieve_blueprints

    settings = make_settings(storage="s3")
    conn = Connections(settings)
    try:
        client = with_retrieve_blueprints(create_app(settings, conn)).test_client()
        [ct] = stored_and_derived(client, conn, shared_data / "ct1_nema_uncompressed.dcm")
        lossless = rows(conn, ct.SOPInstanceUID)["lossless"]
        response = client.get(url(ct) + "?version=lossless", headers={"Accept": STAR})
        assert one_part(response).body == conn.hot.get_bytes(keys.version(ref(ct), "lossless"))
        assert response.headers["X-Served-Version"] == "lossless" and lossless.state == "ready"
        first = _derived(one_part(client.get(url(ct) + "?resolution=128", headers={"Accept": STAR})).body)
        cached = conn.hot.head(keys.reduced(ref(ct), "original", 128, 128))
        assert cached is not None and cached.metadata["sop-instance-uid"] == first.SOPInstanceUID
        second = _derived(one_part(client.get(url(ct) + "?resolution=128", headers={"Accept": STAR})).body)
        assert second.SOPInstanceUID == first.SOPInstanceUID
        assert [float(v) for v in second.PixelSpacing] == pytest.approx([0.661468 * 4] * 2)
    finally:
        conn.close()
