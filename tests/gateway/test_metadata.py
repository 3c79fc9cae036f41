"""WADO-RS metadata: BulkDataURIs instead of pixels, absolute under the external root, gzip when
asked, ETag/304, XML, and series answered from the precomputed document, never from the originals."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway import keys, metadata, seriesdoc
from gateway.connections import Connections
from tests.factories import make_ct, to_bytes
from tests.gateway.wado_support import app, parts, store, with_retrieve_blueprints  # noqa: F401

JSON = "application/dicom+json"


@pytest.fixture(autouse=True)
def _fresh_render_cache() -> None:
    metadata.CACHE.clear()


def _series_url(ds: pydicom.Dataset) -> str:
    return f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"


def _json(response: Any) -> Any:
    body = response.get_data()
    if response.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return json.loads(body)


def _series(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "ct_series_dcmqi").glob("*.dcm"))


def test_series_metadata_in_instance_order_with_bulkdata_uris(client: Any, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *reversed(paths))
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    response = client.get(_series_url(first), headers={"Accept": JSON})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON
    document = _json(response)
    assert [item["00200013"]["Value"][0] for item in document] == [1, 2, 3]
    for item in document:
        pixel = item["7FE00010"]
        assert set(pixel) == {"vr", "BulkDataURI"}
        sop = item["00080018"]["Value"][0]
        assert pixel["BulkDataURI"] == (
            f"http://localhost/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
            f"/instances/{sop}/bulkdata/7FE00010"
        )
    assert b"@@DICOMWEB@@" not in response.get_data()


def test_gzip_is_sent_only_when_accepted(client: Any, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    url = _series_url(pydicom.dcmread(paths[0], stop_before_pixels=True))
    plain = client.get(url)
    zipped = client.get(url, headers={"Accept-Encoding": "gzip, deflate, br"})
    assert "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.get_data()) == plain.get_data()
    assert int(zipped.headers["Content-Length"]) == len(zipped.get_data())
    assert plain.headers["ETag"] != zipped.headers["ETag"]
    assert "Accept-Encoding" in zipped.headers["Vary"]


def test_uris_follow_the_external_root_per_request(client: Any, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    url = _series_url(pydicom.dcmread(paths[0], stop_before_pixels=True))
    proxied = _json(
        client.get(
            url,
            headers={
                "X-Forwarded-Host": "pacs.example.org",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Prefix": "/imaging",
            },
        )
    )
    direct = _json(client.get(url))
    assert proxied[0]["7FE00010"]["BulkDataURI"].startswith(
        "https://pacs.example.org/imaging/dicomweb/studies/"
    )
    assert direct[0]["7FE00010"]["BulkDataURI"].startswith("http://localhost/dicomweb/studies/")


def test_etag_answers_304_until_the_series_changes(client: Any) -> None:
    ds = make_ct(InstanceNumber=1)
    store(client, to_bytes(ds))
    url = _series_url(ds)
    first = client.get(url, headers={"Accept-Encoding": "gzip"})
    etag = first.headers["ETag"]
    again = client.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
    assert again.status_code == 304
    assert again.get_data() == b""
    store(
        client,
        to_bytes(make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, InstanceNumber=2)),
    )
    changed = client.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag
    assert len(_json(changed)) == 2


def _run_queued_jobs(conn: Connections) -> None:
    from rq import Queue, SimpleWorker

    from workers import context

    context.configure(conn.settings, conn)
    queues = [Queue(name, connection=conn.redis) for name in ("default", "derive")]
    SimpleWorker(queues, connection=conn.redis).work(burst=True)


def test_series_answers_from_the_document_not_the_originals(
    client: Any, conn: Connections, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    _run_queued_jobs(conn)  # STOW queued one rebuild of the series document; the worker makes it
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for key in list(conn.originals.list("studies/")):
        conn.originals.delete(key)  # nothing can be read from the originals any more
    document_key = keys.series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID)
    before = conn.hot.get_bytes(document_key)
    caplog.set_level(logging.INFO, logger="gateway.seriesdoc")
    response = client.get(_series_url(first), headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert len(_json(response)) == 3
    assert "rebuilding" not in caplog.text  # the stored document was current: read, not rebuilt
    assert conn.hot.get_bytes(document_key) == before
    instance = client.get(
        f"{_series_url(first)[: -len('/metadata')]}/instances/{first.SOPInstanceUID}/metadata"
    )
    assert _json(instance)[0]["00080018"]["Value"] == [first.SOPInstanceUID]


def test_lost_document_is_rebuilt_on_read(client: Any, conn: Connections, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    conn.hot.delete(keys.series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID))
    assert len(_json(client.get(_series_url(first)))) == 3
    assert conn.hot.head(keys.series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID)) is not None


def test_study_metadata_joins_its_series(client: Any, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    other = make_ct(study_uid=first.StudyInstanceUID)
    store(client, to_bytes(other))
    response = client.get(
        f"/dicomweb/studies/{first.StudyInstanceUID}/metadata", headers={"Accept-Encoding": "gzip"}
    )
    document = _json(response)
    assert len(document) == 4
    assert {item["0020000E"]["Value"][0] for item in document} == {
        first.SeriesInstanceUID,
        other.SeriesInstanceUID,
    }
    assert client.get("/dicomweb/studies/1.2.3.999/metadata").status_code == 404


def test_xml_metadata_is_multipart(client: Any, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    response = client.get(
        _series_url(first), headers={"Accept": 'multipart/related; type="application/dicom+xml"'}
    )
    assert response.status_code == 200
    found = parts(response)
    assert len(found) == 3
    for part in found:
        assert part.media_type == "application/dicom+xml"
        assert b"NativeDicomModel" in part.body
        assert b'<BulkData uri="http://localhost/dicomweb/studies/' in part.body


def test_metadata_negotiation_and_errors(client: Any, shared_data: Path) -> None:
    paths = _series(shared_data)
    store(client, *paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    url = _series_url(first)
    for accepted in ("application/json", "*/*", "application/dicom+json, */*;q=0.1", "application/*"):
        assert client.get(url, headers={"Accept": accepted}).status_code == 200, accepted
    refused = client.get(url, headers={"Accept": "image/jpeg"})
    assert refused.status_code == 406
    assert "application/dicom+json" in refused.get_json()["detail"]
    missing = url.replace(first.SeriesInstanceUID, "1.2.3.4")
    assert client.get(missing).status_code == 404
    assert client.get(url.replace(first.SeriesInstanceUID, "1.2.x")).status_code == 400


def test_series_metadata_on_s3(make_settings: Any, shared_data: Path) -> None:
    from gateway.app import create_app

    settings = make_settings(storage="s3")
    conn = Connections(settings)
    try:
        client = with_retrieve_blueprints(create_app(settings, conn)).test_client()
        paths = _series(shared_data)
        store(client, *paths)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        assert len(_json(client.get(_series_url(first), headers={"Accept-Encoding": "gzip"}))) == 3
        info = conn.hot.head(keys.series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID))
        assert info is not None and info.metadata["instances"] == "3"
        assert seriesdoc.state(conn, first.StudyInstanceUID, first.SeriesInstanceUID).count == 3
    finally:
        conn.close()
