"""OHIF v3 (the npm package's ready-built viewer, unmodified) against the gateway in headless Debian
chromium: OHIF on one origin, the gateway on another, nothing in between (no proxy, no interception).

Proven with pixels, not only the absence of errors: the study list shows the stored studies with their
descriptions; opening a CT, MR, CR and multi-frame US study paints a non-blank viewport; a series served
as HTJ2K after the derive worker ran renders; a referring physician's token (AUTH_MODE=local) gets a lossy
version and it renders; a length measured in the viewer and saved as an SR comes back after a reload.
Screenshots go to test-artifacts/ohif/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from rq import Queue, SimpleWorker

from tests.e2e import ohif_support
from tests.e2e.ohif_support import Browser, PixelStats, ViewerServer, pixel_stats, serve_gateway, stow

pytestmark = pytest.mark.skipif(
    ohif_support.skip_reason() is not None, reason=str(ohif_support.skip_reason())
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K_ACCEPT = f"multipart/related; type=application/octet-stream; transfer-syntax={HTJ2K_RPCL}"
VIEWPORT = "[data-cy='viewport-pane']"
LOSSY = {"q50", "q25"}


@dataclass(frozen=True)
class Study:
    name: str
    files: tuple[str, ...]
    patient: str  # as OHIF shows the Patient Name ("Family, Given")
    description: str | None  # None: the data carries none

    @property
    def uid(self) -> str:
        return str(pydicom.dcmread(DATA / self.files[0], stop_before_pixels=True).StudyInstanceUID)

    def paths(self) -> list[Path]:
        return [DATA / name for name in self.files]


CT = Study("ct", tuple(f"ct_series_dcmqi/ct_0{i}.dcm" for i in (1, 2, 3)), "JANCT000", None)
MR = Study("mr", ("mr_ts/mr_explicit_le.dcm",), "stc_test", "Research^MCBI_TESTING")
CR = Study("cr", ("cr_rg2_nema_htj2k_rpcl.dcm",), "CompressedSamples, RG2", "HIP JOINT")
US = Study("us", ("us_palette_10frame_rle.dcm",), "Anonymized", "Echocardiogram")
SR = Study("sr", ("sr_tid1500_highdicom.dcm",), "CompressedSamples, CT1", "e+1")
STUDIES = (CT, MR, CR, US, SR)


@dataclass
class World:
    gateway: str
    viewer: ViewerServer
    browser: Browser
    conn: Any
    tokens: dict[str, str]

    def headers(self, role: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}

    def derive(self) -> None:
        """Run every queued derive job now, in this process (RQ's SimpleWorker)."""
        from gateway.jobs import DERIVE_QUEUE
        from workers import context

        context.configure(self.conn.settings, self.conn)
        SimpleWorker([Queue(DERIVE_QUEUE, connection=self.conn.redis)], connection=self.conn.redis).work(
            burst=True
        )


# --- fixtures: one gateway, one viewer origin, one browser per module ---------------------------------------


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own: other tests flush theirs between tests, this one lives on."""
    from tests.conftest import RedisProcess

    server = RedisProcess(tmp_path_factory.mktemp("ohif-redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


def _world(directory: Path, redis_url: str, auth: str, public_url: bool) -> Iterator[World]:
    from gateway.auth import mint_local_token
    from gateway.connections import Connections
    from gateway.settings import Settings
    from tests.conftest import free_port

    ohif_support.require_node_modules()
    port = free_port()
    env = {"DATA_DIR": str(directory), "REDIS_URL": redis_url, "STORAGE": "local", "AUTH_MODE": auth,
           "DATABASE_URL": f"sqlite:///{directory / 'index.sqlite3'}"}  # fmt: skip
    if public_url:
        env["PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    settings = Settings.from_env(env)
    conn = Connections(settings)
    tokens = {}
    if auth == "local":
        tokens = {role: mint_local_token(settings, [role]) for role in ("admin", "referring")}
    try:
        with serve_gateway(settings, conn, port) as gateway:
            viewer = ViewerServer(gateway)
            browser = Browser.start()
            try:
                yield World(gateway, viewer, browser, conn, tokens)
            finally:
                browser.close()
                viewer.stop()
    finally:
        from workers import context

        context.reset()  # derive() pointed the worker context at this world's connections
        conn.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, module_redis: str) -> Iterator[World]:
    """AUTH_MODE=none, URLs from the Host header; the five studies stored by STOW."""
    for found in _world(tmp_path_factory.mktemp("ohif-gateway"), module_redis, "none", public_url=False):
        for study in STUDIES:
            stow(found.gateway, study.paths())
        yield found


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, module_redis: str) -> Iterator[World]:
    """AUTH_MODE=local with PUBLIC_URL set; the CT stored by an admin and its versions derived. Its own
    Redis database: the same study lives in `world`, whose status, decisions and jobs must not leak here."""
    redis_url = module_redis.rsplit("/", 1)[0] + "/1"
    for found in _world(tmp_path_factory.mktemp("ohif-secured"), redis_url, "local", public_url=True):
        stow(found.gateway, CT.paths(), token=found.tokens["admin"])
        found.derive()
        yield found


# --- helpers ------------------------------------------------------------------------------------------------


def open_page(world: World, path: str, viewer: ViewerServer | None = None) -> None:
    world.browser.open((viewer or world.viewer).url + path, [world.gateway])
    world.browser.dismiss_overlays(wait_ms=2500)


def painted(world: World, name: str, timeout: float = 45.0) -> PixelStats:
    """Screenshots of the viewport until it shows an image (not one flat colour); the last is kept."""
    browser = world.browser
    browser.call("waitFor", selector=f"{VIEWPORT} canvas", timeout=int(timeout * 1000))
    deadline = time.monotonic() + timeout
    while True:
        browser.dismiss_overlays(wait_ms=100)
        stats = pixel_stats(browser.screenshot(name, VIEWPORT))
        if not stats.blank:
            browser.screenshot(f"{name}-page")
            return stats
        if time.monotonic() > deadline:
            browser.screenshot(f"{name}-page")
            diagnostics = browser.call("diagnostics")
            raise AssertionError(f"{name}: the viewport stayed blank ({stats}); {diagnostics}")
        time.sleep(1.0)


def gateway_responses(world: World, part: str) -> list[dict[str, Any]]:
    return [r for r in world.browser.responses() if part in r["url"]]


def frames_seen(world: World, study: Study) -> list[dict[str, Any]]:
    return [r for r in gateway_responses(world, f"/studies/{study.uid}/") if "/frames/" in r["url"]]


def assert_answered(world: World) -> None:
    """Every request the viewer made to the gateway so far on this page was answered with success."""
    failed = [(r["status"], r["method"], r["url"]) for r in world.browser.responses() if r["status"] >= 400]
    assert not failed, failed
    broken = world.browser.call("diagnostics")["failedRequests"]
    assert not broken, broken


def assert_cors(world: World, responses: list[dict[str, Any]]) -> None:
    """Every response the viewer's page read carried CORS for its origin and exposed the version."""
    assert responses
    for response in responses:
        headers = response["headers"]
        assert headers.get("access-control-allow-origin") == world.viewer.url, response["url"]
        assert "X-Served-Version" in headers.get("access-control-expose-headers", ""), response["url"]
        assert headers.get("cross-origin-resource-policy") == "cross-origin", response["url"]


# --- AUTH_MODE=none -----------------------------------------------------------------------------------------


def test_study_list_shows_the_stored_studies_with_their_descriptions(world: World) -> None:
    open_page(world, "/")
    browser = world.browser
    browser.call("waitFor", selector="text=JANCT000", timeout=30000)
    text = browser.call("evaluate", expression="() => document.body.innerText")
    browser.screenshot("study-list")
    for study in STUDIES:
        assert study.patient in text, f"{study.name} ({study.patient}) is not in the study list: {text!r}"
        if study.description:
            assert study.description in text, f"{study.name}'s description is missing: includefield ignored?"
    [qido] = [r for r in browser.responses() if "/dicomweb/studies?" in r["url"]][:1]
    assert "includefield=00081030%2C00080060%2C00080090%2C00100030" in qido["url"]
    assert "fuzzymatching=true" in qido["url"]
    assert qido["status"] == 200
    assert_cors(world, [qido])
    assert_answered(world)


@pytest.mark.parametrize("study", [CT, MR, CR, US], ids=lambda s: s.name)
def test_opening_a_study_paints_its_image(world: World, study: Study) -> None:
    open_page(world, f"/viewer?StudyInstanceUIDs={study.uid}")
    stats = painted(world, f"viewer-{study.name}")
    assert stats.bright_fraction > 0.02, stats
    frames = frames_seen(world, study)
    assert frames and all(r["status"] == 200 for r in frames), frames
    assert all(r["headers"].get("x-served-version") == "original" for r in frames)
    accept = frames[0]["requestHeaders"]["accept"]
    assert "multipart/related" in accept and "transfer-syntax=*" in accept, accept
    metadata = gateway_responses(world, f"/studies/{study.uid}/series/")
    assert any(r["url"].endswith("/metadata") and r["status"] == 200 for r in metadata)
    assert_cors(world, frames + metadata)
    assert_answered(world)


def test_thumbnails_come_from_the_gateway_and_client_hints_are_delegated(world: World) -> None:
    open_page(world, f"/viewer?StudyInstanceUIDs={CT.uid}")
    painted(world, "viewer-ct-thumbnail")
    thumbnails = world.browser.wait_until(
        lambda: [r for r in gateway_responses(world, CT.uid) if "/thumbnail" in r["url"]],
        "a thumbnail request",
    )
    assert thumbnails[0]["status"] == 200
    assert thumbnails[0]["headers"]["content-type"] == "image/jpeg"
    sent = {name.lower() for r in gateway_responses(world, CT.uid) for name in r["requestHeaders"]}
    delegated = {"sec-ch-viewport-width", "sec-ch-dpr", "downlink", "rtt", "ect"}
    assert delegated <= sent, f"Client Hints missing at the gateway's origin: {sorted(delegated - sent)}"


def test_cross_origin_fetches_read_errors_and_exposed_headers(world: World) -> None:
    open_page(world, "/")
    found = world.browser.call(
        "evaluate",
        expression="""async ({gateway, study}) => {
            const missing = await fetch(`${gateway}/dicomweb/studies/1.2.3.4/metadata`);
            const preflighted = await fetch(`${gateway}/dicomweb/studies/${study}/series`,
                {headers: {Authorization: 'Bearer unchecked', Accept: 'application/dicom+json'}});
            const meta = await fetch(`${gateway}/dicomweb/studies/${study}/metadata`);
            return {missing: missing.status, problem: (await missing.json()).title,
                    preflighted: preflighted.status, served: meta.headers.get('X-Served-Version')};
        }""",
        arg={"gateway": world.gateway, "study": CT.uid},
    )
    assert found["missing"] == 404 and found["problem"] and found["preflighted"] == 200, found
    assert found["served"], "X-Served-Version is not exposed to the page"


def test_a_measurement_saved_from_the_viewer_comes_back_after_a_reload(world: World) -> None:
    """Length tool on the CT, tracked, "Create SR", saved: OHIF STOWs a TID 1500 SR to the gateway."""
    browser = world.browser
    open_page(world, f"/viewer?StudyInstanceUIDs={CT.uid}")
    painted(world, "measure-before")
    box = browser.call("box", selector=VIEWPORT)
    browser.call("click", selector="[data-cy='MeasurementTools-split-button-primary']")
    x, y = box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5
    browser.call(
        "mouse", actions=[["move", x, y], ["down"], ["move", x + 150, y + 60, 10], ["up"], ["wait", 800]]
    )
    browser.call("click", selector="button:has-text('Yes')")  # "Track measurements for this series?"
    browser.call("click", selector="[data-cy='trackedMeasurements-btn']")
    browser.call("click", selector="button:has-text('Create SR')")
    browser.call("fill", selector="input[placeholder='Report name']", value="Gateway e2e report")
    browser.responses(clear=True)
    browser.call("click", selector="[role='dialog'] button:has-text('Save')")
    stored = browser.wait_until(
        lambda: [r for r in browser.responses() if r["method"] == "POST" and r["url"].endswith("/studies")],
        "OHIF's STOW of the SR",
    )
    assert stored[0]["status"] == 200
    browser.screenshot("measure-saved")
    # The next QIDO lists the SR in the same study; the study is now annotated (a TID 1500 SR).
    series = requests.get(f"{world.gateway}/dicomweb/studies/{CT.uid}/series", timeout=30).json()
    reports = [s for s in series if s["00080060"]["Value"] == ["SR"]]
    assert [s["0008103E"]["Value"][0] for s in reports] == ["Gateway e2e report"]
    status = requests.get(f"{world.gateway}/api/studies/{CT.uid}/diagnosis", timeout=30).json()
    assert status["name"] == "annotated", status
    # Reload: the report is in the study browser; opened, it draws the length again.
    open_page(world, f"/viewer?StudyInstanceUIDs={CT.uid}")
    browser.call("waitFor", selector="[data-cy='series-description-label']:has-text('Gateway e2e report')")
    browser.call(
        "evaluate",
        expression="""() => {
            const label = Array.from(document.querySelectorAll("[data-cy='series-description-label']"))
                .find(e => e.innerText.trim() === 'Gateway e2e report');
            label.dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));
            return true;
        }""",
    )
    browser.call("waitFor", selector=f"{VIEWPORT} >> text=/\\d+\\.\\d+ mm/", timeout=30000)
    painted(world, "measure-after-reload")
    metadata = [r for r in gateway_responses(world, CT.uid) if r["url"].endswith("/metadata")]
    assert len(metadata) >= 2, "the SR series' metadata was read from the gateway"
    assert_answered(world)


def test_a_series_served_as_htj2k_renders(world: World) -> None:
    """After the derive worker ran, a viewer that asks for HTJ2K RPCL gets the lossless version."""
    world.derive()
    htj2k_viewer = ViewerServer(world.gateway, accept_header=HTJ2K_ACCEPT)
    try:
        open_page(world, f"/viewer?StudyInstanceUIDs={MR.uid}", htj2k_viewer)
        stats = painted(world, "viewer-mr-htj2k")
    finally:
        htj2k_viewer.stop()
    assert stats.bright_fraction > 0.02
    frames = frames_seen(world, MR)
    assert frames and {r["headers"].get("x-served-version") for r in frames} == {"lossless"}, frames
    assert all(HTJ2K_RPCL in r["requestHeaders"]["accept"] for r in frames)
    assert_answered(world)


# --- AUTH_MODE=local ----------------------------------------------------------------------------------------


def test_a_referring_token_gets_a_lossy_version_that_still_renders(secured: World) -> None:
    admin = secured.headers("admin")
    made = requests.get(f"{secured.gateway}/api/studies/{CT.uid}/versions", headers=admin, timeout=30)
    assert made.status_code == 200 and "q50" in made.text, made.text
    answer = requests.put(
        f"{secured.gateway}/api/studies/{CT.uid}/diagnosis",
        json={"status": "read"},
        headers=admin,
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["name"] == "read", answer.text
    # OHIF takes a bearer token from the viewer URL (?token=) and sends it on every request.
    open_page(secured, f"/viewer?StudyInstanceUIDs={CT.uid}&token={secured.tokens['referring']}")
    stats = painted(secured, "viewer-ct-referring-lossy")
    assert stats.bright_fraction > 0.02
    frames = frames_seen(secured, CT)
    served = {r["headers"].get("x-served-version") for r in frames}
    assert frames and served <= LOSSY and served, f"the referring physician was served {served}"
    assert all(r["requestHeaders"].get("authorization", "").startswith("Bearer ") for r in frames)
    assert_cors(secured, frames)
    assert_answered(secured)
    metadata = [r for r in gateway_responses(secured, CT.uid) if r["url"].endswith("/metadata")]
    assert metadata and metadata[0]["headers"].get("x-served-version") in LOSSY
    # URLs in the metadata come from PUBLIC_URL.
    document = requests.get(metadata[0]["url"], headers=secured.headers("referring"), timeout=30).json()
    pixel = document[0]["7FE00010"]["BulkDataURI"]
    assert pixel.startswith(secured.gateway + "/dicomweb/studies/"), pixel


def test_without_a_token_the_page_reads_a_401(secured: World) -> None:
    open_page(secured, "/")
    found = secured.browser.call(
        "evaluate",
        expression="""async ({gateway, study, token}) => {
            const refused = await fetch(`${gateway}/dicomweb/studies?StudyInstanceUID=${study}`);
            const allowed = await fetch(`${gateway}/dicomweb/studies?StudyInstanceUID=${study}`,
                {headers: {Authorization: `Bearer ${token}`}});
            return {refused: refused.status, allowed: allowed.status, body: (await allowed.json()).length};
        }""",
        arg={"gateway": secured.gateway, "study": CT.uid, "token": secured.tokens["referring"]},
    )
    assert found == {"refused": 401, "allowed": 200, "body": 1}, found
