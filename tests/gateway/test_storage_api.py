"""GET /api/studies/{study}/storage and the prefetch endpoints, over HTTP on the real app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.connections import Connections
from tests.factories import make_ct
from tests.tiers_support import full_client, later, original, sha, stow
from workers import lifecycle


@pytest.fixture
def conn(any_storage_settings) -> Iterator[Connections]:  # type: ignore[no-untyped-def]
    connections = Connections(any_storage_settings)
    try:
        yield connections
    finally:
        connections.close()


def test_storage_lists_every_copy_of_every_object(conn: Connections) -> None:
    first = make_ct()
    second = make_ct(first.StudyInstanceUID, first.SeriesInstanceUID)
    data = stow(conn, [first, second])
    client = full_client(conn)
    url = f"/api/studies/{first.StudyInstanceUID}/storage"
    before = client.get(url)
    assert before.status_code == 200
    body = before.get_json()
    assert body["bytes"] == {"originals": {"STANDARD": sum(len(d) for d in data)}}
    entry = next(i for i in body["instances"] if i["sop_uid"] == first.SOPInstanceUID)
    [obj] = entry["objects"]  # no versions derived in this test
    assert obj["object"] == "original" and obj["state"] == "hot"
    [copy] = obj["copies"]
    assert copy == {
        "tier": "originals", "bucket": conn.originals.name, "key": original(first).key,
        "storage_class": "STANDARD", "size": len(data[0]), "sha256": sha(data[0]),
        "since": copy["since"], "state": "ok", "recorded": False,
    }  # fmt: skip
    lifecycle.run(conn, now=later(100))
    after = client.get(url).get_json()
    assert after["bytes"] == {"cold": {"GLACIER_IR": sum(len(d) for d in data)}}
    entry = next(i for i in after["instances"] if i["sop_uid"] == first.SOPInstanceUID)
    [copy] = entry["objects"][0]["copies"]
    assert (copy["tier"], copy["bucket"], copy["storage_class"], copy["sha256"], copy["size"]) == (
        "cold", conn.cold.name, "GLACIER_IR", sha(data[0]), len(data[0])
    )  # fmt: skip
    assert copy["since"] and copy["verified_at"] and copy["restore"] is None
    assert entry["objects"][0]["state"] == "cold"


def test_storage_of_unknown_or_malformed_studies(conn: Connections) -> None:
    client = full_client(conn)
    missing = client.get("/api/studies/1.2.3.4/storage")
    assert missing.status_code == 404 and missing.mimetype == "application/problem+json"
    bad = client.get("/api/studies/1.02.3/storage")
    assert bad.status_code == 400 and "1.02.3" in bad.get_json()["detail"]
    assert client.get("/api/studies/1.2.3.4/prefetch").status_code == 404
    assert client.post("/api/studies/1.2.3.4/prefetch").status_code == 404


def test_prefetch_checks_its_parameter_and_role(make_settings) -> None:  # type: ignore[no-untyped-def]
    for role, expected in (("uploader", 403), ("referring", 200)):
        conn = Connections(make_settings(DEFAULT_ROLE=role))
        try:
            ds = make_ct()
            _stow_as_admin(conn, ds)
            client = full_client(conn)
            response = client.post(f"/api/studies/{ds.StudyInstanceUID}/prefetch")
            assert response.status_code == expected, response.get_data(as_text=True)
            if expected == 200:
                wrong = client.post(f"/api/studies/{ds.StudyInstanceUID}/prefetch?priors=lots")
                assert wrong.status_code == 400 and wrong.get_json()["parameter"] == "priors"
                assert (
                    client.post(
                        f"/api/studies/{ds.StudyInstanceUID}/prefetch", json={"priors": 99}
                    ).status_code
                    == 400
                )
        finally:
            conn.close()


def _stow_as_admin(conn: Connections, ds) -> None:  # type: ignore[no-untyped-def]
    """Referring physicians may not store: index the study through an admin's connections."""
    import dataclasses

    admin = Connections(dataclasses.replace(conn.settings, default_role="admin"))
    try:
        stow(admin, [ds])
    finally:
        admin.close()


def test_prefetch_progress_of_a_study_never_prefetched(conn: Connections, tmp_path: Path) -> None:
    ds = make_ct()
    stow(conn, [ds])
    body = full_client(conn).get(f"/api/studies/{ds.StudyInstanceUID}/prefetch").get_json()
    assert (body["requested"], body["state"], body["objects"], body["hot"]) == (False, "done", 1, 1)
