"""STOW-RS through HTTP: every part fails alone, bytes land exactly, faults leave nothing half-written."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from gateway import keys
from gateway.connections import Connections
from gateway.errors import CANNOT_UNDERSTAND, DATA_SET_MISMATCH, DUPLICATE_SOP_INSTANCE
from gateway.index.models import Instance
from gateway.uids import InstanceRef
from tests.factories import make_ct, multipart_body, to_bytes

STOW = "/dicomweb/studies"
FAILED, REFERENCED, RETRIEVE_URL, REASON = "00081198", "00081199", "00081190", "00081197"


def _post(client, parts: list[bytes], url: str = STOW, **headers: str):  # type: ignore[no-untyped-def]
    body, content_type = multipart_body(parts)
    return client.post(url, data=body, content_type=content_type, headers=headers)


def _failed(response) -> list[int]:  # type: ignore[no-untyped-def]
    return [item[REASON]["Value"][0] for item in response.get_json().get(FAILED, {}).get("Value", [])]


def _stored_uids(response) -> list[str]:  # type: ignore[no-untyped-def]
    return [item["00081155"]["Value"][0] for item in response.get_json().get(REFERENCED, {}).get("Value", [])]


def _count(conn: Connections, model: type) -> int:
    with conn.sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def _ref(ds: pydicom.Dataset) -> InstanceRef:
    return InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


@pytest.fixture
def s3_client(make_settings):  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    conn = Connections(make_settings(storage="s3"))
    yield create_app(conn.settings, conn).test_client(), conn
    conn.close()


def test_real_files_are_stored_byte_for_byte(client, conn: Connections, shared_data: Path) -> None:
    files = [
        shared_data / "ct1_nema_uncompressed.dcm",
        shared_data / "mr_ts" / "mr_rle.dcm",
        shared_data / "us_palette_10frame_rle.dcm",
        shared_data / "sr_tid1500_highdicom.dcm",
        shared_data / "ot_deflated.dcm",
        shared_data / "mg_3062x2394_jpeg_lossless.dcm",
    ]
    response = _post(client, [f.read_bytes() for f in files])
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/dicom+json"
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = conn.originals.get_bytes(keys.original(_ref(ds)))
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        with conn.sessions() as session:
            row = session.get(Instance, ds.SOPInstanceUID)
            assert row is not None and row.sha256 == hashlib.sha256(stored).hexdigest()
    items = response.get_json()[REFERENCED]["Value"]
    assert all(
        item[RETRIEVE_URL]["Value"][0].startswith("http://localhost/dicomweb/studies/") for item in items
    )


def test_both_storage_backends_store_and_refuse_alike(any_storage_settings, shared_data: Path) -> None:
    from gateway.app import create_app

    conn = Connections(any_storage_settings)
    client = create_app(conn.settings, conn).test_client()
    good = (shared_data / "ct_series_dcmqi" / "ct_01.dcm").read_bytes()
    response = _post(client, [good, b"not dicom at all"])
    assert response.status_code == 202
    assert _failed(response) == [CANNOT_UNDERSTAND]
    ds = pydicom.dcmread(io.BytesIO(good), stop_before_pixels=True)
    assert conn.originals.get_bytes(keys.original(_ref(ds))) == good
    assert list(conn.originals.list("studies/")) == [keys.original(_ref(ds))]
    conn.close()


def test_single_application_dicom_body(client, conn: Connections) -> None:
    ds = make_ct()
    response = client.post(STOW, data=to_bytes(ds), content_type="application/dicom")
    assert response.status_code == 200
    assert _stored_uids(response) == [ds.SOPInstanceUID]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("not_dicom", CANNOT_UNDERSTAND),
        ("truncated", CANNOT_UNDERSTAND),
        ("truncated_pixels", CANNOT_UNDERSTAND),
        ("no_study_uid", DATA_SET_MISMATCH),
        ("invalid_uid", DATA_SET_MISMATCH),
        ("other_study", DATA_SET_MISMATCH),
    ],
)
def test_a_bad_part_fails_alone_and_stores_nothing_of_itself(
    client, conn: Connections, shared_data: Path, case: str, reason: int
) -> None:
    target = make_ct()
    good = make_ct(study_uid=target.StudyInstanceUID)
    bad: bytes
    if case == "not_dicom":
        bad = b"\x00" * 200 + b"hello"
    elif case == "truncated":
        bad = to_bytes(make_ct(study_uid=target.StudyInstanceUID))[:-5000]
    elif case == "truncated_pixels":
        bad = (shared_data / "odd_mr_truncated_pixeldata.dcm").read_bytes()
    elif case == "no_study_uid":
        ds = make_ct()
        del ds.StudyInstanceUID
        bad = to_bytes(ds)
    elif case == "invalid_uid":
        ds = make_ct(study_uid=target.StudyInstanceUID)
        ds.SeriesInstanceUID = "1.2.abc"
        bad = to_bytes(ds)
    else:
        bad = to_bytes(make_ct())
    response = _post(client, [to_bytes(good), bad], url=f"{STOW}/{target.StudyInstanceUID}")
    assert response.status_code == 202, response.get_data(as_text=True)
    assert _failed(response) == [reason]
    assert _stored_uids(response) == [good.SOPInstanceUID]
    assert list(conn.originals.list("studies/")) == [keys.original(_ref(good))]
    assert _count(conn, Instance) == 1


def test_all_parts_failing_is_409(client, conn: Connections) -> None:
    response = _post(client, [b"junk", b"more junk"])
    assert response.status_code == 409
    assert _failed(response) == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    assert _count(conn, Instance) == 0


def test_identical_bytes_again_are_idempotent(client, conn: Connections) -> None:
    data = to_bytes(make_ct())
    first, second = _post(client, [data]), _post(client, [data])
    assert first.status_code == second.status_code == 200
    assert _stored_uids(first) == _stored_uids(second)
    assert _count(conn, Instance) == 1


def test_different_bytes_under_a_known_sop_uid_are_refused(client, conn: Connections) -> None:
    ds = make_ct()
    original = to_bytes(ds)
    assert _post(client, [original]).status_code == 200
    ds.PatientName = "Changed^Name"
    response = _post(client, [to_bytes(ds)])
    assert response.status_code == 409
    assert _failed(response) == [DUPLICATE_SOP_INSTANCE]
    assert conn.originals.get_bytes(keys.original(_ref(ds))) == original
    assert _count(conn, Instance) == 1


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/json", 415),
        ('multipart/related; type="application/dicom+json"; boundary=x', 415),
        ('multipart/related; type="application/dicom"; boundary=XYZ', 400),
    ],
)
def test_wrong_media_types_and_bodies(client, content_type: str, status: int) -> None:
    response = client.post(STOW, data=b"this is not a multipart body", content_type=content_type)
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["detail"]


def test_invalid_study_uid_in_url_is_400(client) -> None:
    body, content_type = multipart_body([to_bytes(make_ct())])
    response = client.post(f"{STOW}/1.2.abc", data=body, content_type=content_type)
    assert response.status_code == 400
    assert "StudyInstanceUID" in response.get_json()["detail"]


def test_xml_store_response_when_asked(client) -> None:
    import xml.etree.ElementTree as ET

    ds = make_ct()
    response = _post(client, [to_bytes(ds)], Accept="application/dicom+xml")
    assert response.status_code == 200
    assert response.mimetype == "application/dicom+xml"
    root = ET.fromstring(response.get_data())
    assert ds.SOPInstanceUID in response.get_data(as_text=True)
    assert root.tag.endswith("NativeDicomModel")


def test_s3_refusing_the_put_fails_the_instance_and_writes_no_row(s3_client) -> None:
    client, conn = s3_client

    def refuse(**kwargs):  # type: ignore[no-untyped-def]
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject")

    conn.originals.client.meta.events.register("before-call.s3.PutObject", refuse)
    response = _post(client, [to_bytes(make_ct())])
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert _count(conn, Instance) == 0
    assert list(conn.originals.list("studies/")) == []


def test_index_fault_after_the_put_reports_failure_and_a_retry_converges(client, conn: Connections) -> None:
    ds = make_ct()
    data = to_bytes(ds)

    def fail_instance_insert(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO INSTANCES"):
            raise OperationalError(statement, {}, Exception("injected index fault"))

    event.listen(conn.engine, "before_cursor_execute", fail_instance_insert)
    response = _post(client, [data])
    assert response.status_code == 503
    assert _count(conn, Instance) == 0
    event.remove(conn.engine, "before_cursor_execute", fail_instance_insert)
    retry = _post(client, [data])
    assert retry.status_code == 200
    assert _count(conn, Instance) == 1
    assert conn.originals.get_bytes(keys.original(_ref(ds))) == data


def test_redis_down_is_503_and_stores_nothing(make_settings) -> None:
    from gateway.app import create_app

    conn = Connections(make_settings(redis_url="redis://127.0.0.1:1/0"))
    client = create_app(conn.settings, conn).test_client()
    response = _post(client, [to_bytes(make_ct())])
    assert response.status_code == 503
    assert _count(conn, Instance) == 0
    conn.close()


def test_uploader_may_store_but_referring_may_not(make_settings) -> None:
    from gateway.app import create_app

    for role, status in (("uploader", 200), ("referring", 403)):
        conn = Connections(make_settings(default_role=role))
        client = create_app(conn.settings, conn).test_client()
        assert _post(client, [to_bytes(make_ct())]).status_code == status
        conn.close()


def test_file_meta_without_preamble_is_accepted_but_no_file_meta_is_refused(
    client, conn: Connections, shared_data: Path
) -> None:
    ds = make_ct()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, write_like_original=True)  # what dicomweb-client sends: no preamble
    assert buffer.getvalue()[:2] == b"\x02\x00"
    assert _post(client, [buffer.getvalue()]).status_code == 200
    odd = [
        (shared_data / name).read_bytes()
        for name in ("odd_no_file_meta.dcm", "odd_cr_chest_no_meta_acrnema.dcm")
    ]
    response = _post(client, odd)
    assert response.status_code == 409
    assert _failed(response) == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    assert _count(conn, Instance) == 1
