"""The policy rows of `make bench` (issue 5) and derive throughput (issue 4), on a gateway of their own.

A second gateway (gunicorn, AUTH_MODE=local, its own Redis, SQLite and local buckets) receives one generated
CT series of BENCH_POLICY_SLICES 512 x 512 slices through STOW. This process then
- derives it with one in-process RQ worker, one job per instance as gateway/jobs.py queues them, and a
  second, smaller series by calling the derive function directly: the difference is what a job costs,
  which is what batching a series per job would save (issue 4 asks the granularity to be measured);
- sets the study's diagnosis status through the API and times gateway.decide.decide_for_retrieve against
  that gateway's Redis and index, from the decision cache and without it (DESIGN.md: the decision adds
  at most 2 ms p95 to a retrieve, Redis round trips included);
- fetches the first frames as a teleradiologist at home (a registered client profile) through a throttling
  proxy at BENCH_TELE_MBPS Mbit/s, with a Downlink hint saying so: the versions the policy picks for the
  study read and unread, beside the original asked for by name.
Every row is ours only: Orthanc has no policy and no versions.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from bench import dataset, measure
from bench.inprocess import Local, derive_queued, quiet_logs
from bench.measure import Failed
from bench.servers import Gateway, start_gateway
from bench.table import Cell, Row, measured, pick, solo

if TYPE_CHECKING:
    from bench.__main__ import Bench

FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
TELE_SUBJECT = "bench-tele-home"
HOME_GROUP = "bench-home"  # a registered client profile puts its members at home (loopback is "hospital")


def _flag(name: str) -> bool:
    return (os.environ.get(name) or "1").strip().lower() not in ("0", "false", "no", "off")


def _number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


@dataclass(frozen=True)
class Knobs:
    """BENCH_DERIVE, BENCH_DECISION, BENCH_TELE (1; 0 skips the rows), BENCH_POLICY_SLICES (100),
    BENCH_DERIVE_DIRECT (30 slices derived without RQ), BENCH_DECISIONS (2000 timed cached calls),
    BENCH_TELE_FRAMES (5), BENCH_TELE_MBPS (2)."""

    derive: bool
    decision: bool
    tele: bool
    slices: int
    direct: int
    decisions: int
    tele_frames: int
    tele_mbps: float

    @classmethod
    def from_env(cls) -> Knobs:
        return cls(
            derive=_flag("BENCH_DERIVE"),
            decision=_flag("BENCH_DECISION"),
            tele=_flag("BENCH_TELE"),
            slices=max(5, int(_number("BENCH_POLICY_SLICES", 100))),
            direct=max(0, int(_number("BENCH_DERIVE_DIRECT", 30))),
            decisions=max(50, int(_number("BENCH_DECISIONS", 2000))),
            tele_frames=max(1, int(_number("BENCH_TELE_FRAMES", 5))),
            tele_mbps=max(0.1, _number("BENCH_TELE_MBPS", 2.0)),
        )

    @property
    def any(self) -> bool:
        return self.derive or self.decision or self.tele


class PolicySite:
    """The policy gateway, with this process's Connections to the same Redis, index and buckets."""

    def __init__(self, server: Gateway, logs: Path) -> None:
        from gateway.connections import Connections

        self.server = server
        self.settings = server.settings()
        quiet_logs(self.settings, logs / "bench-inprocess.log")
        self.conn = Connections(self.settings)
        self.http = measure.session(2)
        self._tokens: dict[tuple[str, str, tuple[str, ...]], str] = {}

    def close(self) -> None:
        self.http.close()
        self.conn.close()

    def auth(self, role: str, subject: str | None = None, groups: tuple[str, ...] = ()) -> dict[str, str]:
        from gateway.auth import mint_local_token

        key = (role, subject or f"bench-{role}", groups)
        if key not in self._tokens:
            self._tokens[key] = mint_local_token(self.settings, [role], key[1], groups)
        return {"Authorization": f"Bearer {self._tokens[key]}"}

    def stow(self, items: list[dataset.Item]) -> None:
        for start in range(0, len(items), 25):
            body, content_type = measure.multipart_dicom(item.data for item in items[start : start + 25])
            headers = {
                "Content-Type": content_type,
                "Accept": "application/dicom+json",
                **self.auth("uploader"),
            }
            answer = self.http.post(f"{self.server.root}/studies", data=body, headers=headers, timeout=300)
            if answer.status_code != 200:
                raise Failed(f"STOW HTTP {answer.status_code}: {answer.text[:300]}")

    def set_status(self, study_uid: str, status: int) -> None:
        answer = self.http.put(
            f"{self.server.base}/api/studies/{study_uid}/diagnosis",
            json={"status": status},
            headers=self.auth("admin"),
            timeout=30,
        )
        if answer.status_code != 200:
            raise Failed(f"PUT diagnosis HTTP {answer.status_code}: {answer.text[:300]}")

    def put_profile(self, name: str, body: dict[str, Any]) -> None:
        answer = self.http.put(
            f"{self.server.base}/api/profiles/{name}", json=body, headers=self.auth("admin"), timeout=30
        )
        if answer.status_code != 200:
            raise Failed(f"PUT profile HTTP {answer.status_code}: {answer.text[:300]}")

    def version_states(self, study_uid: str) -> dict[str, dict[str, int]]:
        from sqlalchemy import func, select

        from gateway.index.models import Version

        with self.conn.sessions() as session:
            rows = session.execute(
                select(Version.version_id, Version.state, func.count())
                .where(Version.study_uid == study_uid)
                .group_by(Version.version_id, Version.state)
            ).all()
        states: dict[str, dict[str, int]] = {}
        for version_id, state, count in rows:
            states.setdefault(version_id, {})[state] = count
        return states

    def sizes(self, study_uid: str) -> dict[str, int]:
        from sqlalchemy import func, select

        from gateway.index.models import Instance, Version

        with self.conn.sessions() as session:
            original = session.execute(
                select(func.sum(Instance.size)).where(Instance.study_uid == study_uid)
            ).scalar_one()
            rows = session.execute(
                select(Version.version_id, func.sum(Version.size))
                .where(Version.study_uid == study_uid, Version.state == "ready")
                .group_by(Version.version_id)
            ).all()
        return {"original": int(original or 0), **{v: int(size or 0) for v, size in rows}}


def run(bench: Bench, workdir: Path, logs: Path) -> None:
    """Start the policy gateway, store and derive the series, then the derive, decision and tele rows."""
    knobs = Knobs.from_env()
    if not knobs.any:
        print("  policy, derive and tele rows: skipped (BENCH_DERIVE=BENCH_DECISION=BENCH_TELE=0)")
        return
    print(f"  policy gateway: {knobs.slices} CT slices, AUTH_MODE=local...", flush=True)
    server = start_gateway(
        workdir, logs, {"AUTH_MODE": "local"}, name="ours (policy)", log_name="gateway-policy"
    )
    site: PolicySite | None = None
    problem = server.error
    items, direct_items = series(knobs.slices, 11), series(knobs.direct, 17) if knobs.direct else []
    try:
        if problem is None:
            try:
                site = PolicySite(server, logs)
                site.put_profile(f"group:{HOME_GROUP}", {"location": "home"})
            except Exception as exc:  # noqa: BLE001 - the rows say why, the bench goes on
                traceback.print_exc()
                problem = f"setup: {type(exc).__name__}: {str(exc)[:200]}"
        study_uid = items[0].study_uid
        derived = derive_rows(bench, site, problem, knobs, items, direct_items)
        if problem is None and derived.error:
            problem = f"derive failed: {derived.error}"
        if knobs.decision:
            decision_rows(bench, site, problem, knobs, study_uid)
        if knobs.tele:
            tele_rows(bench, site, problem, knobs, items)
    finally:
        if site is not None:
            site.close()
        server.stop()


def series(count: int, seed: int) -> list[dataset.Item]:
    """One study with one series of `count` generated 512 x 512 CT slices (explicit VR LE, 12 bits)."""
    items, _ref = dataset.generated_items(count, long_series=count, seed=seed)
    return items


# --- derive -------------------------------------------------------------------------------------------------


def derive_rows(
    bench: Bench,
    site: PolicySite | None,
    problem: str | None,
    knobs: Knobs,
    items: list[dataset.Item],
    direct_items: list[dataset.Item],
) -> Cell:
    """Store and derive the series (the rows print only with BENCH_DERIVE: the others need the versions)."""
    study_uid = items[0].study_uid

    def how() -> tuple[float, dict[str, Any]]:
        assert site is not None
        direct = _direct(site, direct_items) if direct_items else {}  # first: it also warms the codecs up
        site.stow(items)
        jobs, seconds = derive_queued(site.conn)
        states = site.version_states(study_uid)
        ready = {v: counts.get("ready", 0) for v, counts in states.items()}
        if not ready or min(ready.values()) < knobs.slices:
            raise Failed(f"not every slice got every version: {states}")
        pixel_mb = knobs.slices * dataset.SIDE * dataset.SIDE * 2 / 1e6
        detail: dict[str, Any] = {
            "instances": knobs.slices,
            "jobs": jobs,
            "seconds": round(seconds, 2),
            "ms_per_instance": round(seconds * 1000 / knobs.slices, 1),
            "pixel_mb_per_s": round(pixel_mb / seconds, 1),
            "states": states,
            "sizes": site.sizes(study_uid),
            **direct,
        }
        if direct:
            detail["rq_ms_per_job"] = round(detail["ms_per_instance"] - detail["direct_ms_per_instance"], 1)
        return knobs.slices / seconds, detail

    result = measured(problem, Local(), how)
    if knobs.derive:
        jobs = result.detail.get("jobs")
        per = f"{jobs} jobs" if jobs else "per-instance jobs"
        rows = [
            (Row(f"Derive CT 512x512, 1 worker ({per}) inst/s", "/s", "higher", None, target=30), result),
            (Row("Derive CT 512x512, per instance", "ms", "lower", None), pick(result, "ms_per_instance")),
            (
                Row("Derive CT 512x512, pixel data MB/s", "MB/s", "higher", None),
                pick(result, "pixel_mb_per_s"),
            ),
        ]
        if knobs.direct:
            rows += [
                (Row("Derive CT, per instance without RQ", "ms", "lower", None),
                 pick(result, "direct_ms_per_instance")),
                (Row("Derive CT, RQ cost per job (batching saves)", "ms", "lower", None),
                 pick(result, "rq_ms_per_job")),
            ]  # fmt: skip
        for row, figure in rows:
            solo(bench.add, row, figure)
    return result


def _direct(site: PolicySite, items: list[dataset.Item]) -> dict[str, Any]:
    """The same work as the jobs, called in a loop: what a per-series job would cost per instance. The
    first instance is derived untimed (codecs and connections warm up, for the jobs after it too)."""
    from rq import Queue

    from gateway.jobs import DERIVE_QUEUE
    from gateway.uids import InstanceRef
    from workers import derive

    site.stow(items)
    Queue(DERIVE_QUEUE, connection=site.conn.redis).empty()  # derived below, not by jobs
    refs = [InstanceRef(item.study_uid, item.series_uid, item.sop_uid) for item in items]
    derive.derive(site.conn, refs[0])
    started = time.perf_counter()
    for ref in refs[1:]:
        derive.derive(site.conn, ref)
    seconds = time.perf_counter() - started
    states = site.version_states(items[0].study_uid)
    if any(counts.get("ready", 0) < len(items) for counts in states.values()):
        raise Failed(f"direct derive left versions unmade: {states}")
    timed = max(1, len(refs) - 1)
    return {"direct_instances": timed, "direct_ms_per_instance": round(seconds * 1000 / timed, 1)}


# --- the decision -------------------------------------------------------------------------------------------


def decision_rows(
    bench: Bench, site: PolicySite | None, problem: str | None, knobs: Knobs, study_uid: str
) -> None:

    def how() -> tuple[float, dict[str, Any]]:
        assert site is not None
        from gateway import clienthints, decide, selection
        from gateway.auth import Identity

        conn = site.conn
        site.set_status(study_uid, 2)  # read: every version is transmittable, the budget decides
        identity = Identity("bench-decider", frozenset({"teleradiologist"}), frozenset({HOME_GROUP}), True)
        headers = {"Downlink": "2"}
        profile = clienthints.profile_for(conn, identity, headers, "127.0.0.1")
        request = selection.request_facts({}, conn.rules.versions, ("*",))  # a retrieve, transfer-syntax=*
        key = decide.decision_key(study_uid, identity)
        first = decide.decide_for_retrieve(conn, identity, profile, study_uid, request)
        if first.outcome.value != "serve":
            raise Failed(f"the decision is {first.outcome.value}: {first.reason}")

        def timed(
            call: Callable[[], Any], before: Callable[[], Any] | None = None, count: int = 0
        ) -> list[float]:
            samples = []
            for _ in range(count):
                if before is not None:
                    before()
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
            return samples

        decide_call = lambda: decide.decide_for_retrieve(conn, identity, profile, study_uid, request)  # noqa: E731
        cached = timed(decide_call, count=knobs.decisions)
        again = decide_call()
        if "cached" not in again.trace[0]:
            raise Failed("the second decision did not come from the cache")
        uncached = timed(decide_call, lambda: conn.redis.delete(key), count=max(50, knobs.decisions // 10))
        profiles = timed(
            lambda: clienthints.profile_for(conn, identity, headers, "127.0.0.1"), count=knobs.decisions
        )
        ms = lambda values, q: round(measure.percentile(values, q) * 1000, 3)  # noqa: E731
        return ms(cached, 95), {
            "cached_p50_ms": ms(cached, 50),
            "cached_p95_ms": ms(cached, 95),
            "uncached_p50_ms": ms(uncached, 50),
            "uncached_p95_ms": ms(uncached, 95),
            "profile_p50_ms": ms(profiles, 50),
            "profile_p95_ms": ms(profiles, 95),
            "with_profile_cached_p95_ms": round(ms(cached, 95) + ms(profiles, 95), 3),
            "n_cached": len(cached),
            "n_uncached": len(uncached),
            "served": first.served,
            "reason": first.reason,
            "instances": knobs.slices,
            "ops": len(cached) + len(uncached) + len(profiles),
        }

    result = measured(problem, Local(), how)
    rows = [
        (Row("Policy decision p50, cached", "ms", "lower", None), pick(result, "cached_p50_ms")),
        (Row("Policy decision p95, cached", "ms", "lower", None, target=2), result),
        (Row("Policy decision p50, uncached", "ms", "lower", None), pick(result, "uncached_p50_ms")),
        (Row("Policy decision p95, uncached", "ms", "lower", None), pick(result, "uncached_p95_ms")),
        (Row("Client profile (hints, Redis) p95", "ms", "lower", None), pick(result, "profile_p95_ms")),
        (Row("Decision + client profile p95, cached", "ms", "lower", None, target=2),
         pick(result, "with_profile_cached_p95_ms")),
    ]  # fmt: skip
    for row, figure in rows:
        solo(bench.add, row, figure)


# --- a teleradiologist at home ------------------------------------------------------------------------------


def tele_rows(
    bench: Bench, site: PolicySite | None, problem: str | None, knobs: Knobs, items: list[dataset.Item]
) -> None:
    from tests.e2e.throttle import Throttle

    mbps, count = knobs.tele_mbps, min(knobs.tele_frames, len(items))
    ordered = items[:count]
    study_uid = items[0].study_uid
    cases = (("read", 2, {}), ("unread", 1, {}), ("original", 2, {"version": "original"}))
    results: list[tuple[str, Cell]] = []
    line: Throttle | None = None
    try:
        if problem is None and site is not None:
            line = Throttle(("127.0.0.1", site.server.port), mbps=mbps, lifetime=600).start()
        for label, status, params in cases:

            def how(status: int = status, params: dict[str, str] = params) -> tuple[float, dict[str, Any]]:
                assert site is not None and line is not None
                site.set_status(study_uid, status)
                return _first_frames(site, line.url, ordered, params, mbps)

            results.append((label, measured(problem, Local(), how)))
    except Exception as exc:  # noqa: BLE001 - the rows say why
        traceback.print_exc()
        results = [(label, Cell(error=f"{type(exc).__name__}: {str(exc)[:200]}")) for label, _s, _p in cases]
    finally:
        if line is not None:
            line.stop()
    for label, result in results:
        served = result.detail.get("version", "?")
        asked = "by name" if label == "original" else f"{label} study"
        name = f"Tele home {mbps:g} Mbit/s, frame 1: {served} ({asked})"
        solo(bench.add, Row(name, "s", "lower", None), result)
    for _label, result in results:
        served = result.detail.get("version", "?")
        name = f"Tele home {mbps:g} Mbit/s, first {count} frame{'s' if count > 1 else ''}: {served}"
        solo(bench.add, Row(name, "s", "lower", None), pick(result, "all_seconds"))


def _first_frames(
    site: PolicySite, root: str, items: list[dataset.Item], params: dict[str, str], mbps: float
) -> tuple[float, dict[str, Any]]:
    """Frame 1 of the first instances, one after the other on one connection through the slow line, as
    a viewer's first requests; a fresh connection, so no earlier response is still in the buffers."""
    who = site.auth("teleradiologist", TELE_SUBJECT, (HOME_GROUP,))
    headers = {**who, "Downlink": f"{mbps:g}", "Accept": FRAME_ACCEPT}
    http = requests.Session()
    served: set[str] = set()
    total = 0
    first = 0.0
    started = time.perf_counter()
    try:
        for index, item in enumerate(items):
            url = (
                f"{root}/dicomweb/studies/{item.study_uid}/series/{item.series_uid}"
                f"/instances/{item.sop_uid}/frames/1"
            )
            answer = http.get(url, params=params, headers=headers, timeout=600)
            if answer.status_code != 200:
                raise Failed(f"frame HTTP {answer.status_code}: {answer.text[:200]}")
            served.add(answer.headers.get("X-Served-Version", "?"))
            total += len(answer.content)
            if index == 0:
                first = time.perf_counter() - started
                reason = answer.headers.get("X-Policy-Reason", "")
    finally:
        http.close()
    seconds = time.perf_counter() - started
    return first, {
        "version": "+".join(sorted(served)),
        "all_seconds": round(seconds, 3),
        "frames": len(items),
        "bytes": total,
        "line_mbps": mbps,
        "achieved_mbps": round(total * 8 / seconds / 1e6, 2),
        "reason": reason,
        "ops": len(items),
    }
