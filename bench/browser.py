"""The browser rows of `make bench` (issue 7, "Progressive first image"): OHIF in headless Chromium on a
slow line, time to the first image and to the whole series of a CT study.

A gateway of its own (gunicorn, AUTH_MODE=local) receives BENCH_BROWSER_SLICES generated 512 x 512 CT
slices by STOW; the derive jobs run in this process; the study is set to "read". OHIF's ready-built viewer
(tests/e2e/ohif_support.py) is served from another origin, its page delegating Client Hints to the
gateway's origin, and opens the study with a bearer token in the URL, as OHIF takes one:
- "policy": a referring physician at home (a registered client profile puts the group there), whom the
  policy serves a small HTJ2K version (q50 at these line speeds);
- "original": a radiologist at the hospital (loopback), no budget: the study uncompressed as stored.
OHIF cannot send the vendor parameter `version=original`, so the comparison is two identities.
The line is slow twice over, at the same rate: Chromium emulates it (DevTools protocol,
Network.emulateNetworkConditions, with BENCH_BROWSER_LATENCY_MS of latency, so the page's Downlink hint
says it) and the gateway is reached through the throttling proxy on loopback (tests/e2e/throttle.py), so
the gateway's own writes wait on the line. Each load gets a fresh proxy port, so no connection or cached
response of an earlier load is reused; the viewer's own files come from the browser cache, warmed once
without a line (a returning user's viewer is cached, and the rows measure the study, not OHIF's bundle).

First image: from navigation to the first viewport canvas holding an image (polled in the page every
50 ms: grey-level spread, not one flat colour). Whole series: to the end of the last /frames/ response,
once every slice has had one. Knobs: BENCH_BROWSER (1; 0 skips), BENCH_BROWSER_SLICES (20),
BENCH_BROWSER_MBPS ("2,20"), BENCH_BROWSER_TIMEOUT (90 s per load), BENCH_BROWSER_LATENCY_MS (20).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bench.inprocess import Local, derive_queued
from bench.measure import Failed
from bench.policy import PolicySite, series
from bench.servers import start_gateway
from bench.table import Cell, Row, measured, pick, solo

if TYPE_CHECKING:
    from bench.__main__ import Bench
    from tests.e2e.ohif_support import Browser

HOME_GROUP = "bench-browser-home"
CASES = (  # label, role, groups: who opens the study
    ("policy", "referring", (HOME_GROUP,)),
    ("original", "radiologist", ()),
)
# In the page: wait for a viewport canvas (Cornerstone draws each viewport into a 2D canvas of this
# class) whose centre holds an image; Date.now() when it does, or null at the deadline.
FIRST_IMAGE = """async ({timeoutMs}) => {
  const deadline = Date.now() + timeoutMs;
  const painted = () => {
    for (const canvas of document.querySelectorAll('canvas.cornerstone-canvas')) {
      if (canvas.width < 64 || canvas.height < 64) continue;
      const context = canvas.getContext('2d', {willReadFrequently: true});
      if (!context) continue;
      const w = Math.floor(canvas.width / 2), h = Math.floor(canvas.height / 2);
      const data = context.getImageData(Math.floor(w / 2), Math.floor(h / 2), w, h).data;
      const seen = new Set();
      let sum = 0, squares = 0, n = 0;
      for (let i = 0; i < data.length; i += 16) {
        const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
        seen.add(Math.round(grey)); sum += grey; squares += grey * grey; n += 1;
      }
      const mean = sum / n;
      if (seen.size >= 32 && Math.sqrt(squares / n - mean * mean) >= 8) return true;
    }
    return false;
  };
  while (Date.now() < deadline) {
    if (painted()) return Date.now();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return null;
}"""


def _number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _rates() -> list[float]:
    text = os.environ.get("BENCH_BROWSER_MBPS") or "2,20"
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        rates = [2.0, 20.0]
    return [rate for rate in rates if rate > 0] or [2.0, 20.0]


def enabled() -> bool:
    return (os.environ.get("BENCH_BROWSER") or "1").strip().lower() not in ("0", "false", "no", "off")


def skip_reason() -> str | None:
    """Why the rows cannot be measured here (no chromium, node or OHIF install), else None."""
    from tests.e2e import ohif_support

    reason = ohif_support.skip_reason()
    if reason is None and not (ohif_support.OHIF_DIST / "index.html").exists():
        reason = f"OHIF is not installed in {ohif_support.OHIF_DIST} (run {ohif_support.ENSURE})"
    if reason is None and not (ohif_support.REPO / "node_modules" / "playwright-core").exists():
        reason = f"playwright-core is not installed (run {ohif_support.ENSURE})"
    return reason


def _viewer_class() -> type:
    """ohif_support's viewer origin, but the viewer's own files cacheable (the page and app-config.js
    stay no-store), and the gateway it points at changeable between loads."""
    from tests.e2e import ohif_support

    class CachingHandler(ohif_support._ViewerHandler):
        cacheable = False

        def _send(self, body: bytes, kind: str, page: bool = False) -> None:
            self.cacheable = not page and urlsplit(self.path).path != "/app-config.js"
            super()._send(body, kind, page)

        def send_header(self, keyword: str, value: str) -> None:
            if keyword == "Cache-Control" and self.cacheable:
                value = "public, max-age=86400"
            super().send_header(keyword, value)

    class Viewer(ohif_support.ViewerServer):
        def __init__(self, gateway: str) -> None:  # noqa: B027 - the base's server, another handler
            self.point_at(gateway)
            self.httpd = http.server.ThreadingHTTPServer(
                ("127.0.0.1", 0), functools.partial(CachingHandler, self)
            )
            self.httpd.daemon_threads = True
            self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-bench", daemon=True)
            self.thread.start()

        def point_at(self, gateway: str) -> None:
            self.gateway = gateway
            self.config = ohif_support.app_config(gateway).encode()
            self.headers = ohif_support.page_headers(gateway)

    return Viewer


def run(bench: Bench, workdir: Path, logs: Path) -> None:
    """Start the gateway, store and derive the study, warm the viewer up, then one load per rate and case."""
    if not enabled():
        print("  browser rows: skipped (BENCH_BROWSER=0)")
        return
    rates, slices = _rates(), max(3, int(_number("BENCH_BROWSER_SLICES", 20)))
    timeout = max(10.0, _number("BENCH_BROWSER_TIMEOUT", 90))
    latency = max(0.0, _number("BENCH_BROWSER_LATENCY_MS", 20))
    results: dict[tuple[float, str], Cell] = {}
    problem = skip_reason()
    server = site = browser = viewer = None
    items = series(slices, 23)
    study = items[0].study_uid
    try:
        if problem is None:
            print(f"  browser: OHIF in chromium, {slices} CT slices at {rates} Mbit/s...", flush=True)
            server = start_gateway(workdir, logs, {"AUTH_MODE": "local"}, name="ours (browser)",
                                   log_name="gateway-browser")  # fmt: skip
            problem = server.error
        if problem is None:
            try:
                site = PolicySite(server, logs)
                problem = _prepare(site, items)
            except Exception as exc:  # noqa: BLE001 - the rows say why, the bench goes on
                traceback.print_exc()
                problem = f"setup: {type(exc).__name__}: {str(exc)[:200]}"
        if problem is None:
            assert site is not None
            try:
                browser, viewer = _warm_up(site, study)
            except Exception as exc:  # noqa: BLE001 - the rows say why, the bench goes on
                traceback.print_exc()
                problem = f"setup: {type(exc).__name__}: {str(exc)[:200]}"
        for mbps in rates:
            for label, role, groups in CASES:

                def how(mbps: float = mbps, role: str = role, groups: tuple[str, ...] = groups) -> Any:
                    assert site is not None and browser is not None and viewer is not None
                    return _load(site, browser, viewer, study, slices, role, groups, mbps, latency, timeout)

                results[(mbps, label)] = measured(problem, Local(), how)
    finally:
        if browser is not None:
            browser.close()
        if viewer is not None:
            viewer.stop()
        if site is not None:
            site.close()
        if server is not None:
            server.stop()
    for what, key in (("first image", None), ("whole series", "series_seconds")):
        for mbps in rates:
            for label, _role, _groups in CASES:
                result = results[(mbps, label)]
                served = result.detail.get("served", label)
                name = f"OHIF {slices}-slice CT {mbps:g} Mbit/s {what}: {served}"
                solo(bench.add, Row(name, "s", "lower", None), result if key is None else pick(result, key))


def _prepare(site: PolicySite, items: list[Any]) -> str | None:
    """STOW the series, derive its versions, register the home profile, mark the study read."""
    site.put_profile(f"group:{HOME_GROUP}", {"location": "home"})
    site.stow(items)
    derive_queued(site.conn)
    states = site.version_states(items[0].study_uid)
    if not states or any(counts.get("ready", 0) < len(items) for counts in states.values()):
        return f"derive left versions unmade: {states}"
    site.set_status(items[0].study_uid, 2)
    return None


def _warm_up(site: PolicySite, study: str) -> tuple[Browser, Any]:
    """Chromium started, the viewer opened once without a line: its files cached, the first-visit tour
    and banner closed for good (the viewer's origin keeps that in local storage)."""
    from tests.e2e.ohif_support import Browser

    viewer = _viewer_class()(site.server.base)
    browser = Browser.start()
    try:
        for role, groups in {(role, groups) for _label, role, groups in CASES}:
            # Each case once: OHIF loads its decoders (HTJ2K for the small version) on first use.
            token = site.auth(role, f"bench-browser-warm-{role}", groups)["Authorization"].split()[1]
            browser.open(f"{viewer.url}/viewer?StudyInstanceUIDs={study}&token={token}", [viewer.gateway])
            browser.dismiss_overlays(wait_ms=5000)
            painted = browser.call(
                "evaluate", expression=FIRST_IMAGE, arg={"timeoutMs": 60000}, timeout=90000
            )
            if painted is None:
                raise Failed(f"the unthrottled warm-up load ({role}) showed no image within 60 s")
            browser.dismiss_overlays(wait_ms=500)
    except BaseException:
        browser.close()
        viewer.stop()
        raise
    return browser, viewer


def _load(
    site: PolicySite,
    browser: Browser,
    viewer: Any,
    study: str,
    slices: int,
    role: str,
    groups: tuple[str, ...],
    mbps: float,
    latency: float,
    timeout: float,
) -> tuple[float, dict[str, Any]]:
    """One load of the study on a fresh line: (seconds to the first image, detail)."""
    from tests.e2e.throttle import Throttle

    # A subject per load: the policy decides afresh (its decision is kept per identity and study).
    token = site.auth(role, f"bench-browser-{role}-{mbps:g}", groups)["Authorization"].split()[1]
    with Throttle(("127.0.0.1", site.server.port), mbps=mbps, lifetime=timeout + 120) as line:
        viewer.point_at(line.url)
        browser.call("newPage", origins=[line.url])
        browser.call("emulateNetwork", mbps=mbps, latencyMs=latency)
        url = f"{viewer.url}/viewer?StudyInstanceUIDs={study}&token={token}"
        started = browser.call("timedGoto", url=url, timeout=int(timeout * 1000))["started"]
        shown = browser.call("evaluate", expression=FIRST_IMAGE, arg={"timeoutMs": int(timeout * 1000)},
                             timeout=int(timeout * 1000) + 5000)  # fmt: skip
        if shown is None:
            diagnostics = browser.call("diagnostics")
            raise Failed(f"no image within {timeout:g} s: {str(diagnostics['failedRequests'])[:200]}")
        first = (shown - started) / 1000
        deadline = started / 1000 + timeout
        done: dict[str, dict[str, Any]] = {}
        while True:
            for entry in browser.call("finished"):
                if "/frames/" in entry["url"]:
                    done[entry["url"].split("/frames/")[0]] = entry  # the last per instance
            if len(done) >= slices or time.time() > deadline:
                break
            time.sleep(0.25)
        responses = [r for r in browser.responses() if "/frames/" in r["url"]]
        browser.call("emulateNetwork", mbps=None)
        bytes_down = line.bytes_down
    if len(done) < slices:
        raise Failed(
            f"{len(done)} of {slices} slices loaded within {timeout:g} s (first image {first:.1f} s)"
        )
    served = sorted({r["headers"].get("x-served-version", "?") for r in responses})
    downlink = sorted({r["requestHeaders"].get("downlink", "-") for r in responses})
    frame_bytes = sum(entry.get("bytes") or 0 for entry in done.values())
    whole = (max(entry["t"] for entry in done.values()) - started) / 1000
    return first, {
        "served": "+".join(served),
        "series_seconds": round(whole, 2),
        "first_seconds": round(first, 2),
        "frame_requests": len(responses),
        "frame_bytes": frame_bytes,
        "proxy_bytes": bytes_down,
        "downlink_hint": downlink,
        "reason": sorted({r["headers"].get("x-policy-reason", "") for r in responses})[:3],
        "line_mbps": mbps,
        "latency_ms": latency,
        "ops": len(responses),
    }
