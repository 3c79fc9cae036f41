"""`make bench`: our gateway and Orthanc (with its DICOMweb plugin) measured side by side in one run.

Both servers are started here on 127.0.0.1 with temporary storage, receive the same instances, answer the
same requests in turn, and are stopped at the end. A server that fails leaves its column as
"failed: reason"; the run itself never crashes, so Orthanc's figures print even while ours do not work.
Knobs: BENCH_INSTANCES (2000), BENCH_SECONDS (10, per concurrent test), BENCH_CLIENTS (8),
BENCH_BIG_MB (2048; 0 skips), BENCH_BIG_ORTHANC (1), BENCH_TMPDIR (system temp).

Then, with both servers stopped, rows of ours alone (Orthanc has no versions, policy or tiers), each
section skipped with its variable at 0: derive throughput (BENCH_DERIVE), the policy decision's latency
(BENCH_DECISION) and a teleradiologist's wait at home on a slow line (BENCH_TELE) on a second gateway
(bench/policy.py, more knobs there), tiers and lifecycle on moto S3 (BENCH_LIFECYCLE,
bench/lifecycle.py), and OHIF's time to first image and whole series in headless Chromium at 2 and
20 Mbit/s (BENCH_BROWSER, bench/browser.py).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from bench import big, browser, dataset, lifecycle, measure, policy
from bench.measure import GZIP, IDENTITY, Failed
from bench.servers import REPO, Gateway, Orthanc, Server, start_gateway, start_orthanc
from bench.table import Cell, Row, cell, format_row, print_table

OHIF_STUDY_LIST = (
    "/studies?limit=101&offset=0&fuzzymatching=true&includefield=00081030%2C00080060%2C00080090%2C00100030"
)
FRAME_ACCEPT = {
    "ts=*": "multipart/related; type=application/octet-stream; transfer-syntax=*",
    "default": "multipart/related; type=application/octet-stream",
}


@dataclass(frozen=True)
class Config:
    instances: int
    seconds: float
    clients: int
    big_mb: int
    big_orthanc: bool
    tmpdir: str | None

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ

        def number(name: str, default: float) -> float:
            try:
                return float(env.get(name) or default)
            except ValueError:
                print(f"ignoring {name}={env[name]!r}: not a number", file=sys.stderr)
                return default

        return cls(
            instances=max(10, int(number("BENCH_INSTANCES", 2000))),
            seconds=max(1.0, number("BENCH_SECONDS", 10)),
            clients=max(1, int(number("BENCH_CLIENTS", 8))),
            big_mb=max(0, int(number("BENCH_BIG_MB", 2048))),
            big_orthanc=(env.get("BENCH_BIG_ORTHANC") or "1") not in ("0", "false", "no"),
            tmpdir=env.get("BENCH_TMPDIR") or None,
        )


def settle() -> None:
    """Flush dirty pages between phases, so one server's write-back does not land in the other's timing."""
    os.sync()
    time.sleep(0.5)


class Bench:
    def __init__(self, config: Config, data: dataset.BenchSet, ours: Gateway, theirs: Orthanc) -> None:
        self.config = config
        self.data = data
        self.servers = {"ours": ours, "theirs": theirs}
        self.stored: dict[str, set[str]] = {"ours": set(), "theirs": set()}
        self.rows: list[Row] = []
        order = list(data.items)
        random.Random(3).shuffle(order)
        self.order = order
        self.sequential_count = min(300, len(order) // 4)

    def cells(self, how: Callable[[str, Server], tuple[float, dict[str, Any]]]) -> dict[str, Cell]:
        """Measure Orthanc, then ours, letting the disks settle after each."""
        out: dict[str, Cell] = {}
        for side in ("theirs", "ours"):
            server = self.servers[side]
            out[side] = cell(server, lambda server=server, side=side: how(side, server))
            settle()
        return out

    def add(self, row: Row, cells: dict[str, Cell]) -> Row:
        """Append the row and print it at once, so a long run shows progress."""
        row.ours, row.theirs = cells["ours"], cells["theirs"]
        self.rows.append(row)
        print("  " + format_row(row), flush=True)
        return row

    def row(self, row: Row, how: Callable[[str, Server], tuple[float, dict[str, Any]]]) -> Row:
        return self.add(row, self.cells(how))

    def derived(self, row: Row, cells: dict[str, Cell], key: str) -> Row:
        """A row whose figures are another detail of cells already measured (p50 beside p95)."""
        picked = {
            side: Cell(c.detail.get(key) if c.value is not None else None, c.error, {})
            for side, c in cells.items()
        }
        return self.add(row, picked)

    # STOW -----------------------------------------------------------------------------------------------
    def stow_phase(
        self, side: str, server: Server, items: list[dataset.Item], clients: int
    ) -> tuple[float, dict]:
        failures: list[str] = []

        def one(s: requests.Session, item: dataset.Item) -> None:
            try:
                measure.stow(s, server.root, [item.data])
            except Failed as exc:
                failures.append(f"{item.source} {item.sop_uid}: {exc}")
                raise
            self.stored[side].add(item.sop_uid)

        result = measure.for_items(one, items, clients)
        detail = {
            "ops": len(items),
            "instances": len(items),
            "stored": result.done,
            "failed": result.errors,
            "seconds": round(result.elapsed, 2),
            "failures": failures[:10],
        }
        if result.done == 0:
            raise Failed(f"no instance stored: {result.first_error}")
        return result.rate, detail

    def stow_rows(self) -> None:
        head, tail = self.order[: self.sequential_count], self.order[self.sequential_count :]
        self.row(
            Row("STOW instances/s, 1 client", "/s", "higher", None),
            lambda side, server: self.stow_phase(side, server, head, 1),
        )
        self.row(
            Row(f"STOW instances/s, {self.config.clients} clients", "/s", "higher", 2.0),
            lambda side, server: self.stow_phase(side, server, tail, self.config.clients),
        )
        for side in ("theirs", "ours"):
            missing = len(self.order) - len(self.stored[side])
            if missing and not self.servers[side].error:
                print(f"  note: {side} did not store {missing} of {len(self.order)} instances")

    # QIDO -----------------------------------------------------------------------------------------------
    def qido(self, side: str, server: Server, encoding: str) -> tuple[float, dict]:
        stored = len(self.stored[side])
        if stored < min(2000, int(0.95 * len(self.order))):
            raise Failed(f"only {stored} instances stored, the query needs the full set")
        s = measure.session(1)
        url = server.root + OHIF_STUDY_LIST
        headers = {"Accept": "application/dicom+json", "Accept-Encoding": encoding}
        first = measure.get(s, url, headers, keep=True)
        if first.status != 200:
            raise Failed(f"HTTP {first.status}: {first.body[:200]!r}")
        studies = len(json.loads(first.body))
        samples = measure.sequential(lambda: measure.get(s, url, headers), 300, self.config.seconds * 1.5)
        p50, p95 = samples.p(50) * 1000, samples.p(95) * 1000
        return p95, {
            "p50_ms": round(p50, 2),
            "p95_ms": round(p95, 2),
            "n": len(samples.seconds),
            "ops": len(samples.seconds) + 4,
            "studies_returned": studies,
            "bytes": samples.sizes[-1],
            "encoding": first.encoding,
        }

    def qido_rows(self) -> None:
        for label, encoding in (("gzip", GZIP), ("identity", IDENTITY)):
            cells = self.cells(lambda side, server, encoding=encoding: self.qido(side, server, encoding))
            self.derived(Row(f"QIDO OHIF study list p50 ({label})", "ms", "lower", None), cells, "p50_ms")
            self.add(Row(f"QIDO OHIF study list p95 ({label})", "ms", "lower", 0.5), cells)

    # Metadata -------------------------------------------------------------------------------------------
    def metadata(self, side: str, server: Server, encoding: str) -> tuple[float, dict]:
        study, series = self.data.long_series
        wanted = {i.sop_uid for i in self.data.items if i.series_uid == series}
        if not wanted <= self.stored[side]:
            raise Failed(f"the {len(wanted)}-instance series was not fully stored")
        s = measure.session(1)
        url = f"{server.root}/studies/{study}/series/{series}/metadata"
        headers = {"Accept": "application/dicom+json", "Accept-Encoding": encoding}
        first = measure.get(s, url, headers, keep=True)
        if first.status != 200:
            raise Failed(f"HTTP {first.status}: {first.body[:200]!r}")
        count = len(json.loads(first.body))
        if count != len(wanted):
            raise Failed(f"metadata lists {count} instances, expected {len(wanted)}")
        samples = measure.sequential(lambda: measure.get(s, url, headers), 100, self.config.seconds)
        p50 = samples.p(50) * 1000
        return p50, {
            "p50_ms": round(p50, 2),
            "p95_ms": round(samples.p(95) * 1000, 2),
            "n": len(samples.seconds),
            "ops": len(samples.seconds) + 4,
            "instances": count,
            "bytes": samples.sizes[-1],
            "encoding": first.encoding,
        }

    def metadata_rows(self) -> None:
        size = self.data.long_series_size
        for label, encoding in (("gzip", GZIP), ("identity", IDENTITY)):
            self.row(
                Row(f"Series metadata p50, {size} inst. ({label})", "ms", "lower", 0.2),
                lambda side, server, encoding=encoding: self.metadata(side, server, encoding),
            )

    # Frames ---------------------------------------------------------------------------------------------
    def frames(self, side: str, server: Server, accept: str, encoding: str) -> tuple[float, dict]:
        targets = [i for i in self.data.items if i.generated_ct and i.sop_uid in self.stored[side]]
        if not targets:
            raise Failed("no generated CT instance stored")
        headers = {"Accept": accept, "Accept-Encoding": encoding}

        parts = urlsplit(server.root)
        base, prefix = f"{parts.scheme}://{parts.netloc}", parts.path

        def path(n: int) -> str:
            item = targets[(n * 7919) % len(targets)]
            series = f"{prefix}/studies/{item.study_uid}/series/{item.series_uid}"
            return f"{series}/instances/{item.sop_uid}/frames/1"

        s = measure.session(1)
        first = measure.get(s, base + path(0), headers, keep=True)
        if first.status != 200:
            raise Failed(f"HTTP {first.status}: {first.body[:200]!r}")
        pixels = targets[0].data[-dataset.SIDE * dataset.SIDE * 2 :]  # Pixel Data is the last element
        if pixels not in first.body:
            raise Failed(f"frame 1 of {targets[0].sop_uid}: not the stored pixels ({len(first.body)} bytes)")

        def call(client: measure.LeanClient, n: int) -> measure.Reply:
            return client.get(path(n), headers)

        result = measure.for_duration(
            call, self.config.clients, self.config.seconds, lambda: measure.LeanClient(base)
        )
        if result.done == 0:
            raise Failed(f"no frame served: {result.first_error}")
        return result.rate, {
            "frames": result.done,
            "errors": result.errors,
            "ops": result.done + result.errors + 1,
            "seconds": round(result.elapsed, 2),
            "mb_per_s": round(result.bytes / result.elapsed / 1e6, 1),
            "encoding": first.encoding,
            "content_type": first.content_type,
            "first_error": result.first_error,
        }

    def frame_rows(self) -> None:
        for label, accept in FRAME_ACCEPT.items():
            for enc_label, encoding in (("identity", IDENTITY), ("gzip", GZIP)):
                name = f"Frames/s, {self.config.clients} clients ({label}, {enc_label})"
                self.row(
                    Row(name, "/s", "higher", 2.0),
                    lambda side, server, a=accept, e=encoding: self.frames(side, server, a, e),
                )

    # Big instance ---------------------------------------------------------------------------------------
    def big_rows(self, workdir: Path) -> None:
        size_mb = self.config.big_mb
        label = f"{size_mb / 1024:g} GB" if size_mb >= 1024 else f"{size_mb} MB"
        if size_mb == 0:
            print("  big instance: skipped (BENCH_BIG_MB=0)")
            return
        free = shutil.disk_usage(workdir).free // big.MB
        copies = 3 if self.config.big_orthanc else 2
        if free < size_mb * 2 + 1024:
            print(f"  big instance: skipped, {free} MB free in {workdir}, need {size_mb * 2 + 1024} MB")
            return
        with_orthanc = self.config.big_orthanc and free >= size_mb * copies + 1024
        print(f"  writing the {label} test file...", flush=True)
        started = time.perf_counter()
        try:
            big_file = big.write(workdir / "big.dcm", size_mb)
        except (OSError, Failed) as exc:
            print(f"  big instance: skipped, the test file could not be written: {exc}")
            (workdir / "big.dcm").unlink(missing_ok=True)
            return
        print(f"  written in {time.perf_counter() - started:.1f} s ({big_file.frames} frames)", flush=True)
        rows = [
            Row(f"STOW one {label} instance", "s", "lower", None),
            Row(f"STOW one {label} instance, MB/s", "MB/s", "higher", None),
            Row(f"STOW one {label} instance, peak RSS", "MB", "lower", None),
        ]
        results: dict[str, Cell] = {}
        for side in ("theirs", "ours"):
            server = self.servers[side]
            if side == "theirs" and not with_orthanc:
                results[side] = Cell(error="not measured (BENCH_BIG_ORTHANC=0 or disk space)")
                continue
            pids = server.worker_pids() if isinstance(server, Gateway) else server.pids()

            def how(server: Server = server, pids: list[int] = pids) -> tuple[float, dict]:
                outcome = big.store(server, big_file, pids)
                return outcome.seconds, asdict(outcome)

            results[side] = cell(server, how)
            settle()
        big_file.path.unlink(missing_ok=True)
        self.add(rows[0], results)
        self.derived(rows[1], results, "mb_per_s")
        self.derived(rows[2], results, "peak_rss_mb")


def server_info(ours: Gateway, theirs: Orthanc) -> dict[str, Any]:
    info: dict[str, Any] = {
        "ours": {
            "error": ours.error,
            "root": ours.root,
            "gunicorn": "--workers 2 --threads 8 --timeout 3600",
            "note": "no RQ worker runs during the bench; derive jobs stay queued",
        },
        "theirs": {"error": theirs.error, "root": theirs.root, "config": theirs.config},
    }
    if theirs.root:
        base = theirs.root.rsplit("/dicom-web", 1)[0]
        try:
            info["theirs"]["system"] = requests.get(f"{base}/system", timeout=5).json()
            info["theirs"]["dicomweb_plugin"] = requests.get(f"{base}/plugins/dicom-web", timeout=5).json()
        except (requests.RequestException, ValueError):
            pass
    return info


def write_results(
    config: Config, data: dataset.BenchSet, rows: list[Row], info: dict[str, Any], stamp: str
) -> Path:
    path = REPO / "var" / "bench" / f"results-{stamp}.json"
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": asdict(config),
        "dataset": {
            "instances": len(data.items),
            "studies": data.studies(),
            "bytes": data.total_bytes,
            "long_series_instances": data.long_series_size,
        },
        "servers": info,
        "rows": [
            {
                "name": r.name,
                "unit": r.unit,
                "better": r.better,
                "goal": r.goal,
                "target": r.target,
                "ours_only": r.ours_only,
                "ratio": r.ratio,
                "verdict": r.verdict,
                "ours": asdict(r.ours),
                "theirs": asdict(r.theirs),
            }
            for r in rows
        ],
    }
    path.write_text(json.dumps(document, indent=2, default=str))
    return path


def interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: client threads stop at their next request, the finally block stops the servers."""
    measure.STOP.set()
    raise KeyboardInterrupt


def main() -> int:
    config = Config.from_env()
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=config.tmpdir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = REPO / "var" / "bench" / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    ours = theirs = None
    bench: Bench | None = None
    data: dataset.BenchSet | None = None
    info: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        print(
            f"bench: {os.cpu_count()} CPUs, {config.instances} generated instances + ../shared/data, "
            f"{config.clients} clients, {config.seconds:g} s per concurrent test, temp {workdir}"
        )
        t = time.perf_counter()
        data = dataset.build(config.instances)
        print(
            f"dataset: {len(data.items)} instances, {data.studies()} studies, "
            f"{data.total_bytes / 1e6:.0f} MB (built in {time.perf_counter() - t:.1f} s)"
        )
        theirs = start_orthanc(workdir, logs)
        print(f"Orthanc: {theirs.root or 'failed: ' + str(theirs.error)}")
        ours = start_gateway(workdir, logs)
        print(f"ours:    {ours.root or 'failed: ' + str(ours.error)}", flush=True)
        info = server_info(ours, theirs)
        bench = Bench(config, data, ours, theirs)
        print(f"\n{'row':52}  {'ours':12}  {'theirs':12}  {'ratio':8}  goal")
        phases = (bench.stow_rows, bench.qido_rows, bench.metadata_rows, bench.frame_rows)
        for phase in (*phases, lambda: bench.big_rows(workdir)):
            try:
                phase()
            except Exception:  # noqa: BLE001 - a bench bug in one phase must not lose the others
                traceback.print_exc()
        for server in (theirs, ours):  # the rows of ours alone get the machine to themselves
            server.stop()
        for section in (policy.run, lifecycle.run, browser.run):
            try:
                section(bench, workdir, logs)
            except Exception:  # noqa: BLE001 - as above
                traceback.print_exc()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the servers", file=sys.stderr)
    finally:
        for server in (theirs, ours):
            if server is not None:
                if server.workdir is not None and server.error is None and not server.alive():
                    print(f"{server.name} died during the run; its log is in {logs}")
                server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if bench is None or data is None:
        print("bench could not start")
        return 1
    print_table(bench.rows)
    path = write_results(config, data, bench.rows, info, stamp)
    print(f"\nresults: {path}  (server logs: {logs}; {time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
