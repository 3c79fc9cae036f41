"""/rendered and /thumbnail: JPEG and PNG decoded back with Pillow (size, window, MONOCHROME1), documents
and video as their own media types, never through an image codec, and the thumbnail cache."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG4HP41,
    PYDICOM_IMPLEMENTATION_UID,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    VideoPhotographicImageStorage,
)

from gateway import keys, rendering
from gateway.uids import InstanceRef, new_uid
from tests.factories import make_ct, multipart_body, to_bytes
from tests.gateway.wado_support import parts, store, with_retrieve_blueprints

ROOT = "/dicomweb"


@pytest.fixture
def app(settings: Any, conn: Any) -> Any:
    from gateway import rendered
    from gateway.app import create_app

    application = with_retrieve_blueprints(create_app(settings, conn))
    application.config["TESTING"] = True
    if "rendered" not in application.blueprints:  # until app.py registers it
        application.register_blueprint(rendered.blueprint, url_prefix=ROOT)
    return application


# --- factories: an Encapsulated PDF and an MPEG-4 video instance --------------------------------------------


def _base(sop_class: str, syntax: str, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", None) or new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.StudyDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0002"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID0001"
    ds.StudyID = "1"
    ds.SeriesNumber = 9
    ds.InstanceNumber = 1
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def small_pdf() -> bytes:
    """A real one-page PDF (Pillow writes it), odd length on purpose so the pad byte shows."""
    out = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(out, format="PDF")
    data = out.getvalue()
    return data if len(data) % 2 else data + b"\n"


def make_pdf(pdf: bytes, **attrs: Any) -> Dataset:
    """Encapsulated PDF Storage (PS3.3 A.45.1): the document in EncapsulatedDocument, padded to even."""
    ds = _base(EncapsulatedPDFStorage, ExplicitVRLittleEndian, Modality="DOC", **attrs)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "Referral letter"
    ds.BurnedInAnnotation = "YES"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    return ds


def make_video(stream: bytes, fragments: int = 3, **attrs: Any) -> Dataset:
    """Video Photographic Image Storage in MPEG-4 AVC/H.264 High Profile 4.1 (PS3.5 8.2.8): the stream
    split over several fragments, an empty Basic Offset Table. The bytes are never decoded here."""
    ds = _base(VideoPhotographicImageStorage, MPEG4HP41, Modality="XC", **attrs)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = 480, 640
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = 30
    ds.FrameTime = "33.3"
    ds.FrameIncrementPointer = 0x00181063
    size = -(-len(stream) // fragments)
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    pieces = [piece + (b"\x00" if len(piece) % 2 else b"") for piece in pieces]
    ds.PixelData = encapsulate(pieces, has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def fake_mp4(size: int = 40_000) -> bytes:
    head = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
    return head + np.random.default_rng(7).integers(0, 256, size - len(head), dtype=np.uint8).tobytes()


# --- helpers ------------------------------------------------------------------------------------------------


def _url(ds: Any, tail: str, level: str = "instance") -> str:
    url = f"{ROOT}/studies/{ds.StudyInstanceUID}"
    if level in ("series", "instance"):
        url += f"/series/{ds.SeriesInstanceUID}"
    if level == "instance":
        url += f"/instances/{ds.SOPInstanceUID}"
    return f"{url}/{tail}"


def _image(response: Any) -> Image.Image:
    assert response.status_code == 200, response.get_data(as_text=True)
    image = Image.open(io.BytesIO(response.get_data()))
    image.load()
    return image


def _grey_ct(values: np.ndarray, **attrs: Any) -> Dataset:
    ds = make_ct(rows=values.shape[0], columns=values.shape[1], **attrs)
    ds.PixelData = values.astype(np.uint16).tobytes()
    return ds


# --- images -------------------------------------------------------------------------------------------------


def test_jpeg_by_default_png_by_accept_at_full_size(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    jpeg = client.get(_url(ds, "rendered"))
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    assert _image(jpeg).format == "JPEG" and _image(jpeg).size == (512, 512)
    assert jpeg.headers["X-Served-Version"]
    png = client.get(_url(ds, "rendered"), headers={"Accept": "image/png"})
    image = _image(png)
    assert png.headers["Content-Type"] == "image/png" and image.format == "PNG"
    assert image.size == (512, 512) and image.mode == "L"
    pixels = np.asarray(image)
    assert pixels.std() > 10, "a real CT rendered with its window is not one flat colour"


def test_the_accept_query_parameter_wins_and_other_types_are_refused(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    png = client.get(_url(ds, "rendered") + "?accept=image/png", headers={"Accept": "image/jpeg"})
    assert _image(png).format == "PNG"
    refused = client.get(_url(ds, "rendered"), headers={"Accept": "image/gif"})
    assert refused.status_code == 406
    assert "image/jpeg" in refused.get_json()["detail"]


def test_viewport_fits_keeping_the_aspect_ratio_and_region_crops(client: Any) -> None:
    values = np.zeros((100, 200), dtype=np.uint16)
    values[:, 100:] = 4000  # right half bright
    ds = _grey_ct(values, WindowCenter="2000", WindowWidth="4000", RescaleIntercept="0")
    store(client, to_bytes(ds))
    image = _image(client.get(_url(ds, "rendered") + "?viewport=100,100", headers={"Accept": "image/png"}))
    assert image.size == (100, 50)
    region = _image(
        client.get(_url(ds, "rendered") + "?viewport=50,50,100,0,100,100", headers={"Accept": "image/png"})
    )
    assert region.size == (50, 50)
    assert np.asarray(region).min() > 200, "the region is the bright right half only"
    flipped = np.asarray(
        _image(
            client.get(
                _url(ds, "rendered") + "?viewport=40,20,200,0,-200,100", headers={"Accept": "image/png"}
            )
        )
    )
    assert flipped[:, :5].mean() > 200 and flipped[:, -5:].mean() < 50, "negative sw flips left-right"
    bad = client.get(_url(ds, "rendered") + "?viewport=0,abc")
    assert bad.status_code == 400 and bad.get_json()["parameter"] == "viewport"


def test_window_parameter_is_applied_with_its_function(client: Any) -> None:
    values = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (20, 1))  # 0..990 left to right
    ds = _grey_ct(values, RescaleIntercept="0", RescaleSlope="1", WindowCenter="5000", WindowWidth="10")
    store(client, to_bytes(ds))
    url = _url(ds, "rendered")
    header_window = np.asarray(_image(client.get(url, headers={"Accept": "image/png"})))
    assert header_window.max() == 0, "the header's window (center 5000) leaves everything black"
    linear = np.asarray(_image(client.get(url + "?window=500,200,linear", headers={"Accept": "image/png"})))
    row = linear[0].astype(int)
    assert row[:40].max() == 0 and row[61:].min() == 255  # below 400: black; above 600: white
    assert 100 < row[50] < 155  # the centre is mid grey
    assert np.all(np.diff(row) >= 0)
    sigmoid = np.asarray(_image(client.get(url + "?window=500,200,sigmoid", headers={"Accept": "image/png"})))
    assert 0 < sigmoid[0, 30] < 30 and 120 < sigmoid[0, 50] < 135 and sigmoid[0, 70] > 225
    wrong = client.get(url + "?window=500,200,cubic")
    assert wrong.status_code == 400 and wrong.get_json()["parameter"] == "window"


def test_monochrome1_is_inverted(client: Any) -> None:
    values = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (20, 1))
    plain = _grey_ct(values, RescaleIntercept="0", WindowCenter="500", WindowWidth="1000")
    inverted = _grey_ct(
        values,
        RescaleIntercept="0",
        WindowCenter="500",
        WindowWidth="1000",
        PhotometricInterpretation="MONOCHROME1",
    )
    store(client, to_bytes(plain), to_bytes(inverted))
    two = np.asarray(_image(client.get(_url(plain, "rendered"), headers={"Accept": "image/png"}))).astype(int)
    one = np.asarray(_image(client.get(_url(inverted, "rendered"), headers={"Accept": "image/png"}))).astype(
        int
    )
    assert two[0, 0] < 5 and two[0, -1] > 250
    assert np.abs(one + two - 255).max() <= 1


def test_real_monochrome1_dx_renders_inverted(client: Any, shared_data: Path) -> None:
    path = shared_data / "dx_small_monochrome1.dcm"
    store(client, path)
    original = pydicom.dcmread(path)
    image = np.asarray(_image(client.get(_url(original, "rendered"), headers={"Accept": "image/png"})))
    raw = original.pixel_array.astype(float)
    correlation = np.corrcoef(raw.ravel(), image.astype(float).ravel())[0, 1]
    assert correlation < -0.9, "high stored values are dark in MONOCHROME1"


@pytest.mark.parametrize(
    "name",
    ["us_palette_obxxxx1a.dcm", "us_ybr422_30frame_jpeg_baseline.dcm", "us1_nema_htj2k_rpcl.dcm"],
)
def test_colour_images_render_as_rgb(client: Any, shared_data: Path, name: str) -> None:
    path = shared_data / name
    store(client, path)
    ds = pydicom.dcmread(path)
    image = _image(client.get(_url(ds, "rendered"), headers={"Accept": "image/png"}))
    assert image.mode == "RGB" and image.size == (ds.Columns, ds.Rows)
    rgb = np.asarray(image).astype(int)
    expected = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        expected = pydicom.pixels.apply_color_lut(expected, ds)
    first = expected[0] if expected.ndim == 4 else expected
    if first.dtype != np.uint8:
        first = (first >> 8).astype(np.uint8)
    assert np.abs(rgb - first.astype(int)).mean() < 3


def test_multiframe_frames_and_warning(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_palette_10frame_rle.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    single = client.get(_url(ds, "rendered"), headers={"Accept": "image/jpeg"})
    assert _image(single).size == (600, 430) and "frame 1 of 10" in single.headers["Warning"]
    every = client.get(_url(ds, "rendered"), headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert len(parts(every)) == 10 and all(p.media_type == "image/jpeg" for p in parts(every))
    two = client.get(_url(ds, "frames/2,9/rendered"))
    assert [Image.open(io.BytesIO(p.body)).size for p in parts(two)] == [(600, 430)] * 2
    assert client.get(_url(ds, "frames/11/rendered")).status_code == 404
    assert client.get(_url(ds, "frames/x/rendered")).status_code == 400


def test_series_and_study_rendered_are_multipart_of_every_image(client: Any, shared_data: Path) -> None:
    files = sorted((shared_data / "ct_series_dcmqi").glob("*.dcm"))
    store(client, *files)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = client.get(_url(ds, "rendered", "series"), headers={"Accept": "image/jpeg"})
    assert series.status_code == 200
    assert len(parts(series)) == 3
    study = client.get(_url(ds, "rendered", "study") + "?viewport=64,64")
    assert {Image.open(io.BytesIO(p.body)).size for p in parts(study)} == {(64, 64)}


def test_client_hints_size_the_image_when_no_viewport_is_given(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    small = client.get(_url(ds, "rendered"), headers={"Sec-CH-Viewport-Width": "100", "Sec-CH-DPR": "2"})
    assert _image(small).size == (200, 200)
    wide = client.get(_url(ds, "rendered"), headers={"Viewport-Width": "1920", "DPR": "1"})
    assert _image(wide).size == (512, 512), "never enlarged without a viewport"


def test_quality_parameter_is_the_jpeg_quality(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    low = client.get(_url(ds, "rendered") + "?quality=5")
    high = client.get(_url(ds, "rendered") + "?quality=95")
    assert len(low.get_data()) * 3 < len(high.get_data())
    assert client.get(_url(ds, "rendered") + "?quality=0").status_code == 400


# --- documents and video ------------------------------------------------------------------------------------


def test_encapsulated_pdf_comes_back_as_the_pdf(client: Any) -> None:
    pdf = small_pdf()
    ds = make_pdf(pdf)
    store(client, to_bytes(ds))
    response = client.get(_url(ds, "rendered"), headers={"Accept": "application/pdf"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.get_data() == pdf, "the document exactly, without the pad byte"
    assert client.get(_url(ds, "rendered")).get_data() == pdf, "*/* (a browser tab) gets the PDF too"
    refused = client.get(_url(ds, "rendered"), headers={"Accept": "image/jpeg"})
    assert refused.status_code == 406 and "application/pdf" in refused.get_json()["detail"]
    assert client.get(_url(ds, "thumbnail")).status_code == 404


def test_mpeg4_video_comes_back_as_its_stream_with_ranges(client: Any) -> None:
    stream = fake_mp4()
    ds = make_video(stream)
    store(client, to_bytes(ds))
    whole = client.get(_url(ds, "rendered"), headers={"Accept": "video/mp4"})
    assert whole.status_code == 200, whole.get_data(as_text=True)
    assert whole.headers["Content-Type"] == "video/mp4" and whole.headers["Accept-Ranges"] == "bytes"
    assert whole.get_data().rstrip(b"\x00") == stream.rstrip(b"\x00")
    part = client.get(_url(ds, "rendered"), headers={"Accept": "video/*", "Range": "bytes=13000-27999"})
    assert part.status_code == 206
    assert part.get_data() == whole.get_data()[13000:28000]
    assert part.headers["Content-Range"] == f"bytes 13000-27999/{len(whole.get_data())}"
    assert client.get(_url(ds, "rendered"), headers={"Range": "bytes=99999999-"}).status_code == 416
    assert client.get(_url(ds, "rendered"), headers={"Accept": "image/jpeg"}).status_code == 406


# --- thumbnails ---------------------------------------------------------------------------------------------


def test_thumbnail_is_rendered_once_then_served_from_the_hot_bucket(
    client: Any, conn: Any, shared_data: Path
) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert conn.hot.head(keys.thumbnail(ref)) is None
    first = client.get(_url(ds, "thumbnail"))
    assert _image(first).size == (256, 256)
    kept = conn.hot.get_bytes(keys.thumbnail(ref))
    assert first.get_data() == kept
    # Replace the cached thumbnail with a marker image: the next answer must come from it.
    marker = io.BytesIO()
    Image.new("L", (256, 256), 77).save(marker, format="JPEG")
    conn.hot.put_bytes(keys.thumbnail(ref), marker.getvalue())
    again = client.get(_url(ds, "thumbnail"))
    assert again.get_data() == marker.getvalue()
    assert "precomputed" in again.headers["X-Policy-Reason"]
    small = _image(client.get(_url(ds, "thumbnail") + "?viewport=64,64", headers={"Accept": "image/png"}))
    assert small.size == (64, 64) and small.format == "PNG"
    assert abs(int(np.asarray(small).mean()) - 77) <= 2


def test_series_and_study_thumbnails_show_the_middle_image(client: Any, conn: Any, shared_data: Path) -> None:
    files = sorted((shared_data / "ct_series_dcmqi").glob("*.dcm"))
    store(client, *files, shared_data / "sr_tid1500_highdicom.dcm")
    middle = pydicom.dcmread(files[1], stop_before_pixels=True)
    series = client.get(
        _url(middle, "thumbnail", "series") + "?viewport=256,256", headers={"Accept": "image/jpeg"}
    )
    assert _image(series).size == (256, 256)
    ref = InstanceRef(middle.StudyInstanceUID, middle.SeriesInstanceUID, middle.SOPInstanceUID)
    assert conn.hot.get_bytes(keys.thumbnail(ref)) is not None, "the middle instance's thumbnail was kept"
    assert client.get(_url(middle, "thumbnail", "study")).get_data() == series.get_data()


def test_worker_precomputes_the_thumbnail(client: Any, conn: Any, shared_data: Path) -> None:
    from workers.thumbnails import make_thumbnail

    path = shared_data / "mr_ts/mr_rle.dcm"
    store(client, path)
    ds = pydicom.dcmread(path)
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    make_thumbnail(conn, ref)
    stored = Image.open(io.BytesIO(conn.hot.get_bytes(keys.thumbnail(ref))))
    assert stored.format == "JPEG" and max(stored.size) == rendering.THUMBNAIL_SIZE
    served = client.get(_url(ds, "thumbnail"))
    assert served.get_data() == conn.hot.get_bytes(keys.thumbnail(ref))
    sr = pydicom.dcmread(shared_data / "sr_tid1500_highdicom.dcm")
    store(client, shared_data / "sr_tid1500_highdicom.dcm")
    sr_ref = InstanceRef(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    make_thumbnail(conn, sr_ref)
    assert conn.hot.head(keys.thumbnail(sr_ref)) is None


# --- pure parts ---------------------------------------------------------------------------------------------


def test_enhanced_multiframe_takes_its_window_from_the_functional_groups(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "ct_enhanced_2frame.dcm", stop_before_pixels=True)
    flat = rendering.frame_header(ds, 0)
    assert "WindowCenter" in flat and "RescaleSlope" in flat


def test_parse_window_and_viewport() -> None:
    assert rendering.parse_window("40,400,linear-exact") == rendering.Window(40.0, 400.0, "LINEAR_EXACT")
    assert rendering.parse_viewport("512,256") == rendering.Viewport(512, 256)
    assert rendering.parse_viewport("10,10,,,20,") == rendering.Viewport(10, 10, (0.0, 0.0, 20.0, None))
    for text in ("1,2,3", "0,5", "10,10,0,0,0,5"):
        with pytest.raises(Exception, match="viewport"):
            rendering.parse_viewport(text)


# --- policy and storage backends ----------------------------------------------------------------------------


def _app_for(settings: Any) -> tuple[Any, Any]:
    from gateway import rendered
    from gateway.app import create_app
    from gateway.connections import Connections

    connections = Connections(settings)
    application = create_app(settings, connections)
    if "rendered" not in application.blueprints:
        application.register_blueprint(rendered.blueprint, url_prefix=ROOT)
    return application.test_client(), connections


def test_the_policy_decides_what_a_referring_physician_may_see_rendered(
    make_settings: Any, shared_data: Path
) -> None:
    from gateway.auth import mint_local_token

    settings = make_settings(AUTH_MODE="local")
    client, connections = _app_for(settings)
    try:
        admin = {"Authorization": f"Bearer {mint_local_token(settings, ['admin'])}"}
        referring = {"Authorization": f"Bearer {mint_local_token(settings, ['referring'])}"}
        path = shared_data / "ct1_nema_uncompressed.dcm"
        body, content_type = multipart_body([path.read_bytes()])
        stored = client.post(f"{ROOT}/studies", data=body, content_type=content_type, headers=admin)
        assert stored.status_code == 200, stored.get_data(as_text=True)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert client.get(_url(ds, "rendered")).status_code == 401
        for tail in ("rendered", "thumbnail", "frames/1/rendered"):
            refused = client.get(_url(ds, tail), headers=referring)
            assert refused.status_code == 403, (tail, refused.get_data(as_text=True))
            assert refused.headers["X-Policy-Reason"]
        assert client.get(_url(ds, "rendered"), headers=admin).status_code == 200
    finally:
        connections.close()


def test_thumbnail_cache_on_s3(make_settings: Any, shared_data: Path) -> None:
    settings = make_settings(storage="s3")
    client, connections = _app_for(settings)
    try:
        path = shared_data / "mr_ts/mr_rle.dcm"
        body, content_type = multipart_body([path.read_bytes()])
        assert client.post(f"{ROOT}/studies", data=body, content_type=content_type).status_code == 200
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        first = client.get(_url(ds, "thumbnail"))
        assert _image(first).size == (256, 256)
        ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert connections.hot.get_bytes(keys.thumbnail(ref)) == first.get_data()
        assert client.get(_url(ds, "thumbnail")).get_data() == first.get_data()
    finally:
        connections.close()
