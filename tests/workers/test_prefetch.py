"""Prefetch on both backends: a study and the patient's priors come back from the archive (restores
started, honoured after their delay on the local backend), progress is reported, the copies brought
home are pinned hot against the mover, and other patients' studies stay where they are."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from gateway import tiers
from gateway.connections import Connections
from gateway.index.db import session_scope
from tests.factories import make_ct
from tests.tiers_support import (
    ARCHIVE_AT_ONCE,
    connections_with,
    full_client,
    later,
    original,
    stow,
    where,
    work_default,
)
from workers import lifecycle

PREFETCH_RULES = ARCHIVE_AT_ONCE + "prefetch: {priors: 3, keep_hot_days: 7}\n"


@pytest.fixture
def conn(make_settings, storage_kind: str, tmp_path: Path) -> Iterator[Connections]:  # type: ignore[no-untyped-def]
    with connections_with(make_settings, storage_kind, tmp_path, PREFETCH_RULES) as connections:
        yield connections


def patient_study(patient: str, date: str | None) -> Dataset:
    return make_ct(PatientID=patient, StudyDate=date)


def test_prior_studies_are_the_patients_earlier_ones_newest_first(conn: Connections) -> None:
    studies = {
        name: patient_study(patient, date)
        for name, patient, date in [
            ("current", "P1", "20220301"), ("prior1", "P1", "20210301"), ("prior2", "P1", "20200301"),
            ("undated", "P1", None), ("later", "P1", "20230301"), ("other", "P2", "20210301"),
        ]
    }  # fmt: skip
    stow(conn, studies.values())
    with session_scope(conn.sessions) as session:
        found = tiers.prior_studies(session, studies["current"].StudyInstanceUID, 10)
        two = tiers.prior_studies(session, studies["current"].StudyInstanceUID, 2)
    names = {ds.StudyInstanceUID: name for name, ds in studies.items()}
    assert [names[uid] for uid in found] == ["prior1", "prior2", "undated"]
    assert [names[uid] for uid in two] == ["prior1", "prior2"]


def test_prefetch_brings_a_study_and_its_priors_home_and_pins_them(conn: Connections) -> None:
    current, prior = patient_study("P1", "20220301"), patient_study("P1", "20210301")
    old, other = patient_study("P1", "20190301"), patient_study("P2", "20210301")
    data = dict(
        zip(("current", "prior", "old", "other"), stow(conn, [current, prior, old, other]), strict=True)
    )
    assert lifecycle.run(conn).counts == {"moved": 4}
    for ds in (current, prior, old, other):
        assert where(conn, original(ds).key) == {"cold": ("GLACIER", "ok")}
    client = full_client(conn)
    url = f"/api/studies/{current.StudyInstanceUID}/prefetch"
    response = client.post(url, json={"priors": 1})
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.headers["Location"] == url
    body = response.get_json()
    assert [s["study_uid"] for s in body["studies"]] == [current.StudyInstanceUID, prior.StudyInstanceUID]
    assert (body["objects"], body["hot"], body["archived"], body["state"]) == (2, 0, 2, "copying")
    work_default(conn)  # the prefetch job: restores started (S3 here restores at once)
    progress = client.get(url).get_json()
    if conn.settings.storage == "local":
        assert (progress["state"], progress["restoring"], progress["hot"]) == ("restoring", 2, 0)
        assert conn.originals.head(original(current).key) is None  # not before the restore is ready
        time.sleep(1.1)
        lifecycle.run(conn)  # each mover run also advances the prefetches waiting for restores
        progress = client.get(url).get_json()
    assert (progress["state"], progress["hot"], progress["progress"]) == ("done", 2, 1.0)
    for name, ds in (("current", current), ("prior", prior)):
        key = original(ds).key
        assert conn.originals.get_bytes(key) == data[name]
        assert where(conn, key) == {"cold": ("GLACIER", "ok"), "originals": ("STANDARD", "ok")}
        assert tiers.originals(conn).get_bytes(key) == data[name]
    for ds in (old, other):  # beyond the priors asked for, another patient: untouched
        assert where(conn, original(ds).key) == {"cold": ("GLACIER", "ok")}
    assert lifecycle.run(conn).counts == {}  # pinned hot: the mover leaves them
    report = lifecycle.run(conn, now=later(8))  # the pin is over: only the hot copy goes, no new copy
    assert report.counts == {"moved": 2}
    assert all(o.steps == ["verify", "record", "delete", "forget"] for o in report.outcomes)


def test_an_archived_original_raises_until_its_restore_is_ready(conn: Connections) -> None:
    ds = patient_study("P1", "20220301")
    [data] = stow(conn, [ds])
    lifecycle.run(conn)
    key = original(ds).key
    assert tiers.original_location(conn, [original(ds).ref], start_restore=False) == "archive"
    with pytest.raises(tiers.OriginalArchived) as archived:
        tiers.originals(conn).get_range(key, 0, 132)
    assert archived.value.restore_started and archived.value.status == 503
    assert archived.value.extra == {"storage_class": "GLACIER", "restore": "started"}
    row = next(r for r in tiers_rows(conn, key))
    assert row.restore_state in ("requested", "ready")
    if conn.settings.storage == "local":
        assert set(tiers.archived_originals(conn, [original(ds).ref])) == {ds.SOPInstanceUID}
        time.sleep(1.1)
    assert tiers.archived_originals(conn, [original(ds).ref]) == {}
    assert tiers.original_location(conn, [original(ds).ref]) == "cold"  # restored: readable, not home
    assert tiers.originals(conn).get_bytes(key) == data  # a later retrieve gets the original
    assert tiers_rows(conn, key)[0].restore_state == "ready"


def test_prefetch_of_a_study_already_hot_is_done_at_once(conn: Connections) -> None:
    ds = patient_study("P9", "20220301")
    stow(conn, [ds])
    response = full_client(conn).post(f"/api/studies/{ds.StudyInstanceUID}/prefetch?priors=0")
    assert response.status_code == 200
    assert response.get_json()["state"] == "done"


def tiers_rows(conn: Connections, key: str) -> list:  # type: ignore[type-arg]
    from tests.tiers_support import locations

    return locations(conn, key)
