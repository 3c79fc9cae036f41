"""WADO-RS study, series and instance retrieve: exact original bytes, Explicit VR LE on request,
406 with a reason, the Accept headers real clients send, and the /api original route."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from gateway import pixels
from tests.factories import make_ct, to_bytes
from tests.gateway.wado_support import app, parts, sha256, store, with_retrieve_blueprints  # noqa: F401

EVRLE = "1.2.840.10008.1.2.1"
STAR = 'multipart/related; type="application/dicom"; transfer-syntax=*'
EXPLICIT = f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}'

COMPRESSED = [
    "ct1_nema_jpegls_nearlossless.dcm",
    "cr_rg2_nema_jpeg_extended_12bit.dcm",
    "mr_ts/mr_j2k_lossless.dcm",
    "mr_ts/mr_jpeg_lossless_sv1_dcmtk.dcm",
    "mr_ts/mr_rle.dcm",
    "us_ybr422_30frame_jpeg_baseline.dcm",
    "us_palette_10frame_rle.dcm",
    "ct1_nema_htj2k_rpcl.dcm",
    "us1_nema_htj2k_rpcl.dcm",
    "odd_j2k_pixelrep_mismatch.dcm",
]


def _url(ds: pydicom.Dataset, level: str = "instance") -> str:
    url = f"/dicomweb/studies/{ds.StudyInstanceUID}"
    if level in ("series", "instance"):
        url += f"/series/{ds.SeriesInstanceUID}"
    if level == "instance":
        url += f"/instances/{ds.SOPInstanceUID}"
    return url


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _get(client: Any, url: str, accept: str | None = None) -> Any:
    return client.get(url, headers={"Accept": accept} if accept else {})


@pytest.mark.parametrize(
    "name",
    [
        "ct1_nema_uncompressed.dcm",
        "ct1_nema_jpegls_nearlossless.dcm",
        "mr_ts/mr_rle.dcm",
        "us_ybr422_30frame_jpeg_baseline.dcm",
        "ot_deflated.dcm",
        "mg_3062x2394_jpeg_lossless.dcm",
    ],
)
def test_transfer_syntax_star_returns_the_stored_bytes(client: Any, shared_data: Path, name: str) -> None:
    path = shared_data / name
    store(client, path)
    response = _get(client, _url(_header(path)), STAR)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["X-Served-Version"] == "original"
    [part] = parts(response)
    assert sha256(part.body) == sha256(path.read_bytes())
    assert part.transfer_syntax == str(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    assert int(response.headers["Content-Length"]) == len(response.get_data())


def test_star_on_s3_storage_streams_the_exact_bytes(make_settings: Any, shared_data: Path) -> None:
    from gateway.app import create_app
    from gateway.connections import Connections

    settings = make_settings(storage="s3")
    conn = Connections(settings)
    try:
        client = with_retrieve_blueprints(create_app(settings, conn)).test_client()
        path = shared_data / "us_ybr422_30frame_jpeg_baseline.dcm"
        store(client, path)
        [part] = parts(_get(client, _url(_header(path)), STAR))
        assert sha256(part.body) == sha256(path.read_bytes())
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["mr_ts/mr_implicit_le.dcm", "mr_ts/mr_explicit_be.dcm"])
def test_implicit_and_big_endian_originals_are_reencoded_for_star(
    client: Any, shared_data: Path, name: str
) -> None:
    path = shared_data / name
    store(client, path)
    original = pydicom.dcmread(path)
    [part] = parts(_get(client, _url(original), STAR))
    assert part.transfer_syntax == EVRLE
    served = pydicom.dcmread(io.BytesIO(part.body))
    assert served.file_meta.TransferSyntaxUID == EVRLE
    assert np.array_equal(served.pixel_array, original.pixel_array)
    for element in original:
        if element.tag != 0x7FE00010 and element.tag.element != 0:
            assert served[element.tag].value == element.value, element
    # the exact received bytes stay available to a radiologist
    api = client.get(
        f"/api/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}"
        f"/instances/{original.SOPInstanceUID}/original"
    )
    assert api.status_code == 200
    assert sha256(api.get_data()) == sha256(path.read_bytes())
    assert api.headers["Content-Type"].endswith(str(original.file_meta.TransferSyntaxUID))


def test_original_route_refuses_a_referring_physician(make_settings: Any, shared_data: Path) -> None:
    from gateway.app import create_app
    from gateway.connections import Connections

    radiologist = make_settings()
    conn = Connections(radiologist)
    referring_conn = Connections(dataclasses.replace(radiologist, default_role="referring"))
    try:
        path = shared_data / "mr_ts/mr_implicit_le.dcm"
        store(with_retrieve_blueprints(create_app(radiologist, conn)).test_client(), path)
        client = with_retrieve_blueprints(create_app(referring_conn.settings, referring_conn)).test_client()
        ds = _header(path)
        url = (
            f"/api/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/original"
        )
        response = client.get(url)
        assert response.status_code == 403
        assert "radiologist" in response.get_json()["detail"]
    finally:
        conn.close()
        referring_conn.close()


@pytest.mark.parametrize("name", COMPRESSED)
def test_explicit_le_retrieve_decodes_like_pixels(client: Any, shared_data: Path, name: str) -> None:
    path = shared_data / name
    store(client, path)
    original = pydicom.dcmread(path)
    response = _get(client, _url(original), EXPLICIT)
    assert response.status_code == 200, response.get_data(as_text=True)
    [part] = parts(response)
    assert part.transfer_syntax == EVRLE
    served = pydicom.dcmread(io.BytesIO(part.body))
    assert served.file_meta.TransferSyntaxUID == EVRLE
    expected, properties = pixels.decode_dataset(original)
    assert np.array_equal(served.pixel_array, expected)
    assert served.PhotometricInterpretation == properties["photometric_interpretation"]
    assert served.SOPInstanceUID == original.SOPInstanceUID
    if original.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"):
        assert served.LossyImageCompression == "01"
        assert "ISO_10918_1" in served.LossyImageCompressionMethod


def test_default_accept_gets_explicit_le(client: Any, shared_data: Path) -> None:
    path = shared_data / "us_ybr422_30frame_jpeg_baseline.dcm"
    store(client, path)
    for accept in (None, "*/*", 'multipart/related; type="application/dicom"', "multipart/related"):
        [part] = parts(_get(client, _url(_header(path)), accept))
        assert part.transfer_syntax == EVRLE, accept
        served = pydicom.dcmread(io.BytesIO(part.body))
        assert served.PhotometricInterpretation == "RGB"  # YBR_FULL_422 JPEG decoded as pydicom does
        assert served.NumberOfFrames == 30


def test_explicit_le_original_is_sent_as_is(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    [part] = parts(_get(client, _url(_header(path)), EXPLICIT))
    assert sha256(part.body) == sha256(path.read_bytes())


def test_series_and_study_retrieve_in_instance_order(client: Any, shared_data: Path) -> None:
    paths = sorted((shared_data / "ct_series_dcmqi").glob("*.dcm"))
    store(client, *reversed(paths))
    first = _header(paths[0])
    for level in ("series", "study"):
        found = parts(_get(client, _url(first, level), STAR))
        served = [pydicom.dcmread(io.BytesIO(part.body)) for part in found]
        assert [int(ds.InstanceNumber) for ds in served] == [1, 2, 3]
        assert all(part.transfer_syntax == EVRLE for part in found)  # Implicit VR LE re-encoded
        for path, ds in zip(paths, served, strict=True):
            assert np.array_equal(ds.pixel_array, pydicom.dcmread(path).pixel_array)


def test_study_of_several_series_streams_each_original(client: Any) -> None:
    first = make_ct()
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    instances = [make_ct(study_uid=study, series_uid=series, InstanceNumber=n) for n in (2, 1)]
    instances.append(make_ct(study_uid=study, InstanceNumber=1))
    blobs = [to_bytes(ds) for ds in instances]
    store(client, *blobs)
    response = _get(client, f"/dicomweb/studies/{study}", STAR)
    found = parts(response)
    assert sorted(sha256(part.body) for part in found) == sorted(sha256(blob) for blob in blobs)
    assert int(response.headers["Content-Length"]) == len(response.get_data())
    series = parts(_get(client, _url(instances[0], "series"), STAR))
    assert [sha256(p.body) for p in series] == [sha256(blobs[1]), sha256(blobs[0])]


@pytest.mark.parametrize(
    "accept",
    [
        'multipart/related; type="application/dicom"; transfer-syntax=*',  # dicomweb-client
        "multipart/related; type=application/dicom; transfer-syntax=*",  # OHIF, unquoted
        'multipart/related;type="application/dicom";transfer-syntax=*',  # dcm4chee, no spaces
        'Multipart/Related; Type="Application/DICOM"; Transfer-Syntax=*',  # case-insensitive names
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.9, */*; q=0.1',
        'application/json, multipart/related; type="application/dicom"; transfer-syntax=*',
    ],
)
def test_accept_headers_of_real_clients(client: Any, shared_data: Path, accept: str) -> None:
    path = shared_data / "ct1_nema_jpegls_nearlossless.dcm"
    store(client, path)
    [part] = parts(_get(client, _url(_header(path)), accept))
    assert sha256(part.body) == sha256(path.read_bytes())


def test_q_values_choose_between_syntaxes(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_jpegls_nearlossless.dcm"
    store(client, path)
    url = _url(_header(path))
    prefer_stored = (
        f"{EXPLICIT}; q=0.5, "
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.81; q=0.9'
    )
    [part] = parts(_get(client, url, prefer_stored))
    assert part.transfer_syntax == "1.2.840.10008.1.2.4.81"
    prefer_explicit = (
        f"{EXPLICIT}; q=0.9, "
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.81; q=0.5'
    )
    [part] = parts(_get(client, url, prefer_explicit))
    assert part.transfer_syntax == EVRLE


def test_single_part_application_dicom_for_an_instance(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    response = _get(client, _url(_header(path)), "application/dicom")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/dicom")
    assert sha256(response.get_data()) == sha256(path.read_bytes())
    series = _get(client, _url(_header(path), "series"), "application/dicom")
    assert series.status_code == 406


@pytest.mark.parametrize(
    ("accept", "why"),
    [
        # the policy engine refuses these first: no version can go out in them (16-bit; off the web)
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50', "syntax"),
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2', "syntax"),
        ("text/html", "available"),
        ('multipart/related; type="application/octet-stream"', "available"),
    ],
)
def test_unproducible_syntaxes_are_406_with_reason(
    client: Any, shared_data: Path, accept: str, why: str
) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    response = _get(client, _url(_header(path)), accept)
    assert response.status_code == 406
    assert why in response.get_json()["detail"]


def test_a_version_not_made_yet_is_labelled_not_faked(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)  # no worker runs: the versions stay pending
    response = client.get(_url(_header(path)) + "?version=lossless", headers={"Accept": STAR})
    assert response.status_code == 503  # never the original passed off as the lossless version
    assert response.headers["Retry-After"]
    assert "lossless is pending" in response.get_json()["detail"]
    implicit = client.get(_url(_header(path)), headers={"Accept": STAR})
    assert implicit.headers["X-Served-Version"] == "original"
    [part] = parts(implicit)
    assert sha256(part.body) == sha256(path.read_bytes())
    unknown = client.get(_url(_header(path)) + "?version=q99", headers={"Accept": STAR})
    assert unknown.status_code == 400
    assert unknown.get_json()["parameter"] == "version"


def test_unknown_uids_are_404_and_bad_uids_400(client: Any, shared_data: Path) -> None:
    path = shared_data / "ct1_nema_uncompressed.dcm"
    store(client, path)
    ds = _header(path)
    assert client.get("/dicomweb/studies/1.2.3.4.5").status_code == 404
    assert client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/1.2.3").status_code == 404
    assert client.get(_url(ds, "series") + "/instances/1.2.3").status_code == 404
    for bad in ("1.2.abc", "1..2", "1.02.3", "9" * 65):
        response = client.get(f"/dicomweb/studies/{bad}")
        assert response.status_code == 400, bad
        assert response.get_json()["parameter"] == "StudyInstanceUID"


def test_large_native_original_is_streamed_in_chunks(client: Any) -> None:
    ds = make_ct(rows=512, columns=512, frames=24)  # 12 MiB of pixels
    blob = to_bytes(ds)
    store(client, blob)
    response = client.get(_url(ds), headers={"Accept": STAR}, buffered=False)
    sizes = [len(chunk) for chunk in response.response]
    response.close()
    assert max(sizes) <= 1 << 20
    assert sum(sizes) > len(blob)


def test_a_part_lost_mid_stream_truncates_the_body(client: Any, conn: Any) -> None:
    from gateway import keys
    from gateway.errors import ObjectNotFound
    from gateway.uids import InstanceRef

    first = make_ct(InstanceNumber=1)
    second = make_ct(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, InstanceNumber=2)
    store(client, to_bytes(first), to_bytes(second))
    conn.originals.delete(
        keys.original(InstanceRef(second.StudyInstanceUID, second.SeriesInstanceUID, second.SOPInstanceUID))
    )
    response = client.get(_url(first, "series"), headers={"Accept": STAR}, buffered=False)
    assert response.status_code == 200  # the first part was readable when the status went out
    with pytest.raises(ObjectNotFound):
        b"".join(response.response)  # never a complete-looking multipart body
