"""Browser test support: the gateway on a real port, OHIF's ready-built viewer served from a second
origin with a generated app-config.js, headless Debian chromium driven through playwright-core
(tests/e2e/browser/driver.mjs, one JSON command per line), and pixel checks on screenshots.

Nothing intercepts requests: the browser talks to the gateway directly, CORS preflights included."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = REPO / "node_modules" / "@ohif" / "app" / "dist"
DRIVER = REPO / "tests" / "e2e" / "browser" / "driver.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts" / "ohif"
ENSURE = "bash scripts/ensure-browser-deps.sh"

# The Client Hints the gateway reads (gateway/clienthints.py), and their Permissions-Policy names.
CLIENT_HINTS = (
    "Downlink",
    "RTT",
    "ECT",
    "Save-Data",
    "Sec-CH-Device-Memory",
    "Sec-CH-Viewport-Width",
    "Sec-CH-DPR",
)
HINT_FEATURES = (
    "ch-downlink",
    "ch-rtt",
    "ch-ect",
    "ch-save-data",
    "ch-device-memory",
    "ch-viewport-width",
    "ch-dpr",
)


def skip_reason() -> str | None:
    """Why the browser tests cannot run at all (only a missing chromium or node counts)."""
    if not CHROMIUM.exists():
        return f"chromium is not installed at {CHROMIUM} and could not be installed (run {ENSURE} as root)"
    if shutil.which("node") is None:
        return "node (Node.js 20 or newer) is not installed, so playwright-core cannot drive chromium"
    return None


def require_node_modules() -> None:
    """node_modules is the project's own install step: its absence is a failure, not a skip."""
    missing = [
        p for p in (OHIF_DIST / "index.html", REPO / "node_modules" / "playwright-core") if not p.exists()
    ]
    if missing:
        pytest.fail(
            f"{', '.join(str(m) for m in missing)} missing: run {ENSURE} (npm ci from package-lock.json)"
        )


# --- app-config.js ---------------------------------------------------------------------------------------


def data_source(gateway: str, accept_header: str | None = None) -> dict[str, Any]:
    """OHIF's dicomweb data source for this gateway (the block the README shows)."""
    root = gateway.rstrip("/") + "/dicomweb"
    configuration: dict[str, Any] = {
        "friendlyName": "DICOMweb S3 gateway",
        "name": "gateway",
        "wadoUriRoot": root,
        "qidoRoot": root,
        "wadoRoot": root,
        "qidoSupportsIncludeField": True,
        "supportsReject": False,
        "supportsStow": True,
        "dicomUploadEnabled": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "thumbnail",
        "thumbnailRequestStrategy": "fetch",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": True,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video,pdf",
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
    }
    if accept_header:
        configuration["acceptHeader"] = [accept_header]
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "gateway",
        "configuration": configuration,
    }


def app_config(gateway: str, accept_header: str | None = None) -> str:
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "gateway",
        "dataSources": [data_source(gateway, accept_header)],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def page_headers(gateway: str) -> dict[str, str]:
    """Headers of the viewer's page: delegate Client Hints to the gateway's origin (a browser sends them
    cross-origin only then) and isolate the page (COOP/COEP), which the gateway's CORP header permits."""
    origin = _origin(gateway)
    return {
        "Accept-CH": ", ".join(CLIENT_HINTS),
        "Permissions-Policy": ", ".join(f'{name}=(self "{origin}")' for name in HINT_FEATURES),
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Embedder-Policy": "require-corp",
    }


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --- the viewer's origin ---------------------------------------------------------------------------------


class ViewerServer:
    """OHIF's dist/ on its own port (another origin than the gateway), app-config.js generated, every
    unknown path answered with index.html (OHIF routes in the browser)."""

    TYPES = {
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming insists on it
        ".json": "application/json",
        ".map": "application/json",
        ".css": "text/css",
        ".svg": "image/svg+xml",
        ".html": "text/html",
        ".woff2": "font/woff2",
        ".png": "image/png",
        ".ico": "image/x-icon",
    }

    def __init__(self, gateway: str, accept_header: str | None = None) -> None:
        self.gateway = gateway
        self.config = app_config(gateway, accept_header).encode()
        self.headers = page_headers(gateway)
        handler = functools.partial(_ViewerHandler, self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _ViewerHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, server_state: ViewerServer, *args: Any) -> None:
        self.state = server_state
        super().__init__(*args)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            self._send(self.state.config, "text/javascript")
            return
        target = (OHIF_DIST / path.lstrip("/")).resolve()
        if not str(target).startswith(str(OHIF_DIST.resolve())) or not target.is_file():
            target = OHIF_DIST / "index.html"
        kind = self.state.TYPES.get(target.suffix, "application/octet-stream")
        self._send(target.read_bytes(), kind, page=target.suffix == ".html")

    def _send(self, body: bytes, kind: str, page: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # Same-origin resources of an isolated page need no CORP; the page itself carries the policies.
        headers = self.state.headers if page else {
            k: v for k, v in self.state.headers.items() if k.startswith("Cross-Origin")
        }  # fmt: skip
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


# --- the gateway on a real port --------------------------------------------------------------------------


@contextlib.contextmanager
def serve_gateway(settings: Any, connections: Any = None, port: int = 0) -> Iterator[str]:
    """The real app (every blueprint, /rendered included even before app.py registers it) on `port`
    (0: a free one)."""
    from werkzeug.serving import make_server

    from gateway import rendered
    from gateway.app import create_app
    from gateway.connections import Connections

    own = None if connections is not None else Connections(settings)
    application = create_app(settings, connections or own)
    if "rendered" not in application.blueprints:
        application.register_blueprint(rendered.blueprint, url_prefix="/dicomweb")
    server = make_server("127.0.0.1", port, application, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="gateway", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        if own is not None:
            own.close()


def stow(gateway: str, files: list[Path | bytes], token: str | None = None) -> dict[str, Any]:
    """STOW-RS the files in one multipart request; every one must be stored."""
    from tests.factories import multipart_body

    body, content_type = multipart_body([f.read_bytes() if isinstance(f, Path) else f for f in files])
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = requests.post(f"{gateway}/dicomweb/studies", data=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# --- the browser -----------------------------------------------------------------------------------------


class DriverError(RuntimeError):
    pass


@dataclass
class Browser:
    """One chromium (fresh profile) behind the Node driver; call(cmd, **args) -> the driver's result."""

    process: subprocess.Popen[str]
    profile: Path
    log: list[str] = field(default_factory=list)
    _next: int = 0

    @classmethod
    def start(cls) -> Browser:
        profile = Path(tempfile.mkdtemp(prefix="ohif-chromium-"))
        process = subprocess.Popen(
            ["node", str(DRIVER)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        browser = cls(process, profile)
        threading.Thread(target=browser._drain, daemon=True).start()
        browser.call("launch", executablePath=str(CHROMIUM), userDataDir=str(profile), timeout=60000)
        return browser

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())

    def call(self, cmd: str, **args: Any) -> Any:
        """Run one driver command; `timeout` (ms) is the driver's, and the answer is awaited that long
        plus 30 s."""
        assert self.process.stdin is not None and self.process.stdout is not None
        timeout = float(args.get("timeout") or 30000) / 1000 + 30
        self._next += 1
        self.process.stdin.write(json.dumps({"id": self._next, "cmd": cmd, **args}) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = {}
        done = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            answer.update(json.loads(line) if line else {"ok": False, "error": "driver exited"})
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(timeout):
            raise DriverError(f"{cmd} did not answer within {timeout:.0f} s")
        if not answer.get("ok"):
            raise DriverError(f"{cmd} failed: {answer.get('error')}\n" + "\n".join(self.log[-20:]))
        return answer.get("result")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("close")
        with contextlib.suppress(Exception):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    # --- OHIF steps ---

    def open(self, url: str, origins: list[str], headers: dict[str, str] | None = None) -> None:
        self.call("newPage", origins=origins, extraHTTPHeaders=headers)
        self.call("goto", url=url, timeout=60000)

    OVERLAYS = (
        ("first-visit tour", ".shepherd-element button:has-text('Skip')"),
        ("first-visit tour", ".shepherd-cancel-icon"),
        ("investigational use banner", "[data-cy='confirm-and-hide-button']"),
    )

    def dismiss_overlays(self, wait_ms: int = 1500) -> list[str]:
        """Close OHIF's first-visit tour and its "investigational use" banner when they show: wait up to
        `wait_ms` for either, then close the tour first (its modal layer covers the banner)."""
        anything = ", ".join(selector for _name, selector in self.OVERLAYS)
        try:
            self.call("waitFor", selector=anything, timeout=wait_ms)
        except DriverError:
            return []
        closed: list[str] = []
        for _round in range(2):
            for name, selector in self.OVERLAYS:
                if self.call("clickIfVisible", selector=selector, timeout=300):
                    closed.append(name)
        return closed

    def responses(self, clear: bool = False) -> list[dict[str, Any]]:
        return list(self.call("responses", clear=clear))

    def screenshot(self, name: str, selector: str | None = None) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.call("screenshot", path=str(path), selector=selector)
        return path

    def wait_until(self, check: Any, what: str, timeout: float = 60.0, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
            time.sleep(every)


# --- pixels ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelStats:
    std: float
    distinct: int
    bright_fraction: float

    @property
    def blank(self) -> bool:
        return self.std < 8.0 or self.distinct < 32


def pixel_stats(png: Path | bytes, margin: int = 40) -> PixelStats:
    """How much image there is: grey-level spread and distinct values inside the margins (the overlay
    text sits in the corners of an OHIF viewport, so the centre is what counts)."""
    data = png.read_bytes() if isinstance(png, Path) else png
    image = Image.open(io.BytesIO(data)).convert("L")
    width, height = image.size
    inner = image.crop((margin, margin, max(margin + 1, width - margin), max(margin + 1, height - margin)))
    values = np.asarray(inner)
    return PixelStats(float(values.std()), int(len(np.unique(values))), float((values > 40).mean()))
