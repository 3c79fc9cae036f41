"""Diagnosis status per study: the index is the truth, Redis the hot copy (rebuilt when lost), study.json
in the originals bucket; stored SRs, SEGs and the notes API advance it, never backwards.

The STOW auto-advance tests need gateway/ingest.py to call diagnosis.on_instance_stored (the lead's
wiring); the notes API advances the status itself."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway import diagnosis, keys
from gateway.app import create_app
from gateway.auth import Identity
from gateway.connections import Connections
from gateway.decide import RequestFacts, decide_for_retrieve
from gateway.errors import ObjectNotFound
from gateway.notes import BASIC_TEXT_SR, NOTES_TITLE
from gateway.uids import InstanceRef
from policies.engine import Outcome
from policies.status import DiagnosisStatus
from tests.factories import make_ct
from tests.gateway.policy_support import Gateway, gateway_fixture, moved_into, stow  # noqa: F401

S = DiagnosisStatus


def status_of(gw: Gateway, study_uid: str, role: str = "referring") -> dict[str, Any]:
    response = gw.client.get(f"/api/studies/{study_uid}/diagnosis", headers=gw.auth(role))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def put_status(gw: Gateway, study_uid: str, status: Any, role: str = "radiologist") -> Any:
    return gw.client.put(
        f"/api/studies/{study_uid}/diagnosis", json={"status": status}, headers=gw.auth(role)
    )


@pytest.fixture
def study(gateway: Gateway) -> str:
    ds = make_ct()
    gateway.stow(ds)
    return str(ds.StudyInstanceUID)


def test_a_new_study_is_unread_and_redis_holds_the_hot_copy(gateway: Gateway, study: str) -> None:
    body = status_of(gateway, study)
    assert (body["status"], body["name"], body["history"]) == (1, "unread", [])
    assert gateway.conn.redis.get(diagnosis.status_key(study)) == b"1"


def test_redis_lost_the_status_is_rebuilt_from_the_index(gateway: Gateway, study: str) -> None:
    assert put_status(gateway, study, "annotated").status_code == 200
    gateway.conn.redis.flushall()
    assert diagnosis.current(gateway.conn, study) is S.ANNOTATED
    assert gateway.conn.redis.get(diagnosis.status_key(study)) == b"4"
    assert status_of(gateway, study)["status"] == 4


def test_redis_down_falls_back_to_the_index_never_to_allow_everything(
    make_settings: Any, private_redis: Any
) -> None:
    conn = Connections(make_settings(REDIS_URL=private_redis.url))
    try:
        ds = make_ct()
        stow(create_app(conn.settings, conn).test_client(), ds)
        study_uid = str(ds.StudyInstanceUID)
        private_redis.stop()
        assert diagnosis.current(conn, study_uid) is S.UNREAD
        referring = Identity("ref", frozenset({"referring"}), authenticated=True)
        decision = decide_for_retrieve(conn, referring, None, study_uid, RequestFacts())
        assert decision.outcome is Outcome.DENIED and "unread" in decision.reason
        # a status change still lands in the index (the truth); the hot copy waits for Redis
        diagnosis.set_status(conn, study_uid, S.READ, "dr-a", "radiologist")
        assert diagnosis.from_index(conn, study_uid) is S.READ
    finally:
        conn.close()


def test_history_says_who_when_from_to_and_study_json_mirrors_it(gateway: Gateway, study: str) -> None:
    assert put_status(gateway, study, 2).status_code == 200
    assert put_status(gateway, study, "reported", role="teleradiologist").status_code == 200
    history = status_of(gateway, study)["history"]
    assert [(h["who"], h["role"], h["from"], h["to"], h["source"]) for h in history] == [
        ("radiologist-1", "radiologist", 1, 2, "api"),
        ("teleradiologist-1", "teleradiologist", 2, 5, "api"),
    ]
    assert all(h["at"].endswith("+00:00") for h in history)
    record = json.loads(gateway.conn.originals.get_bytes(keys.study_record(study)))
    assert record["study_uid"] == study and record["diagnosis"]["status"] == 5
    assert record["diagnosis"]["history"] == history


def test_an_index_rebuilt_from_the_buckets_gets_the_status_back(
    gateway: Gateway, study: str, make_settings: Any
) -> None:
    put_status(gateway, study, "notes")
    record = diagnosis.read_record(gateway.conn, study)
    assert record is not None
    # a fresh index holding the same study (as `gateway index rebuild` would make it) takes the record
    fresh = Connections(make_settings())
    try:
        original = next(iter(gateway.conn.originals.list(keys.study_prefix(study) + "series/")))
        stow(create_app(fresh.settings, fresh).test_client(), gateway.conn.originals.get_bytes(original))
        assert diagnosis.from_index(fresh, study) is S.UNREAD
        diagnosis.apply_record(fresh, record)
        assert diagnosis.from_index(fresh, study) is S.NOTES
        assert [h["to"] for h in diagnosis.history(fresh, study)] == [3]
    finally:
        fresh.close()


def test_put_backwards_is_allowed_to_the_roles_that_set_status(gateway: Gateway, study: str) -> None:
    assert put_status(gateway, study, 5).get_json()["status"] == 5
    for role, code in (("radiologist", 1), ("teleradiologist", 3), ("admin", 2)):
        response = put_status(gateway, study, code, role=role)
        assert response.status_code == 200 and response.get_json()["status"] == code
    again = put_status(gateway, study, 2)
    assert again.status_code == 200 and again.get_json()["changed"] is False
    for role in ("referring", "uploader"):
        refused = put_status(gateway, study, 5, role=role)
        assert refused.status_code == 403 and f"{role} may not diagnose" in refused.get_json()["detail"]
    assert status_of(gateway, study)["status"] == 2


def test_unknown_study_and_bad_status(gateway: Gateway, study: str) -> None:
    assert put_status(gateway, "1.2.3.4", 2).status_code == 404
    bad = put_status(gateway, study, "final")
    assert bad.status_code == 400 and bad.get_json()["parameter"] == "status"
    assert "unread" in bad.get_json()["detail"]
    with pytest.raises(ObjectNotFound):
        diagnosis.current(gateway.conn, "1.2.3.4")


def test_concurrent_advances_end_at_the_highest_with_a_consistent_history(
    gateway: Gateway, study: str
) -> None:
    targets = [S.READ, S.NOTES, S.ANNOTATED, S.REPORTED, S.NOTES, S.READ, S.ANNOTATED, S.REPORTED]
    threads = [
        threading.Thread(target=diagnosis.advance, args=(gateway.conn, study, t, f"w{i}", None, "test"))
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert diagnosis.from_index(gateway.conn, study) is S.REPORTED
    history = diagnosis.history(gateway.conn, study)
    assert history[0]["from"] == 1 and history[-1]["to"] == 5
    assert all(
        a["to"] == b["from"] and b["to"] > b["from"] for a, b in zip(history, history[1:], strict=False)
    )


# --- notes --------------------------------------------------------------------------------------------------


def test_notes_become_a_partial_basic_text_sr_in_the_study(gateway: Gateway, make_settings: Any) -> None:
    ds = make_ct(PatientName="Müller^Jürgen")
    gateway.stow(ds)
    study_uid = str(ds.StudyInstanceUID)
    text = "Kein Nachweis einer Raumforderung. Follow-up in 6 Monaten."
    response = gateway.client.post(
        f"/api/studies/{study_uid}/notes", json={"text": text}, headers=gateway.auth("radiologist", "dr-b")
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == 3 and body["name"] == "notes" and body["sop_class_uid"] == BASIC_TEXT_SR
    assert response.headers["Location"] == body["retrieve_url"]
    assert body["sop_uid"].startswith(gateway.settings.uid_root)
    ref = InstanceRef(study_uid, body["series_uid"], body["sop_uid"])
    stored = pydicom.dcmread(io.BytesIO(gateway.conn.originals.get_bytes(keys.original(ref))))
    assert stored.CompletionFlag == "PARTIAL" and stored.VerificationFlag == "UNVERIFIED"
    title = stored.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == NOTES_TITLE
    assert stored.ContentSequence[-1].TextValue == text
    assert str(stored.PatientName) == "Müller^Jürgen" and stored.PatientID == ds.PatientID
    assert stored.StudyInstanceUID == study_uid
    history = status_of(gateway, study_uid)["history"]
    assert history[-1]["to"] == 3 and history[-1]["sop_uid"] == body["sop_uid"]
    # a second note goes to the same notes series, and the status does not move again
    second = gateway.client.post(
        f"/api/studies/{study_uid}/notes", data="Addendum.", content_type="text/plain",
        headers=gateway.auth("teleradiologist"),
    )  # fmt: skip
    assert second.status_code == 201 and second.get_json()["series_uid"] == body["series_uid"]
    assert len(status_of(gateway, study_uid)["history"]) == 1


def test_notes_use_the_configured_uid_root(make_settings: Any) -> None:
    conn = Connections(make_settings(UID_ROOT="1.2.826.0.1.3680043.10.543."))
    try:
        client = create_app(conn.settings, conn).test_client()
        ds = make_ct()
        stow(client, ds)
        response = client.post(f"/api/studies/{ds.StudyInstanceUID}/notes", json={"text": "ok"})
        assert response.status_code == 201
        body = response.get_json()
        for uid in (body["sop_uid"], body["series_uid"]):
            assert uid.startswith("1.2.826.0.1.3680043.10.543.") and len(uid) <= 64
    finally:
        conn.close()


def test_notes_never_move_a_study_backwards(gateway: Gateway, study: str) -> None:
    put_status(gateway, study, "reported")
    response = gateway.client.post(
        f"/api/studies/{study}/notes", json={"text": "late note"}, headers=gateway.auth("radiologist")
    )
    assert response.status_code == 201 and response.get_json()["status"] == 5


@pytest.mark.parametrize(("body", "role", "status"), [({"text": "  "}, "radiologist", 400),
                                                        ({"words": "x"}, "radiologist", 400),
                                                        ({"text": "x"}, "referring", 403),
                                                        ({"text": "x"}, "uploader", 403)])  # fmt: skip
def test_notes_refused(gateway: Gateway, study: str, body: dict[str, str], role: str, status: int) -> None:
    response = gateway.client.post(f"/api/studies/{study}/notes", json=body, headers=gateway.auth(role))
    assert response.status_code == status
    assert status_of(gateway, study)["status"] == 1


# --- objects stored through STOW advance the status (ingest's hook) -----------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sr_comprehensive_dcmtk.dcm", S.REPORTED),  # Comprehensive SR, Completion Flag COMPLETE
        ("sr_tid1500_highdicom.dcm", S.ANNOTATED),  # TID 1500 measurement report
        ("seg_liver_on_ct_series.dcm", S.ANNOTATED),  # Segmentation
    ],
)
def test_stored_diagnosis_objects_advance_their_study(
    gateway: Gateway, shared_data: Path, name: str, expected: S
) -> None:
    path = shared_data / name
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    gateway.stow(path, role="radiologist")
    body = status_of(gateway, study_uid)
    assert body["status"] == expected, body
    assert body["history"][-1]["source"].startswith("rule: ")


def test_stored_objects_never_move_a_study_backwards(gateway: Gateway, shared_data: Path) -> None:
    report = shared_data / "sr_comprehensive_dcmtk.dcm"
    study_uid = str(pydicom.dcmread(report, stop_before_pixels=True).StudyInstanceUID)
    gateway.stow(report)
    assert status_of(gateway, study_uid)["status"] == 5
    gateway.stow(moved_into(shared_data / "sr_tid1500_highdicom.dcm", study_uid))  # annotated < reported
    gateway.stow(moved_into(shared_data / "seg_liver_on_ct_series.dcm", study_uid))
    body = status_of(gateway, study_uid)
    assert body["status"] == 5 and len(body["history"]) == 1
    # corrected by hand to read, the next annotation advances it again
    assert put_status(gateway, study_uid, "read").get_json()["status"] == 2
    gateway.stow(moved_into(shared_data / "sr_tid1500_highdicom.dcm", study_uid))
    assert status_of(gateway, study_uid)["status"] == 4


def test_images_advance_nothing(gateway: Gateway, study: str) -> None:
    gateway.stow(make_ct(study_uid=study))
    assert status_of(gateway, study)["status"] == 1
