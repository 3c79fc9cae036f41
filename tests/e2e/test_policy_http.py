"""The policy over real HTTP: every role x status x version x explicit/implicit request, generated from the
written rules (policies/access.yaml, versions.yaml), and the bandwidth rules for slow and fast clients,
through a gateway served on loopback in AUTH_MODE=local with tokens minted for each role.

The expected outcome is read from the rules here (a role's versions and whether it follows the status
matrix; the budget of a role at a location; quality order), never from the engine, and each served
body is checked byte for byte: its SHA-256 against the index's versions table or the original sent.

One gateway (own redis-server, SQLite, local buckets) and one derived study per status serve the whole
module. The decision cache (per identity and study, DESIGN.md "Details settled") is handled by giving
each bandwidth case its own identity, and, where one client changes speed, by deleting its entry
(gateway.decide.decision_key) between the phases."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.encaps import generate_frames
from sqlalchemy import func, select

from gateway import clienthints, keys
from gateway.auth import Identity, mint_local_token
from gateway.connections import Connections
from gateway.decide import decision_key
from gateway.index.models import Instance, Version
from gateway.settings import Settings
from gateway.uids import InstanceRef, new_uid
from policies.rules import Kind, RulesStore
from policies.status import DiagnosisStatus
from tests.conftest import RedisProcess
from tests.e2e.throttle import Throttle
from tests.factories import make_ct, multipart_body, to_bytes
from tests.gateway.policy_support import derive_all
from tests.gateway.wado_support import parts

POLICIES = Path(__file__).resolve().parents[2] / "policies"
RULES = RulesStore(POLICIES)
ACCESS, VERSIONS = RULES.access, RULES.versions

ROLES = tuple(ACCESS.roles)
STATUSES = tuple(DiagnosisStatus)
VERSION_IDS = tuple(spec.id for spec in VERSIONS.versions)
REQUESTS = (None, *VERSION_IDS)  # None: implicit (the engine chooses)
DIAGNOSTIC = {spec.id for spec in VERSIONS.versions if spec.kind in (Kind.ORIGINAL, Kind.LOSSLESS)}
LOOPBACK = "127.0.0.1"

INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


# --- what the written rules say -----------------------------------------------------------------------------


def may_retrieve(role: str) -> bool:
    return any(action.value == "retrieve" for action in ACCESS.roles[role].may)


def may_receive(role: str, version_id: str, status: DiagnosisStatus) -> bool:
    """access.yaml: the role lists the version, and either ignores the matrix or the matrix sends it."""
    rule = ACCESS.roles[role]
    return version_id in rule.versions and (not rule.follows_matrix or status in ACCESS.matrix[version_id])


def best_first(ids: list[str]) -> list[str]:
    """Quality first; at equal quality the (hot) original, then lossless (DESIGN.md "Ties")."""
    tie = {Kind.ORIGINAL: 0, Kind.LOSSLESS: 1, Kind.LOSSY: 2}
    specs = {spec.id: spec for spec in VERSIONS.versions}
    return sorted(ids, key=lambda v: (-specs[v].quality, tie[specs[v].kind]))


def budget_of(role: str, location: str) -> float | None:
    table = ACCESS.budgets.get(role)
    if table is None:
        return None
    return table.get(location, table.get("default"))


def predicted(
    role: str,
    status: DiagnosisStatus,
    sizes: dict[str, int],
    location: str,
    mbps: float,
    rtt_ms: float = 0.0,
    frugal: bool = False,
) -> str | None:
    """The implicit choice the rules predict (DESIGN.md step 3), None for a refusal."""
    allowed = best_first([v for v in VERSION_IDS if may_receive(role, v, status)])
    if not allowed:
        return None
    budget = budget_of(role, location)
    if budget is None:
        return allowed[0]
    smallest = min(allowed, key=lambda v: sizes[v])
    if frugal:
        return smallest
    for version_id in allowed:
        if sizes[version_id] / (mbps * 1_000_000 / 8) + rtt_ms / 1000 <= budget:
            return version_id
    return smallest


def expected(role: str, status: DiagnosisStatus, asked: str | None, sizes: dict[str, int]) -> str | None:
    if not may_retrieve(role):
        return None
    if asked is not None:
        return asked if may_receive(role, asked, status) else None
    location = ACCESS.location_of(LOOPBACK)
    return predicted(role, status, sizes, location, ACCESS.assumed(location))


# --- one gateway for the module -----------------------------------------------------------------------------


@dataclass
class Study:
    uid: str
    ref: InstanceRef
    original: bytes
    sha256: dict[str, str] = field(default_factory=dict)  # version id -> SHA-256 of what is stored
    frame: dict[str, str] = field(default_factory=dict)  # version id -> SHA-256 of frame 1 as stored
    sizes: dict[str, int] = field(default_factory=dict)  # version id -> bytes of the whole study

    def instance_url(self, base: str) -> str:
        r = self.ref
        return f"{base}/dicomweb/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"


@dataclass
class Site:
    base: str
    settings: Settings
    conn: Connections
    http: requests.Session
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, role: str, subject: str | None = None, groups: tuple[str, ...] = ()) -> dict[str, str]:
        key = f"{role}|{subject}|{','.join(groups)}"
        if key not in self.tokens:
            self.tokens[key] = mint_local_token(self.settings, [role], subject or f"{role}-1", groups)
        return {"Authorization": f"Bearer {self.tokens[key]}"}

    def stow(self, datasets: list[bytes]) -> None:
        body, content_type = multipart_body(datasets)
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json", **self.auth("uploader")}
        answer = self.http.post(f"{self.base}/dicomweb/studies", data=body, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text[:500]

    def set_status(self, study_uid: str, status: DiagnosisStatus) -> None:
        answer = self.http.put(
            f"{self.base}/api/studies/{study_uid}/diagnosis",
            json={"status": int(status)},
            headers=self.auth("admin"),
            timeout=30,
        )
        assert answer.status_code == 200, answer.text[:500]
        assert answer.json()["status"] == int(status)

    def study_sizes(self, study_uid: str) -> dict[str, int]:
        """Bytes of the whole study in each version as stored (what transfer-syntax=* sends)."""
        with self.conn.sessions() as session:
            original = session.execute(
                select(func.sum(Instance.size)).where(Instance.study_uid == study_uid)
            ).scalar_one()
            rows = session.execute(
                select(Version.version_id, func.sum(Version.size), func.count())
                .where(Version.study_uid == study_uid, Version.state == "ready")
                .group_by(Version.version_id)
            ).all()
        sizes = {"original": int(original)}
        sizes.update({version_id: int(size) for version_id, size, _count in rows})
        return sizes


def serve(settings: Settings, conn: Connections) -> tuple[str, Any, threading.Thread]:
    """The real app on werkzeug's threaded server, as the live_server fixture does, for the module."""
    from werkzeug.serving import make_server

    from gateway.app import create_app

    server = make_server(LOOPBACK, 0, create_app(settings, conn), threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="policy-http", daemon=True)
    thread.start()
    return f"http://{LOOPBACK}:{server.server_port}", server, thread


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Own redis-server (others' fixtures flush the shared one per test), SQLite and local buckets."""
    folder = tmp_path_factory.mktemp("policy-http")
    redis_server = RedisProcess(folder / "redis").start()
    settings = Settings.from_env(
        {
            "DATA_DIR": str(folder / "data"),
            "REDIS_URL": redis_server.url,
            "DATABASE_URL": f"sqlite:///{folder / 'index.sqlite3'}",
            "AUTH_MODE": "local",
        }
    )
    conn = Connections(settings)
    base, server, thread = serve(settings, conn)
    session = requests.Session()
    try:
        yield Site(base, settings, conn, session)
    finally:
        session.close()
        server.shutdown()
        thread.join(10)
        server.server_close()
        conn.close()
        redis_server.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def moved(path: Path) -> tuple[bytes, InstanceRef]:
    """The real file under new UIDs, so each status gets a study of its own."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def first_frame(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    return bytes(ds.PixelData)


@pytest.fixture(scope="module")
def studies(site: Site, shared_data: Path) -> dict[DiagnosisStatus, Study]:
    """One real CT (NEMA CT1, 512 x 512) per status: stored by an uploader, derived, status set by admin."""
    made: dict[DiagnosisStatus, Study] = {}
    for status in STATUSES:
        data, ref = moved(shared_data / "ct1_nema_uncompressed.dcm")
        made[status] = Study(ref.study_uid, ref, data)
    site.stow([study.original for study in made.values()])
    derive_all(site.conn)
    for status, study in made.items():
        site.set_status(study.uid, status)
        study.sha256["original"] = sha(study.original)
        study.frame["original"] = sha(first_frame(study.original))
        with site.conn.sessions() as session:
            rows = (
                session.execute(select(Version).where(Version.sop_uid == study.ref.sop_uid)).scalars().all()
            )
        states = {row.version_id: row.state for row in rows}
        assert states == {spec.id: "ready" for spec in VERSIONS.derived}, states
        for row in rows:
            stored = site.conn.hot.get_bytes(keys.version(study.ref, row.version_id))
            assert sha(stored) == row.sha256
            study.sha256[row.version_id] = row.sha256
            study.frame[row.version_id] = sha(first_frame(stored))
        study.sizes = site.study_sizes(study.uid)
    return made


# --- the matrix ---------------------------------------------------------------------------------------------


def reason_of(answer: requests.Response) -> str:
    reason = answer.headers.get("X-Policy-Reason", "")
    assert reason.strip(), f"HTTP {answer.status_code} without X-Policy-Reason: {answer.text[:300]}"
    return reason


def check_refusal(answer: requests.Response, role: str, status: DiagnosisStatus, asked: str | None) -> None:
    assert answer.status_code == 403, (answer.status_code, answer.headers.get("X-Served-Version"))
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    detail = answer.json()["detail"]
    assert "X-Served-Version" not in answer.headers
    if not may_retrieve(role):
        assert f"{role} may not retrieve" in detail, detail
        return
    assert reason_of(answer) == detail
    refused = [asked] if asked else list(VERSION_IDS)
    for version_id in refused:  # each refused version is named, with why
        assert version_id in detail, detail
    listed = ACCESS.roles[role].versions
    if asked and asked not in listed:
        assert f"may not receive {asked}" in detail, detail
    elif asked:
        assert f"not sent at status {int(status)}" in detail, detail
    if status is DiagnosisStatus.UNREAD and any(v in listed for v in refused):
        assert "not read yet" in detail, detail


def matrix() -> Iterator[Any]:
    for role in ROLES:
        for status in STATUSES:
            for asked in REQUESTS:
                yield pytest.param(
                    role,
                    status,
                    asked,
                    id=f"{role}-{status.label}-{asked or 'implicit'}",
                )


@pytest.mark.parametrize(("role", "status", "asked"), list(matrix()))
def test_every_role_status_and_version(
    site: Site, studies: dict[DiagnosisStatus, Study], role: str, status: DiagnosisStatus, asked: str | None
) -> None:
    study = studies[status]
    want = expected(role, status, asked, study.sizes)
    params = {"version": asked} if asked else {}
    headers = site.auth(role)
    instance = site.http.get(
        study.instance_url(site.base),
        params=params,
        headers={**headers, "Accept": INSTANCE_ACCEPT},
        timeout=60,
    )
    frames = site.http.get(
        study.instance_url(site.base) + "/frames/1",
        params=params,
        headers={**headers, "Accept": FRAME_ACCEPT},
        timeout=60,
    )
    if want is None:
        check_refusal(instance, role, status, asked)
        check_refusal(frames, role, status, asked)
        for answer in (instance, frames):
            reason_of(answer)
        return
    for answer in (instance, frames):
        reason_of(answer)
    assert instance.status_code == 200, instance.text[:400]
    assert frames.status_code == 200, frames.text[:400]
    assert instance.headers["X-Served-Version"] == want, reason_of(instance)
    assert frames.headers["X-Served-Version"] == want, reason_of(frames)
    if role == "referring":
        assert want not in DIAGNOSTIC
    (part,) = parts(Adapter(instance))
    assert sha(part.body) == study.sha256[want], f"{role} got other bytes than the stored {want}"
    assert sha(frame_body(frames)) == study.frame[want], f"frame 1 is not the stored {want} frame"


class Adapter:
    """A requests.Response as wado_support.parts reads a Flask test response."""

    def __init__(self, response: requests.Response) -> None:
        self.headers = response.headers
        self._body = response.content

    def get_data(self) -> bytes:
        return self._body


def frame_body(answer: requests.Response) -> bytes:
    if answer.headers["Content-Type"].startswith("multipart/related"):
        (part,) = parts(Adapter(answer))
        return part.body
    return answer.content


def test_a_referring_physician_never_gets_diagnostic_versions_however_asked(
    site: Site, studies: dict[DiagnosisStatus, Study]
) -> None:
    """Other ways of naming a version (quality, purpose, an Accept syntax a version is stored in)."""
    attempts: list[tuple[dict[str, str], str]] = [
        ({"quality": "100"}, INSTANCE_ACCEPT),
        ({"purpose": "diagnosis"}, INSTANCE_ACCEPT),
        ({}, 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.202'),
        ({}, 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'),
    ]
    headers = site.auth("referring", "referring-other-ways")
    for status, study in studies.items():
        for params, accept in attempts:
            answer = site.http.get(
                study.instance_url(site.base),
                params=params,
                headers={**headers, "Accept": accept},
                timeout=60,
            )
            reason_of(answer)
            served = answer.headers.get("X-Served-Version")
            assert served not in DIAGNOSTIC, (status, params, accept, served)
            if answer.status_code == 200:
                (part,) = parts(Adapter(answer))
                assert sha(part.body) not in {study.sha256[v] for v in DIAGNOSTIC}
            else:
                assert answer.status_code in (403, 406), answer.text[:300]


def test_an_unread_study_tells_a_referring_physician_why(
    site: Site, studies: dict[DiagnosisStatus, Study]
) -> None:
    study = studies[DiagnosisStatus.UNREAD]
    answer = site.http.get(
        study.instance_url(site.base),
        headers={**site.auth("referring"), "Accept": INSTANCE_ACCEPT},
        timeout=60,
    )
    assert answer.status_code == 403
    detail = answer.json()["detail"]
    assert "not read yet" in detail and "status 1 (unread)" in detail, detail
    assert answer.headers["X-Policy-Reason"] == detail


def test_a_version_still_being_made_is_a_503_that_says_why(site: Site) -> None:
    """Stored, not derived yet: the original is there for a radiologist, a referring physician waits."""
    ds = make_ct(rows=128, columns=128)
    site.stow([to_bytes(ds)])
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    study = Study(ref.study_uid, ref, b"")
    site.set_status(study.uid, DiagnosisStatus.READ)
    url = study.instance_url(site.base)
    radiologist = site.http.get(
        url, headers={**site.auth("radiologist"), "Accept": INSTANCE_ACCEPT}, timeout=60
    )
    assert radiologist.status_code == 200 and radiologist.headers["X-Served-Version"] == "original"
    waiting = site.http.get(url, headers={**site.auth("referring"), "Accept": INSTANCE_ACCEPT}, timeout=60)
    assert waiting.status_code == 503 and waiting.headers.get("Retry-After")
    assert "pending" in waiting.json()["detail"]
    assert reason_of(waiting) == waiting.json()["detail"]


# --- bandwidth ----------------------------------------------------------------------------------------------

HOME_GROUP = "home-readers"
# Network Information API (WICG netinfo, "effective connection types"): the largest downlink of each type
ECT_MBPS = {"slow-2g": 0.05, "2g": 0.07, "3g": 0.7}
LINE_MBPS = 2.0


@dataclass
class Wide:
    """A study too big for a slow line: 24 instances of 1024 x 1024 16-bit noise (about 50 MB), so the
    diagnostic versions miss a 60 s budget on anything up to about 6 Mbit/s while q50 fits from 1 Mbit/s."""

    study: Study
    probe: Study  # one instance over 1 MB, for throughput measurements (another study: its own decisions)


def noise_ct(study_uid: str, series_uid: str, side: int, number: int) -> bytes:
    pixels = np.random.default_rng(number).integers(0, 65536, size=(side, side), dtype=np.uint16)
    ds = make_ct(study_uid, series_uid, rows=side, columns=side, InstanceNumber=number, BitsStored=16,
                 HighBit=15, PixelData=pixels.tobytes())  # fmt: skip
    return to_bytes(ds)


@pytest.fixture(scope="module")
def wide(site: Site) -> Wide:
    study_uid, series_uid = new_uid(), new_uid()
    datasets = [noise_ct(study_uid, series_uid, 1024, n) for n in range(1, 25)]
    probe_uid, probe_series = new_uid(), new_uid()
    probe = noise_ct(probe_uid, probe_series, 900, 99)  # 1.6 MB: over the 1 MB a measurement needs
    for start in range(0, len(datasets), 8):
        site.stow(datasets[start : start + 8])
    site.stow([probe])
    derive_all(site.conn)
    first = pydicom.dcmread(io.BytesIO(datasets[0]), stop_before_pixels=True)
    ref = InstanceRef(study_uid, series_uid, str(first.SOPInstanceUID))
    probe_ds = pydicom.dcmread(io.BytesIO(probe), stop_before_pixels=True)
    probe_ref = InstanceRef(probe_uid, probe_series, str(probe_ds.SOPInstanceUID))
    # a registered profile puts the group's readers at home (loopback is "hospital" in access.yaml)
    answer = site.http.put(
        f"{site.base}/api/profiles/group:{HOME_GROUP}", json={"location": "home"}, headers=site.auth("admin")
    )
    assert answer.status_code == 200, answer.text
    made = Wide(Study(study_uid, ref, datasets[0]), Study(probe_uid, probe_ref, probe))
    made.study.sizes = site.study_sizes(study_uid)
    assert set(made.study.sizes) == set(VERSION_IDS), made.study.sizes
    site.set_status(study_uid, DiagnosisStatus.READ)
    return made


def served_to(site: Site, url: str, headers: dict[str, str], params: dict[str, str] | None = None) -> str:
    answer = site.http.get(
        url, params=params or {}, headers={**headers, "Accept": INSTANCE_ACCEPT}, timeout=120
    )
    assert answer.status_code == 200, answer.text[:400]
    return str(answer.headers["X-Served-Version"])


def test_the_wide_study_separates_slow_from_fast(wide: Wide) -> None:
    """The premise of the bandwidth tests, from the sizes actually stored."""
    sizes, budget = wide.study.sizes, budget_of("teleradiologist", "home")
    assert budget is not None
    capacity = {mbps: budget * mbps * 1_000_000 / 8 for mbps in (1.0, 6.0)}
    assert min(sizes["original"], sizes["lossless"]) > capacity[6.0]
    assert sizes["q50"] < capacity[1.0]


@pytest.mark.parametrize(
    ("name", "hints", "at_home"),
    [
        ("fast downlink", {"Downlink": "100"}, True),
        ("2 Mbit/s downlink", {"Downlink": "2"}, True),
        ("2 Mbit/s with a 60 s RTT", {"Downlink": "2", "RTT": "60000"}, True),
        ("200 kbit/s downlink", {"Downlink": "0.2"}, True),
        ("ECT 2g", {"ECT": "2g"}, True),
        ("Save-Data on a fast line", {"Downlink": "100", "Save-Data": "on"}, True),
        ("low Device-Memory", {"Downlink": "100", "Sec-CH-Device-Memory": "0.5"}, True),
        ("no hints at home", {}, True),
        ("slow downlink in the hospital", {"Downlink": "0.2"}, False),
    ],
)
def test_client_hints_choose_the_version_the_rules_predict(
    site: Site, wide: Wide, name: str, hints: dict[str, str], at_home: bool
) -> None:
    """Each case is its own identity (a fresh subject): no decision cached, no throughput measured."""
    subject = "tele-hints-" + name.replace(" ", "-").replace("/", "")
    groups = (HOME_GROUP,) if at_home else ()
    headers = {**site.auth("teleradiologist", subject, groups), **hints}
    location = "home" if at_home else ACCESS.location_of(LOOPBACK)
    hinted = [v for v in (float(hints.get("Downlink", 0)), ECT_MBPS.get(hints.get("ECT", ""), 0)) if v]
    mbps = min(hinted) if hinted else ACCESS.assumed(location)
    memory = float(hints.get("Sec-CH-Device-Memory", "inf"))
    frugal = hints.get("Save-Data") == "on" or memory < ACCESS.low_memory_gb
    rtt = float(hints.get("RTT", 0))
    want = predicted("teleradiologist", DiagnosisStatus.READ, wide.study.sizes, location, mbps, rtt, frugal)
    assert served_to(site, wide.study.instance_url(site.base), headers) == want


def measured(site: Site, subject: str) -> float:
    value = clienthints.measured_mbps(site.conn.redis, f"sub:{subject}")
    assert value is not None, f"no throughput measured for {subject}"
    return value


def test_measured_throughput_through_a_slow_line_chooses_the_smaller_version(site: Site, wide: Wide) -> None:
    """A teleradiologist at home behind a 2 Mbit/s line (no hints): one >1 MB response through the
    throttling proxy teaches the gateway the line's speed; the next implicit decision for the wide
    study is the one the rules predict at that speed. Then the same client on a fast line: its cached
    decision is deleted (decision_key), and the next one is the diagnostic version."""
    subject = "tele-slow-line"
    headers = site.auth("teleradiologist", subject, (HOME_GROUP,))
    host, port = site.base.removeprefix("http://").split(":")
    with Throttle((host, int(port)), mbps=LINE_MBPS, lifetime=120) as line:
        slow = requests.Session()
        url = wide.probe.instance_url(line.url)
        answer = slow.get(url, params={"version": "original"}, headers={**headers, "Accept": INSTANCE_ACCEPT},
                          timeout=60)  # fmt: skip
        assert answer.status_code == 200 and len(answer.content) > 1_000_000
        mbps = measured(site, subject)
        # the line's rate, give or take what the socket buffers hide; far below home's assumed 10
        assert LINE_MBPS * 0.5 < mbps < LINE_MBPS * 3, mbps
        want = predicted("teleradiologist", DiagnosisStatus.READ, wide.study.sizes, "home", mbps)
        assert want == "q50"
        answer = slow.get(wide.study.instance_url(line.url), headers={**headers, "Accept": INSTANCE_ACCEPT},
                          timeout=60)  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["X-Served-Version"] == want, answer.headers["X-Policy-Reason"]
        (part,) = parts(Adapter(answer))
        assert sha(part.body) == site_version_sha(site, wide.study.ref, want)
        slow.close()
    # the same client on a fast line: two direct >1 MB responses lift its decaying average
    for _ in range(2):
        direct = site.http.get(wide.probe.instance_url(site.base), params={"version": "original"},
                               headers={**headers, "Accept": INSTANCE_ACCEPT}, timeout=60)  # fmt: skip
        assert direct.status_code == 200
    fast = measured(site, subject)
    assert fast > 50, fast
    identity = Identity(subject, frozenset({"teleradiologist"}), frozenset({HOME_GROUP}), authenticated=True)
    # still cached: one version per study for this viewer until the entry expires...
    assert served_to(site, wide.study.instance_url(site.base), headers) == "q50"
    site.conn.redis.delete(decision_key(wide.study.uid, identity))
    # ...and decided afresh once it is gone
    want = predicted("teleradiologist", DiagnosisStatus.READ, wide.study.sizes, "home", fast)
    assert want == "original"
    assert served_to(site, wide.study.instance_url(site.base), headers) == want


def test_a_fast_client_at_home_gets_the_original(site: Site, wide: Wide) -> None:
    subject = "tele-fast-line"
    headers = site.auth("teleradiologist", subject, (HOME_GROUP,))
    direct = site.http.get(wide.probe.instance_url(site.base), params={"version": "original"},
                           headers={**headers, "Accept": INSTANCE_ACCEPT}, timeout=60)  # fmt: skip
    assert direct.status_code == 200
    mbps = measured(site, subject)
    want = predicted("teleradiologist", DiagnosisStatus.READ, wide.study.sizes, "home", mbps)
    assert want == "original"
    assert served_to(site, wide.study.instance_url(site.base), headers) == want


def test_a_slow_client_reading_an_unread_study_gets_the_smallest_diagnostic_version(
    site: Site, wide: Wide
) -> None:
    """At unread a teleradiologist may have only original and lossless: on 2 Mbit/s neither fits the
    budget, so the smaller of the two (a new status: the cached decision does not apply)."""
    site.set_status(wide.study.uid, DiagnosisStatus.UNREAD)
    try:
        headers = {**site.auth("teleradiologist", "tele-unread", (HOME_GROUP,)), "Downlink": "2"}
        want = predicted("teleradiologist", DiagnosisStatus.UNREAD, wide.study.sizes, "home", 2.0)
        assert want in DIAGNOSTIC
        assert served_to(site, wide.study.instance_url(site.base), headers) == want
    finally:
        site.set_status(wide.study.uid, DiagnosisStatus.READ)


def site_version_sha(site: Site, ref: InstanceRef, version_id: str) -> str:
    with site.conn.sessions() as session:
        row = session.execute(
            select(Version.sha256).where(Version.sop_uid == ref.sop_uid, Version.version_id == version_id)
        ).scalar_one()
    return str(row)


def test_the_rules_file_is_the_one_the_gateway_uses(site: Site) -> None:
    """The matrix above is generated from the same files the served gateway loaded."""
    assert site.conn.rules.folder.resolve() == POLICIES.resolve()
    assert json.dumps(sorted(site.conn.rules.access.roles)) == json.dumps(sorted(ROLES))
