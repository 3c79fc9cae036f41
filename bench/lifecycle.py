"""Tiers and lifecycle rows of `make bench` (issue 6 "Measurements"), against moto's S3 server started here.

One generated CT series of BENCH_LIFECYCLE_INSTANCES 512 x 512 slices is stored (in-process gateway, S3
buckets on moto, its own redis-server and SQLite) and derived by one in-process worker. Then:
- hot-bucket bytes of the study with its versions only (originals gone cold, the design) beside the same
  with the originals kept hot: the storage the design saves in the hot tier;
- the mover moves the study's originals to the cold bucket in GLACIER: copy, verify the copy's SHA-256
  (HeadObject), record, delete; objects/s and MB/s, unthrottled (lifecycle.yaml's limits pace real runs);
- the study is retrieved as a prior for comparison, `version=original`, before (originals hot: sent as
  stored) and after the move (originals archived: the lossless version is sent while restores start).
BENCH_LIFECYCLE=0 skips these rows.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import dataset, measure
from bench.inprocess import Local, derive_queued, quiet_logs
from bench.measure import Failed
from bench.servers import free_port, redis_process, stop_process
from bench.table import Cell, Row, measured, pick, solo

if TYPE_CHECKING:
    from bench.__main__ import Bench

STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
SERVES = 3  # retrieves per state; the median is reported


@contextmanager
def moto_site(workdir: Path, logs: Path) -> Iterator[Any]:
    """Connections to S3 buckets on a ThreadedMotoServer, a redis-server and SQLite, all torn down after."""
    import boto3
    from moto.server import ThreadedMotoServer

    from gateway.connections import Connections
    from gateway.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="lifecycle-", dir=workdir))
    saved = {name: os.environ.get(name) for name in (*AWS, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.update(AWS)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    moto = redis = conn = None
    try:
        redis, redis_port = redis_process(folder, logs / "lifecycle-redis.log")
        port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for kind in ("originals", "hot", "cold"):
            client.create_bucket(Bucket=f"bench-{kind}")
        settings = Settings.from_env(
            {
                "DATA_DIR": str(folder / "data"),
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "STORAGE": "s3",
                "S3_ENDPOINT_URL": endpoint,
                "ORIGINALS_BUCKET": "bench-originals",
                "HOT_BUCKET": "bench-hot",
                "COLD_BUCKET": "bench-cold",
            }
        )
        quiet_logs(settings, logs / "bench-inprocess.log")
        conn = Connections(settings)
        yield conn
    finally:
        if conn is not None:
            conn.close()
        if moto is not None:
            moto.stop()
        stop_process(redis)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def _rules(storage_class: str) -> Any:
    """Every original of every study leaves now for the cold bucket in `storage_class`, unthrottled."""
    from policies.lifecycle import LifecycleRules, Move, MoverLimits

    move = Move(
        "bench", frozenset({"original"}), storage_class, read_days=None, ingest_days=0, keep_source=False
    )
    unthrottled = MoverLimits(objects_per_second=1e9, bytes_per_second=1e15, max_objects_per_run=10**9,
                              max_bytes_per_run=10**15)  # fmt: skip
    return LifecycleRules(moves=(move,), transitions=(), mover=unthrottled)


def _bytes(conn: Any, tier: str, study_uid: str) -> tuple[int, int]:
    from gateway import keys, tiers

    found = [size for _key, _class, size in tiers.list_copies(conn, tier, keys.study_prefix(study_uid))]
    return sum(found), len(found)


def _serve(client: Any, study_uid: str, runs: int = SERVES) -> tuple[float, dict[str, Any]]:
    """Median seconds of `runs` whole-study retrieves (in-process WADO-RS), what was served and why."""
    seconds, served, reasons, sizes = [], set(), set(), set()
    for _ in range(runs):
        started = time.perf_counter()
        answer = client.get(
            f"/dicomweb/studies/{study_uid}",
            query_string={"version": "original"},
            headers={"Accept": STUDY_ACCEPT},
        )
        body = answer.get_data()
        seconds.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise Failed(f"retrieve HTTP {answer.status_code}: {body[:200]!r}")
        served.add(answer.headers.get("X-Served-Version", "?"))
        reasons.add(answer.headers.get("X-Policy-Reason", ""))
        sizes.add(len(body))
    return statistics.median(seconds), {
        "served": "+".join(sorted(served)),
        "reason": " | ".join(sorted(reasons))[:400],
        "bytes": max(sizes),
        "runs": [round(s, 3) for s in seconds],
        "ops": runs,
    }


def run(bench: Bench, workdir: Path, logs: Path) -> None:
    flag = (os.environ.get("BENCH_LIFECYCLE") or "1").strip().lower()
    if flag in ("0", "false", "no", "off"):
        print("  lifecycle rows: skipped (BENCH_LIFECYCLE=0)")
        return
    count = max(5, int(float(os.environ.get("BENCH_LIFECYCLE_INSTANCES") or 60)))
    print(f"  lifecycle: {count} CT slices on moto S3...", flush=True)
    results: dict[str, Cell] = {}
    try:
        with moto_site(workdir, logs) as conn:
            results = _measure(conn, count)
    except Exception as exc:  # noqa: BLE001 - every row says why, the bench goes on
        traceback.print_exc()
        results = {}
        problem = f"setup: {type(exc).__name__}: {str(exc)[:200]}"
    else:
        problem = None
    hot = results.get("hot", Cell(error=problem))
    rows = [
        (Row(f"Hot bytes/study ({count} CT), versions only", "MB", "lower", None), hot),
        (Row(f"Hot bytes/study ({count} CT), originals kept hot", "MB", "lower", None),
         pick(hot, "originals_kept_hot_mb")),
        (Row("Hot storage saved, originals cold", "%", "higher", None), pick(hot, "saving_percent")),
        (Row("Mover objects/s (copy, verify, record, delete)", "/s", "higher", None),
         results.get("mover", Cell(error=problem))),
        (Row("Mover MB/s (moto S3)", "MB/s", "higher", None), pick(results.get("mover", Cell(error=problem)),
                                                                  "mb_per_s")),
        (Row(f"Serve prior study ({count} CT), original hot", "s", "lower", None),
         results.get("hot_serve", Cell(error=problem))),
        (Row("Serve prior study, original archived -> lossless", "s", "lower", None),
         results.get("cold_serve", Cell(error=problem))),
    ]  # fmt: skip
    for row, figure in rows:
        solo(bench.add, row, figure)


def _measure(conn: Any, count: int) -> dict[str, Cell]:
    from gateway.app import create_app
    from workers import lifecycle

    local = Local()
    items, _ref = dataset.generated_items(count, long_series=count, seed=13)
    study_uid = items[0].study_uid
    client = create_app(conn.settings, conn).test_client()
    for start in range(0, len(items), 20):
        body, content_type = measure.multipart_dicom(item.data for item in items[start : start + 20])
        answer = client.post("/dicomweb/studies", data=body, content_type=content_type,
                             headers={"Accept": "application/dicom+json"})  # fmt: skip
        if answer.status_code != 200:
            raise Failed(f"STOW HTTP {answer.status_code}: {answer.get_data(as_text=True)[:300]}")
    jobs, seconds = derive_queued(conn)
    out: dict[str, Cell] = {}

    def hot() -> tuple[float, dict[str, Any]]:
        versions, objects = _bytes(conn, "hot", study_uid)
        originals, _n = _bytes(conn, "originals", study_uid)
        if not versions or not originals:
            raise Failed(f"nothing stored: hot {versions} B, originals {originals} B")
        return versions / 1e6, {
            "originals_kept_hot_mb": round((versions + originals) / 1e6, 2),
            "saving_percent": round(100 * originals / (versions + originals), 1),
            "hot_objects": objects,
            "derive_jobs": jobs,
            "derive_seconds": round(seconds, 2),
        }

    out["hot"] = measured(None, local, hot)
    out["hot_serve"] = measured(None, local, lambda: _expect(_serve(client, study_uid), "original"))

    def mover() -> tuple[float, dict[str, Any]]:
        report = lifecycle.run(conn, _rules("GLACIER"), reconcile=False)
        summary = report.as_json()
        moved = report.counts.get("moved", 0)
        if moved != count:
            raise Failed(f"moved {moved} of {count} originals: {summary['counts']}")
        return moved / report.seconds, {
            "objects": moved,
            "megabytes": round(report.bytes / 1e6, 1),
            "seconds": round(report.seconds, 2),
            "mb_per_s": round(report.bytes / 1e6 / report.seconds, 1),
            "storage_class": "GLACIER",
            "ops": moved,
        }

    out["mover"] = measured(None, local, mover)
    problem = out["mover"].error
    # Only the first retrieve after the move: it starts the restores, and moto completes a restore at
    # once (S3 takes hours), so the next retrieve already gets the restored original.
    out["cold_serve"] = measured(problem, local, lambda: _expect(_serve(client, study_uid, 1), "lossless"))
    if out["cold_serve"].value is not None:
        _seconds, later = _serve(client, study_uid, 1)
        out["cold_serve"].detail["next_retrieve"] = {k: later[k] for k in ("served", "runs", "reason")}
    return out


def _expect(result: tuple[float, dict[str, Any]], version: str) -> tuple[float, dict[str, Any]]:
    seconds, detail = result
    if detail["served"] != version:
        raise Failed(f"served {detail['served']}, not {version}: {detail['reason'][:200]}")
    return seconds, detail
