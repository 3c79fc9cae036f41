"""gateway.tiers: keys parsed back, reads that skip a vanished copy, the rows ingest and derive would
write, and the local backend's honest restore: not readable before it is ready, gone after it expires."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys, tiers
from gateway.connections import Connections
from gateway.errors import ObjectNotFound
from gateway.index.db import session_scope
from gateway.tiers import ObjectKey
from gateway.uids import InstanceRef
from policies.lifecycle import RestoreSettings
from tests.factories import make_ct
from tests.tiers_support import later, original, stow, where
from workers import lifecycle

uids = st.lists(st.integers(1, 10**12), min_size=2, max_size=6).map(lambda parts: ".".join(map(str, parts)))


@given(
    study=uids,
    series=uids,
    sop=uids,
    version=st.one_of(st.none(), st.sampled_from(["lossless", "q50", "q_25"])),
)
def test_every_object_key_parses_back(study: str, series: str, sop: str, version: str | None) -> None:
    ref = InstanceRef(study, series, sop)
    key = keys.original(ref) if version is None else keys.version(ref, version)
    assert tiers.parse_key(key) == ObjectKey(ref, version)
    assert tiers.parse_key(key).key == key  # type: ignore[union-attr]
    for other in (
        keys.thumbnail(ref),
        keys.reduced(ref, "lossless", 64, 64),
        keys.study_record(study),
        keys.series_metadata(study, series),
        key + ".tmp",
        "studies/01.2/series/1/instances/1.dcm",
    ):
        assert tiers.parse_key(other) is None, other  # fmt: skip


def test_a_read_skips_a_copy_that_vanished_and_falls_back_home(conn: Connections) -> None:
    ds = make_ct()
    [data] = stow(conn, [ds])
    obj = original(ds)
    with session_scope(conn.sessions) as session:  # what ingest records once the lead wires it
        tiers.record_stored_original(session, obj.ref, conn.originals.name, len(data), "0" * 64)
        tiers.record_copy(session, obj, "cold", conn.cold.name, "STANDARD_IA", len(data), "0" * 64)
    assert where(conn, obj.key) == {"cold": ("STANDARD_IA", "ok"), "originals": ("STANDARD", "ok")}
    conn.originals.delete(obj.key)  # the preferred (home) copy is gone, the cold one is not there either
    with pytest.raises(ObjectNotFound):
        tiers.originals(conn).get_bytes(obj.key)
    tiers.store(conn, "cold", "STANDARD_IA").put_bytes(obj.key, data)
    assert tiers.originals(conn).get_bytes(obj.key) == data
    assert tiers.originals(conn).get_range(obj.key, 128, 4) == b"DICM"


def test_a_local_restore_is_ready_only_after_its_delay_and_expires(conn: Connections) -> None:
    ds = make_ct()
    [data] = stow(conn, [ds])
    obj = original(ds)
    tiers.copy_object(conn, obj.key, ("originals", "STANDARD"), ("cold", "DEEP_ARCHIVE"), "original")
    assert (conn.settings.data_dir / "buckets" / "cold" / ".class" / "DEEP_ARCHIVE" / obj.key).is_file()
    assert tiers.restore_status(conn, obj.key, "cold", "DEEP_ARCHIVE").state == "none"
    settings = RestoreSettings(days=1, local_delay_seconds={"DEEP_ARCHIVE": 0.5})
    assert tiers.request_restore(conn, obj.key, "cold", "DEEP_ARCHIVE", settings).state == "ongoing"
    assert tiers.request_restore(conn, obj.key, "cold", "DEEP_ARCHIVE", settings).state == "ongoing"  # once
    time.sleep(0.6)
    status = tiers.restore_status(conn, obj.key, "cold", "DEEP_ARCHIVE")
    assert status.state == "ready" and status.expires_at is not None
    assert status.expires_at - tiers.now() > timedelta(hours=23)
    marker = conn.settings.data_dir / "buckets" / "cold" / ".restore" / "DEEP_ARCHIVE" / (obj.key + ".json")
    raw = json.loads(marker.read_text())
    raw["expires_at"] = tiers.now().isoformat()
    marker.write_text(json.dumps(raw))
    assert tiers.restore_status(conn, obj.key, "cold", "DEEP_ARCHIVE").state == "none"  # expired
    assert not marker.exists()
    size, digest = tiers.checksum(conn, obj.key, "cold", "DEEP_ARCHIVE")  # checked without a restore
    assert size == len(data) and digest is not None


def test_the_move_keeps_the_ingest_time_on_the_copy(any_storage_settings) -> None:  # type: ignore[no-untyped-def]
    conn = Connections(any_storage_settings)
    try:
        ds = make_ct()
        stow(conn, [ds])
        lifecycle.run(conn, now=later(100))
        from gateway.index.models import Instance

        with conn.sessions() as session:
            created = tiers.aware(session.get(Instance, ds.SOPInstanceUID).created_at)
        assert tiers.ingested_at(conn, original(ds).key, "cold", "GLACIER_IR") == created
    finally:
        conn.close()
