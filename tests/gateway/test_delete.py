"""DELETE of a study, series or instance (admin only): the original, every version, every tier's copy,
the series metadata documents, study.json and the index rows go; 204, then 404; idempotent after a
store fault midway; an audit record each time."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway import keys, tiers
from gateway.connections import Connections
from gateway.diagnosis import set_status
from gateway.index.models import DiagnosisEvent, Instance, Location, Series, Study, Version
from policies.lifecycle import load_lifecycle, rules_path
from policies.status import DiagnosisStatus
from tests.factories import make_ct
from tests.tiers_support import derive_all, full_client, ref_of, refusing, stow
from workers import lifecycle

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
def conn(make_settings, storage_kind: str) -> Iterator[Connections]:  # type: ignore[no-untyped-def]
    connections = Connections(make_settings(storage=storage_kind, DEFAULT_ROLE="admin"))
    try:
        yield connections
    finally:
        connections.close()


def everything_under(conn: Connections, prefix: str) -> list[tuple[str, str, str]]:
    return [
        (tier, cls, key) for tier in tiers.TIERS for key, cls, _size in tiers.list_copies(conn, tier, prefix)
    ]


def count(conn: Connections, model, **where: str) -> int:  # type: ignore[no-untyped-def]
    with conn.sessions() as session:
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return int(session.execute(query).scalar_one())


def populated(conn: Connections) -> tuple[list, list[bytes]]:  # type: ignore[type-arg]
    """A study of two series (2 + 1 instances) with versions, series documents, study.json and a mirror
    copy of every object in the cold bucket."""
    a1 = make_ct()
    a2 = make_ct(a1.StudyInstanceUID, a1.SeriesInstanceUID)
    b1 = make_ct(a1.StudyInstanceUID)
    data = stow(conn, [a1, a2, b1])
    derive_all(conn)
    client = full_client(conn)
    for ds in (a1, b1):
        assert (
            client.get(
                f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
            ).status_code
            == 200
        )
        assert conn.hot.head(keys.series_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID)) is not None
    set_status(conn, a1.StudyInstanceUID, DiagnosisStatus.READ, "test", "admin")
    assert conn.originals.head(keys.study_record(a1.StudyInstanceUID)) is not None
    mirror = load_lifecycle(rules_path(POLICIES, preset="mirror"), conn.rules.versions)
    report = lifecycle.run(conn, mirror)
    assert report.counts["copied"] >= 3 + 3  # originals and at least the lossless versions
    return [a1, a2, b1], data


def test_delete_instance_then_series_then_study_removes_everything_everywhere(
    conn: Connections, caplog: pytest.LogCaptureFixture
) -> None:
    (a1, a2, b1), data = populated(conn)
    client = full_client(conn)
    study = a1.StudyInstanceUID
    caplog.set_level(logging.INFO, logger="gateway.audit")
    url = f"/dicomweb/studies/{study}/series/{a1.SeriesInstanceUID}/instances/{a1.SOPInstanceUID}"
    assert client.delete(url).status_code == 204
    gone = ref_of(a1)
    assert everything_under(conn, keys.instance_prefix(gone)) == []
    assert everything_under(conn, keys.original(gone)) == []
    for model in (Instance, Version, Location):
        assert count(conn, model, sop_uid=a1.SOPInstanceUID) == 0
    assert conn.hot.head(keys.series_metadata(study, a1.SeriesInstanceUID)) is None  # stale: removed
    assert tiers.originals(conn).get_bytes(keys.original(ref_of(a2))) == data[1]  # the rest stays
    assert count(conn, Location, sop_uid=a2.SOPInstanceUID) >= 2
    assert client.delete(url).status_code == 404
    series_url = f"/dicomweb/studies/{study}/series/{b1.SeriesInstanceUID}"
    assert client.delete(series_url).status_code == 204
    assert everything_under(conn, keys.series_prefix(study, b1.SeriesInstanceUID)) == []
    assert count(conn, Series, series_uid=b1.SeriesInstanceUID) == 0
    assert count(conn, Study, study_uid=study) == 1
    assert client.delete(f"/dicomweb/studies/{study}").status_code == 204
    assert everything_under(conn, keys.study_prefix(study)) == []
    for model in (Study, Series, Instance, Version, Location, DiagnosisEvent):
        assert count(conn, model, study_uid=study) == 0
    assert client.delete(f"/dicomweb/studies/{study}").status_code == 404
    assert client.get(f"/dicomweb/studies/{study}").status_code == 404
    audits = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("action") == "delete"]  # type: ignore[attr-defined]
    assert [(a["series"], a["instance"]) for a in audits] == [
        (a1.SeriesInstanceUID, a1.SOPInstanceUID), (b1.SeriesInstanceUID, None), (None, None)
    ]  # fmt: skip
    assert all(a["who"] and a["role"] == "admin" for a in audits)


def test_only_an_admin_may_delete(conn: Connections) -> None:
    ds = make_ct()
    [data] = stow(conn, [ds])
    radiologist = Connections(dataclasses.replace(conn.settings, default_role="radiologist"))
    try:
        response = full_client(radiologist).delete(f"/dicomweb/studies/{ds.StudyInstanceUID}")
        assert response.status_code == 403
        assert "admin" in response.get_json()["detail"] or "may not" in response.get_json()["detail"]
    finally:
        radiologist.close()
    assert conn.originals.get_bytes(keys.original(ref_of(ds))) == data


def test_a_store_fault_midway_leaves_no_row_without_object_and_the_next_delete_finishes(
    conn: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a1, _a2, _b1), _data = populated(conn)
    client = full_client(conn)
    study = a1.StudyInstanceUID
    with refusing(conn, "hot", "DeleteObject", monkeypatch):
        response = client.delete(f"/dicomweb/studies/{study}")
        assert response.status_code == 503 and response.headers["Retry-After"]
    assert count(conn, Instance, study_uid=study) == 0  # rows went first: none points at nothing
    left = everything_under(conn, keys.study_prefix(study))
    assert left and {tier for tier, _cls, _key in left} <= {"hot", "cold"}
    assert client.delete(f"/dicomweb/studies/{study}").status_code == 204
    assert everything_under(conn, keys.study_prefix(study)) == []
    assert client.delete(f"/dicomweb/studies/{study}").status_code == 404


def test_malformed_uids_are_refused(conn: Connections) -> None:
    response = full_client(conn).delete("/dicomweb/studies/1.2.03")
    assert response.status_code == 400
