"""The mover on both backends: copy, verify, record, then delete; faults at every step (the store refusing
the copy or the delete, the index refusing the write, the process killed between steps) leave a verified
copy the index points at, and the next run converges. Locks, throttles, dry runs, native classes, and
`gateway lifecycle plan|apply|run` against moto server."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from rq import Queue
from sqlalchemy import event

from gateway import tiers
from gateway.cli import main
from gateway.connections import Connections
from gateway.settings import Settings
from gateway.storage.local import LocalBucket
from gateway.storage.s3 import S3Bucket
from policies.lifecycle import LifecycleRules, MoverLimits, load_lifecycle, rules_path
from tests.factories import make_ct
from tests.tiers_support import (
    assert_never_lost,
    cli_env,
    later,
    locations,
    original,
    policies_with,
    refusing,
    sha,
    stored_class,
    stow,
    where,
    work_default,
)
from workers import lifecycle

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
def conn_any(any_storage_settings: Settings) -> Iterator[Connections]:
    connections = Connections(any_storage_settings)
    try:
        yield connections
    finally:
        connections.close()


def rules_for(conn: Connections, preset: str | None = None, **limits: float) -> LifecycleRules:
    rules = load_lifecycle(rules_path(POLICIES, preset=preset), conn.rules.versions)
    fast = MoverLimits(objects_per_second=1e6, bytes_per_second=1e12, **limits)  # type: ignore[arg-type]
    return dataclasses.replace(rules, mover=fast)


def study(conn: Connections, count: int = 2) -> list[tuple[object, bytes]]:
    first = make_ct()
    datasets = [first] + [make_ct(first.StudyInstanceUID, first.SeriesInstanceUID) for _ in range(count - 1)]
    return list(zip(datasets, stow(conn, datasets), strict=True))


def test_originals_move_cold_after_the_period_and_are_read_from_there(conn_any: Connections) -> None:
    conn = conn_any
    stored = study(conn)
    rules = rules_for(conn)
    assert lifecycle.run(conn, rules).counts == {}  # nothing is due today
    assert tiers.original_location(conn, [original(ds).ref for ds, _ in stored]) == "hot"
    report = lifecycle.run(conn, rules, now=later(100))
    assert report.counts == {"moved": 2}
    assert report.bytes == sum(len(data) for _ds, data in stored)
    for ds, data in stored:
        obj = original(ds)
        assert where(conn, obj.key) == {"cold": ("GLACIER_IR", "ok")}
        assert conn.originals.head(obj.key) is None
        assert stored_class(conn, obj.key, "cold") == "GLACIER_IR"
        row = locations(conn, obj.key)[0]
        assert (row.sha256, row.size, row.bucket) == (sha(data), len(data), conn.cold.name)
        assert tiers.originals(conn).get_bytes(obj.key) == data  # instant retrieval: served at once
        assert tiers.archived_originals(conn, [obj.ref]) == {}
    assert tiers.original_location(conn, [original(ds).ref for ds, _ in stored]) == "cold"
    again = lifecycle.run(conn, rules, now=later(200))
    assert again.counts == {}


def test_a_dry_run_lists_what_would_move_and_changes_nothing(conn_any: Connections) -> None:
    conn = conn_any
    stored = study(conn)
    report = lifecycle.run(conn, rules_for(conn), now=later(100), dry_run=True)
    assert report.counts == {"planned": 2}
    assert {o.key for o in report.outcomes} == {original(ds).key for ds, _ in stored}
    assert all(o.action == "move" and o.storage_class == "GLACIER_IR" for o in report.outcomes)
    assert locations(conn) == []
    for ds, data in stored:
        assert conn.originals.get_bytes(original(ds).key) == data


def test_a_refused_copy_moves_nothing_and_the_next_run_converges(
    conn_any: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    with refusing(conn, "cold", "CopyObject", monkeypatch):
        report = lifecycle.run(conn, rules_for(conn), now=later(100))
    assert report.counts == {"failed": 1}
    assert where(conn, obj.key) == {"originals": ("STANDARD", "ok")}
    assert_never_lost(conn, obj, data)
    assert lifecycle.run(conn, rules_for(conn), now=later(100)).counts == {"moved": 1}
    assert where(conn, obj.key) == {"cold": ("GLACIER_IR", "ok")}
    assert_never_lost(conn, obj, data)


def test_a_refused_delete_leaves_both_copies_and_the_next_run_finishes(
    conn_any: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    with refusing(conn, "originals", "DeleteObject", monkeypatch):
        report = lifecycle.run(conn, rules_for(conn), now=later(100))
        assert report.counts == {"failed": 1}
        assert where(conn, obj.key) == {"cold": ("GLACIER_IR", "ok"), "originals": ("STANDARD", "leaving")}
        assert conn.originals.get_bytes(obj.key) == data
        assert_never_lost(conn, obj, data)
        again = lifecycle.run(conn, rules_for(conn), now=later(100))  # still refused: kept, nothing lost
        assert again.finished_leaving == 0
    report = lifecycle.run(conn, rules_for(conn), now=later(100))
    assert report.finished_leaving == 1
    assert where(conn, obj.key) == {"cold": ("GLACIER_IR", "ok")}
    assert conn.originals.head(obj.key) is None
    assert_never_lost(conn, obj, data)


def test_an_index_fault_at_the_record_step_keeps_the_source_and_the_next_run_converges(
    conn_any: Connections,
) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)

    def refuse_cold_rows(_conn, _cursor, statement, parameters, _context, _many) -> None:  # type: ignore[no-untyped-def]
        if "locations" in statement and ("INSERT" in statement or "UPDATE" in statement):
            values = parameters.values() if isinstance(parameters, dict) else parameters
            if "cold" in [str(v) for v in values]:
                from sqlalchemy.exc import OperationalError

                raise OperationalError(statement, parameters, Exception("disk I/O error (test)"))

    event.listen(conn.engine, "before_cursor_execute", refuse_cold_rows)
    try:
        report = lifecycle.run(conn, rules_for(conn), now=later(100))
    finally:
        event.remove(conn.engine, "before_cursor_execute", refuse_cold_rows)
    assert report.counts == {"failed": 1}
    assert "index" in report.outcomes[0].reason
    assert where(conn, obj.key) == {"originals": ("STANDARD", "ok")}
    assert conn.originals.get_bytes(obj.key) == data
    assert stored_class(conn, obj.key, "cold") == "GLACIER_IR"  # an unrecorded copy; harmless
    assert_never_lost(conn, obj, data)
    assert lifecycle.run(conn, rules_for(conn), now=later(100)).counts == {"moved": 1}
    assert where(conn, obj.key) == {"cold": ("GLACIER_IR", "ok")}
    assert_never_lost(conn, obj, data)


STEPS = ["adopt", "copy", "verify", "record", "delete", "forget"]


@pytest.mark.parametrize("done", range(1, len(STEPS)))
def test_a_mover_killed_after_any_step_loses_nothing_and_the_next_run_converges(
    conn_any: Connections, done: int
) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    rules = rules_for(conn)
    when = later(100)
    run = lifecycle.steps(conn, rules, obj, when)
    assert [next(run) for _ in range(done)] == STEPS[:done]
    del run  # killed: no more steps, no clean-up of its own
    assert_never_lost(conn, obj, data)
    report = lifecycle.run(conn, rules, now=when)
    assert report.counts.get("failed", 0) == 0
    assert where(conn, obj.key) == {"cold": ("GLACIER_IR", "ok")}
    assert conn.originals.head(obj.key) is None
    assert_never_lost(conn, obj, data)


def test_a_corrupt_copy_is_not_recorded_and_the_source_stays(
    conn_any: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    real = tiers.checksum

    def flipped(conn_: Connections, key: str, tier: str, storage_class: str) -> tuple[int, str | None]:
        size, digest = real(conn_, key, tier, storage_class)
        return (size, "0" * 64) if tier == "cold" else (size, digest)

    monkeypatch.setattr(tiers, "checksum", flipped)  # what a store that garbled the copy would report
    report = lifecycle.run(conn, rules_for(conn), now=later(100))
    assert report.counts == {"failed": 1} and "sha256" in report.outcomes[0].reason
    assert where(conn, obj.key) == {"originals": ("STANDARD", "ok")}
    assert stored_class(conn, obj.key, "cold") is None  # the bad copy was removed again
    monkeypatch.undo()
    assert_never_lost(conn, obj, data)


def test_a_locked_object_is_skipped_until_the_lease_ends(conn_any: Connections) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    other = conn.redis.lock(tiers.object_lock_key(obj.key), timeout=1)
    assert other.acquire(blocking=False)
    report = lifecycle.run(conn, rules_for(conn), now=later(100))
    assert report.counts == {"skipped": 1}
    assert report.outcomes[0].reason == "another mover holds its lock"
    assert conn.originals.get_bytes(obj.key) == data
    time.sleep(1.2)  # the other holder crashed: its lease runs out
    assert lifecycle.run(conn, rules_for(conn), now=later(100)).counts == {"moved": 1}


def test_runs_are_capped_and_paced_and_resume_where_they_stopped(conn_any: Connections) -> None:
    conn = conn_any
    stored = study(conn, 3)
    capped = rules_for(conn, max_objects_per_run=2)
    assert lifecycle.run(conn, capped, now=later(100)).counts == {"moved": 2}
    assert lifecycle.run(conn, capped, now=later(100)).counts == {"moved": 1}
    for ds, data in stored:
        assert_never_lost(conn, original(ds), data)
    more = study(conn, 3)
    size = len(more[0][1])
    by_bytes = rules_for(conn, max_bytes_per_run=size + 1)
    assert lifecycle.run(conn, by_bytes, now=later(100)).counts == {"moved": 2}
    slow = dataclasses.replace(
        rules_for(conn), mover=MoverLimits(objects_per_second=4, bytes_per_second=1e12)
    )
    assert lifecycle.run(conn, slow, now=later(100)).counts == {"moved": 1}
    fresh = study(conn, 3)
    started = time.monotonic()
    assert lifecycle.run(conn, slow, now=later(100)).counts == {"moved": 3}
    assert time.monotonic() - started >= 0.5  # 3 objects at 4 per second: two waits of 0.25 s
    for ds, data in fresh:
        assert_never_lost(conn, original(ds), data)


def test_the_mirror_preset_copies_at_once_and_later_only_deletes_the_hot_copy(conn_any: Connections) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    rules = rules_for(conn, "mirror")
    report = lifecycle.run(conn, rules)
    assert report.counts == {"copied": 1}  # versions are not made in this test (no worker ran)
    assert where(conn, obj.key) == {"cold": ("GLACIER", "ok"), "originals": ("STANDARD", "ok")}
    assert tiers.originals(conn).get_bytes(obj.key) == data  # the hot copy is read first
    later_report = lifecycle.run(conn, rules, now=later(100))
    assert later_report.counts == {"moved": 1}
    assert later_report.outcomes[0].steps == ["verify", "record", "delete", "forget"]  # no second copy
    assert where(conn, obj.key) == {"cold": ("GLACIER", "ok")}
    with pytest.raises(tiers.OriginalArchived) as archived:
        tiers.originals(conn).get_bytes(obj.key)
    assert archived.value.restore_started and archived.value.storage_class == "GLACIER"


def test_storage_classes_changed_by_s3_itself_are_reconciled(make_settings) -> None:  # type: ignore[no-untyped-def]
    conn = Connections(make_settings(storage="s3"))
    try:
        [(ds, data)] = study(conn, 1)
        obj = original(ds)
        bucket = conn.originals
        assert isinstance(bucket, S3Bucket)
        # what an S3 lifecycle transition does: same key, other class
        bucket.client.copy_object(
            Bucket=bucket.name, Key=obj.key, CopySource={"Bucket": bucket.name, "Key": obj.key},
            StorageClass="STANDARD_IA", MetadataDirective="COPY",
        )  # fmt: skip
        text = "moves: []\ntransitions:\n  - id: t\n    bucket: originals\n    transitions:\n"
        text += "      - {days: 30, storage_class: STANDARD_IA}\n"
        path = conn.settings.data_dir / "lc.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        rules = load_lifecycle(path, conn.rules.versions)
        assert lifecycle.reconcile_classes(conn, rules, force=True) == 1
        assert where(conn, obj.key) == {"originals": ("STANDARD_IA", "ok")}
        assert tiers.originals(conn).get_bytes(obj.key) == data
        assert lifecycle.reconcile_classes(conn, rules, force=True) == 0
    finally:
        conn.close()


# --- the command line -------------------------------------------------------------------------------------


def test_plan_prints_and_apply_puts_what_s3_reads_back(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(storage="s3")
    runner = CliRunner()
    for preset in (None, "archive-originals"):
        args = ["--preset", preset] if preset else []
        planned = runner.invoke(main, ["lifecycle", "plan", *args], env=cli_env(settings))
        assert planned.exit_code == 0, planned.output
        plan = json.loads(planned.output)
        assert set(plan) == {settings.originals_bucket, settings.hot_bucket, settings.cold_bucket}
        applied = runner.invoke(main, ["lifecycle", "apply", *args], env=cli_env(settings))
        assert applied.exit_code == 0, applied.output
        conn = Connections(settings)
        try:
            bucket = conn.cold
            assert isinstance(bucket, S3Bucket)
            for name, config in plan.items():
                got = bucket.client.get_bucket_lifecycle_configuration(Bucket=name)
                assert got["Rules"] == config["Rules"], name
        finally:
            conn.close()
    refused = runner.invoke(main, ["lifecycle", "plan", "--preset", "lukewarm"], env=cli_env(settings))
    assert refused.exit_code != 0 and "no lifecycle preset 'lukewarm'" in refused.output


def test_lifecycle_run_on_the_command_line_with_a_dry_run(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings()
    conn = Connections(settings)
    try:
        [(ds, data)] = study(conn, 1)
        rules = conn.settings.data_dir / "now.yaml"
        rules.write_text("moves:\n  - id: now\n    objects: [original]\n    storage_class: STANDARD_IA\n"
                         "    after: {ingest_days: 0}\n")  # fmt: skip
        runner = CliRunner()
        dry = runner.invoke(
            main, ["lifecycle", "run", "--dry-run", "--rules", str(rules)], env=cli_env(settings)
        )
        assert dry.exit_code == 0, dry.output
        assert "would move" in dry.output and original(ds).key in dry.output
        assert conn.originals.get_bytes(original(ds).key) == data
        done = runner.invoke(main, ["lifecycle", "run", "--rules", str(rules)], env=cli_env(settings))
        assert done.exit_code == 0, done.output
        assert "moved 1" in done.output
        assert where(conn, original(ds).key) == {"cold": ("STANDARD_IA", "ok")}
    finally:
        conn.close()


def test_a_killed_move_converges_on_either_index(any_index_settings: Settings) -> None:
    conn = Connections(any_index_settings)
    try:
        stored = study(conn, 2)
        rules = rules_for(conn)
        when = later(100)
        first = original(stored[0][0])
        run = lifecycle.steps(conn, rules, first, when)
        assert [next(run) for _ in range(4)] == STEPS[:4]  # killed after the record: source marked leaving
        del run
        assert where(conn, first.key) == {"cold": ("GLACIER_IR", "ok"), "originals": ("STANDARD", "leaving")}
        report = lifecycle.run(conn, rules, now=when)
        assert report.finished_leaving == 1 and report.counts == {"moved": 1}
        for ds, data in stored:
            assert where(conn, original(ds).key) == {"cold": ("GLACIER_IR", "ok")}
            assert_never_lost(conn, original(ds), data)
    finally:
        conn.close()


def test_the_periodic_job_runs_the_mover_once_per_period(make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = "moves:\n  - id: now\n    objects: [original]\n    storage_class: GLACIER_IR\n"
    text += "    after: {ingest_days: 0}\n"
    conn = Connections(make_settings(policies_dir=policies_with(tmp_path, text)))
    try:
        [(ds, data)] = study(conn, 1)
        stop = lifecycle.start_background(conn, every_minutes=0.005)  # 0.3 s
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                job.startswith("lifecycle") for job in Queue("default", connection=conn.redis).job_ids
            ):
                time.sleep(0.05)
        finally:
            stop.set()
        queued = Queue("default", connection=conn.redis).job_ids
        assert [job for job in queued if job.startswith("lifecycle")] == ["lifecycle-run"]
        assert not tiers.enqueue_lifecycle_run(conn.redis)  # queued already: not twice
        work_default(conn)
        assert where(conn, original(ds).key) == {"cold": ("GLACIER_IR", "ok")}
        assert json.loads(conn.redis.get(lifecycle.LAST_RUN))["counts"] == {"moved": 1}
        assert tiers.enqueue_lifecycle_run(conn.redis)  # done: the next period queues again
    finally:
        conn.close()


def test_a_cold_copy_gone_bad_is_never_trusted_and_is_made_again(conn_any: Connections) -> None:
    conn = conn_any
    [(ds, data)] = study(conn, 1)
    obj = original(ds)
    rules = rules_for(conn, "mirror")
    assert lifecycle.run(conn, rules).counts == {"copied": 1}
    garbled = bytearray(data)
    garbled[-1] ^= 0xFF  # one flipped bit in the archive copy
    bucket = tiers.store(conn, "cold", "GLACIER")
    if isinstance(bucket, S3Bucket):  # written as S3 would keep it: with the checksum of what it holds
        scratch = obj.key + ".scratch"
        bucket.client.put_object(Bucket=bucket.name, Key=scratch, Body=bytes(garbled))
        bucket.client.copy_object(
            Bucket=bucket.name, Key=obj.key, CopySource={"Bucket": bucket.name, "Key": scratch},
            StorageClass="GLACIER", ChecksumAlgorithm="SHA256",
        )  # fmt: skip
        bucket.client.delete_object(Bucket=bucket.name, Key=scratch)
    else:
        assert isinstance(bucket, LocalBucket)
        (bucket.root / obj.key).write_bytes(bytes(garbled))
    report = lifecycle.run(conn, rules, now=later(100))  # the move would only delete the hot copy...
    assert report.counts == {"failed": 1} and "sha256" in report.outcomes[0].reason
    assert where(conn, obj.key) == {"cold": ("GLACIER", "corrupt"), "originals": ("STANDARD", "ok")}
    assert conn.originals.get_bytes(obj.key) == data  # ...but the cold copy did not check out: kept
    assert_never_lost(conn, obj, data)
    again = lifecycle.run(conn, rules, now=later(100))
    assert again.counts == {"moved": 1} and "copy" in again.outcomes[0].steps
    assert where(conn, obj.key) == {"cold": ("GLACIER", "ok")}
    size, digest = tiers.checksum(conn, obj.key, "cold", "GLACIER")
    assert (size, digest) == (len(data), sha(data))
