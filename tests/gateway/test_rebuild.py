"""`gateway index rebuild`: real files stored through STOW and derived by a real worker, some moved
cold, the diagnosis status set; the index is snapshotted, wiped, rebuilt from the buckets alone, and
must come back the same. Also: status from the stored objects when study.json is gone, an archived
original indexed from its version, and `gateway fsck` finding and repairing what a crash leaves."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from gateway import diagnosis, keys, tiers
from gateway.cli import main
from gateway.connections import Connections
from gateway.fsck import check
from gateway.index.models import DiagnosisEvent, Instance, Series, Study, Version
from gateway.index.rebuild import rebuild, wipe_index
from policies.status import DiagnosisStatus
from tests.factories import make_ct
from tests.tiers_support import cli_env, derive_all, later, locations, original, policies_with, stow, where
from workers import lifecycle

FILES = [
    "ct_series_dcmqi/ct_01.dcm",
    "ct_series_dcmqi/ct_02.dcm",
    "ct_series_dcmqi/ct_03.dcm",
    "seg_liver_on_ct_series.dcm",
    "ct1_nema_uncompressed.dcm",
    "sr_tid1500_highdicom.dcm",
    "dx_small_monochrome1.dcm",
]


@pytest.fixture
def conn(any_storage_settings) -> Iterator[Connections]:  # type: ignore[no-untyped-def]
    connections = Connections(any_storage_settings)
    try:
        yield connections
    finally:
        connections.close()


def _row(obj: Any, skip: set[str]) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__mapper__.column_attrs if c.key not in skip}


def snapshot(conn: Connections) -> dict[str, Any]:
    """Everything the index holds that the buckets must give back (timestamps of rows excepted)."""
    with conn.sessions() as session:
        studies = {s.study_uid: _row(s, {"created_at", "updated_at"}) for s in session.scalars(select(Study))}
        series = {s.series_uid: _row(s, {"created_at"}) for s in session.scalars(select(Series))}
        instances = {}
        for row in session.scalars(select(Instance)):
            values = _row(row, {"created_at", "metadata_gz"})
            values["metadata"] = json.loads(gzip.decompress(row.metadata_gz))
            instances[row.sop_uid] = values
        versions = {}
        for row in session.scalars(select(Version)):
            values = _row(row, {"updated_at", "attempts"})
            for name in ("ratio", "psnr"):
                values[name] = round(values[name], 1) if values[name] is not None else None
            if values["state"] != "ready":
                values["reason"] = (values["reason"] or "")[:40]
            versions[(row.sop_uid, row.version_id)] = values
        history = sorted(
            (e.study_uid, tiers.aware(e.at), e.who, e.from_status, e.to_status, e.source, e.sop_uid)
            for e in session.scalars(select(DiagnosisEvent))
        )
    copies = {}
    for study_uid in studies:
        for instance in tiers.study_storage(conn, study_uid)["instances"]:
            for obj in instance["objects"]:
                copies[(instance["sop_uid"], obj["object"])] = sorted(
                    (c["tier"], c["storage_class"], c["size"], c["sha256"])
                    for c in obj["copies"]
                    if c["state"] == "ok"
                )
    return {"studies": studies, "series": series, "instances": instances, "versions": versions,
            "history": history, "copies": copies}  # fmt: skip


def store_real(conn: Connections, shared_data: Path) -> dict[str, pydicom.Dataset]:
    headers = {name: pydicom.dcmread(shared_data / name, stop_before_pixels=True) for name in FILES}
    # The CT images first, the rest a second later: a study row keeps the study attributes of its first
    # instance, and the buckets tell the order to the second.
    stow(conn, [(shared_data / name).read_bytes() for name in FILES[:3]])
    time.sleep(1.1)
    stow(conn, [(shared_data / name).read_bytes() for name in FILES[3:]])
    derive_all(conn)
    for name in ("seg_liver_on_ct_series.dcm", "sr_tid1500_highdicom.dcm"):  # what ingest's hook does
        ds = headers[name]
        diagnosis.on_instance_stored(conn, ds.StudyInstanceUID, ds.SOPClassUID, ds, who="stored object")
    dx = headers["dx_small_monochrome1.dcm"]
    diagnosis.set_status(conn, dx.StudyInstanceUID, DiagnosisStatus.READ, "dr-who", "radiologist")
    return headers


def test_a_wiped_index_is_rebuilt_the_same_from_the_buckets(conn: Connections, shared_data: Path) -> None:
    headers = store_real(conn, shared_data)
    moved = lifecycle.run(conn, now=later(100))  # originals to GLACIER_IR (served at once)
    assert moved.counts == {"moved": len(FILES)}
    before = snapshot(conn)
    assert before["studies"][headers["seg_liver_on_ct_series.dcm"].StudyInstanceUID]["diagnosis_status"] == 4
    assert before["studies"][headers["dx_small_monochrome1.dcm"].StudyInstanceUID]["diagnosis_status"] == 2
    assert sum(v["state"] == "ready" for v in before["versions"].values()) >= 5
    wipe_index(conn)
    assert snapshot(conn)["instances"] == {}
    report = rebuild(conn)
    assert report.problems == [] and report.partial == []
    assert report.instances == len(FILES)
    after = snapshot(conn)
    for part in ("studies", "series", "instances", "versions", "history", "copies"):
        assert after[part] == before[part], part
    assert rebuild(conn).instances == 0  # a second run adds nothing
    ct = headers["ct1_nema_uncompressed.dcm"]
    key = original(ct).key
    assert tiers.originals(conn).get_bytes(key) == (shared_data / "ct1_nema_uncompressed.dcm").read_bytes()


def test_status_comes_back_from_the_stored_objects_without_study_json(
    conn: Connections, shared_data: Path
) -> None:
    headers = store_real(conn, shared_data)
    sr = headers["sr_tid1500_highdicom.dcm"]
    conn.originals.delete(keys.study_record(sr.StudyInstanceUID))
    wipe_index(conn)
    report = rebuild(conn)
    assert report.studies_from_objects == 1 and report.studies_from_record == 2
    with conn.sessions() as session:
        assert session.get(Study, sr.StudyInstanceUID).diagnosis_status == DiagnosisStatus.ANNOTATED
        events = session.scalars(
            select(DiagnosisEvent).where(DiagnosisEvent.study_uid == sr.StudyInstanceUID)
        ).all()
    assert [(e.who, e.to_status) for e in events] == [("index rebuild", 4)]
    assert conn.originals.head(keys.study_record(sr.StudyInstanceUID)) is not None  # written again


def test_an_archived_original_is_indexed_from_its_lossless_version_and_a_restore_starts(
    make_settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(policies_dir=policies_with(tmp_path, preset="archive-originals"))
    conn = Connections(settings)
    try:
        ds = make_ct(rows=128, columns=128)
        [data] = stow(conn, [ds])
        derive_all(conn)
        assert lifecycle.run(conn, now=later(100)).counts == {"moved": 2}  # original and lossless
        assert where(conn, original(ds).key) == {"cold": ("GLACIER", "ok")}
        wipe_index(conn)
        report = rebuild(conn)
        assert report.partial == [original(ds).key]
        with conn.sessions() as session:
            row = session.get(Instance, ds.SOPInstanceUID)
            assert (row.size, row.sha256, row.transfer_syntax_uid) == (
                len(data),
                tiers_sha(data),
                "1.2.840.10008.1.2.1",
            )
            assert row.rows == 128 and row.pixel_layout is None
            assert session.get(Version, (ds.SOPInstanceUID, "lossless")).state == "ready"
        status = tiers.restore_status(conn, original(ds).key, "cold", "GLACIER")
        assert status.state in ("ongoing", "ready")
        time.sleep(1.1)  # the restore is ready (1 s on this local backend): a rebuild completes the row
        assert rebuild(conn).instances == 0
        with conn.sessions() as session:
            row = session.get(Instance, ds.SOPInstanceUID)
            assert row.pixel_layout is not None and json.loads(row.pixel_layout)["frames"]
    finally:
        conn.close()


def tiers_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_fsck_finds_and_repairs_what_crashes_and_losses_leave(conn: Connections) -> None:
    first, second, third = make_ct(), make_ct(), make_ct()
    data = stow(conn, [first, second, third])
    assert check(conn).findings == []
    # a mover killed after its copy: an unrecorded cold copy
    run = lifecycle.steps(conn, tiers_rules(conn), original(first), later(100))
    assert [next(run) for _ in range(2)] == ["adopt", "copy"]
    del run
    # an original that vanished behind the index's back, another object the index never heard of
    conn.originals.delete(original(second).key)
    orphan = make_ct()
    from tests.factories import to_bytes

    orphan_bytes = to_bytes(orphan)
    conn.originals.put_bytes(original(orphan).key, orphan_bytes, {"transfer-syntax": "1.2.840.10008.1.2.1"})
    report = check(conn)
    kinds = sorted((f.kind, f.key) for f in report.findings)
    assert ("unrecorded-copy", original(first).key) in kinds
    assert ("missing-object", original(second).key) in kinds and ("lost", original(second).key) in kinds
    assert ("orphan-object", original(orphan).key) in kinds
    assert locations(conn, original(first).key)[0].tier == "originals"  # read-only: nothing changed
    env = cli_env(conn.settings)
    cli = CliRunner().invoke(main, ["fsck"], env=env)
    assert cli.exit_code == 1 and "orphan-object" in cli.output
    repaired = check(conn, repair=True)
    assert [f for f in repaired.unrepaired if f.kind != "lost" and f.key != original(second).key] == []
    assert where(conn, original(first).key) == {"cold": ("GLACIER_IR", "ok"), "originals": ("STANDARD", "ok")}
    with conn.sessions() as session:
        assert session.get(Instance, orphan.SOPInstanceUID) is not None
    assert tiers.originals(conn).get_bytes(original(orphan).key) == orphan_bytes
    assert tiers.originals(conn).get_bytes(original(third).key) == data[2]
    again = check(conn)
    # the one loss no repair can undo
    assert {(f.kind, f.key) for f in again.findings} == {
        ("missing-object", original(second).key), ("lost", original(second).key)
    }  # fmt: skip
    rebuilt = CliRunner().invoke(main, ["index", "rebuild"], env=env)
    assert rebuilt.exit_code == 0 and "instances indexed: 0" in rebuilt.output


def tiers_rules(conn: Connections):  # type: ignore[no-untyped-def]
    return tiers.lifecycle_rules(conn)
