"""The policy engine against the written rules: the whole role x status x version x request matrix,
the property that it never picks a denied version, budgets, ties, 403 / 406 / 503, resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.access import AccessRules
from policies.engine import (
    Candidate,
    Client,
    Decision,
    Display,
    Facts,
    Outcome,
    Wanted,
    bandwidth,
    choose,
    covering_level,
    decomposition_levels,
    transfer_seconds,
)
from policies.rules import Kind, Purpose, RulesStore, VersionRules
from policies.status import DiagnosisStatus

POLICIES = Path(__file__).resolve().parents[2] / "policies"
STORE = RulesStore(POLICIES)
ACCESS: AccessRules = STORE.access
VERSIONS: VersionRules = STORE.versions
RAW = yaml.safe_load((POLICIES / "access.yaml").read_text())
NAMES = {s.label: s for s in DiagnosisStatus}
ROLES = list(RAW["roles"])
VERSION_IDS = [v.id for v in VERSIONS.versions]
MB = 1_000_000
SIZES = {"original": 100 * MB, "lossless": 50 * MB, "q50": 10 * MB, "q25": 5 * MB}


def written_allows(role: str, version: str, status: DiagnosisStatus) -> bool:
    """The rule as written in access.yaml, read independently of policies/access.py."""
    body = RAW["roles"][role]
    granted = VERSION_IDS if body["versions"] == "all" else body["versions"]
    if version not in granted:
        return False
    if body.get("matrix", "follow") == "ignore":
        return True
    return status in {NAMES[name] for name in RAW["matrix"][version]}


def candidates(**changes: dict[str, Any]) -> tuple[Candidate, ...]:
    out = []
    for spec in VERSIONS.versions:
        fields: dict[str, Any] = {"size": SIZES[spec.id], "delivered": "*", "instances": 10}
        fields.update(changes.get(spec.id, {}))
        out.append(Candidate(spec.id, spec.kind, spec.quality, spec.purpose, **fields))
    return tuple(out)


def decide(roles: set[str] | str, status: DiagnosisStatus, **kwargs: Any) -> Decision:
    roles = {roles} if isinstance(roles, str) else roles
    cands = kwargs.pop("cands", None) or candidates()
    return choose(Facts(frozenset(roles), status, cands, **kwargs), ACCESS)


# --- the whole matrix ---------------------------------------------------------------------------------------

MATRIX = [
    (role, status, version)
    for role in ROLES
    for status in DiagnosisStatus
    for version in VERSION_IDS
]  # fmt: skip


@pytest.mark.parametrize(("role", "status", "version"), MATRIX, ids=lambda v: getattr(v, "label", str(v)))
def test_explicit_request_matrix(role: str, status: DiagnosisStatus, version: str) -> None:
    decision = decide(role, status, wanted=Wanted(version=version))
    if written_allows(role, version, status):
        assert decision.outcome is Outcome.SERVE and decision.served == version, decision.reason
    else:
        assert decision.outcome is Outcome.DENIED and decision.http_status == 403
        assert version in decision.reason and decision.version is None


@pytest.mark.parametrize(("role", "status"), [(r, s) for r in ROLES for s in DiagnosisStatus])
def test_implicit_request_matrix(role: str, status: DiagnosisStatus) -> None:
    allowed = [v for v in VERSION_IDS if written_allows(role, v, status)]
    for location, mbps in (("hospital", 1000.0), ("home", 2.0), ("er", 0.2)):
        client = Client(location=location, downlink_mbps=mbps)
        decision = decide(role, status, client=client)
        if not allowed:
            assert decision.outcome is Outcome.DENIED and decision.reason
            continue
        assert decision.outcome is Outcome.SERVE and decision.served in allowed, decision.reason
        budget = ACCESS.budget({role}, location)
        if budget is None:  # no budget: the best allowed, and at equal quality the hot original
            assert decision.served == allowed[0]


@pytest.mark.parametrize("status", list(DiagnosisStatus))
@pytest.mark.parametrize("request_kind", ["implicit", *VERSION_IDS, "quality=100", "purpose=diagnosis"])
def test_referring_never_gets_original_or_lossless(status: DiagnosisStatus, request_kind: str) -> None:
    wanted = Wanted()
    if request_kind in VERSION_IDS:
        wanted = Wanted(version=request_kind)
    elif request_kind == "quality=100":
        wanted = Wanted(quality=100)
    elif request_kind == "purpose=diagnosis":
        wanted = Wanted(purpose=Purpose.DIAGNOSIS)
    decision = decide(
        "referring", status, wanted=wanted, client=Client(location="hospital", downlink_mbps=1e4)
    )
    assert decision.served not in ("original", "lossless") and decision.version not in (
        "original",
        "lossless",
    )


@pytest.mark.parametrize("status", list(DiagnosisStatus))
def test_uploader_gets_nothing(status: DiagnosisStatus) -> None:
    for wanted in (Wanted(), *(Wanted(version=v) for v in VERSION_IDS)):
        decision = decide("uploader", status, wanted=wanted)
        assert decision.outcome is Outcome.DENIED and decision.served is None


def test_unread_study_and_referring_physician_is_a_403_that_says_why() -> None:
    decision = decide("referring", DiagnosisStatus.UNREAD)
    assert decision.http_status == 403
    assert "unread" in decision.reason and "not read yet" in decision.reason
    assert "may not receive original, lossless" not in decision.reason or "q50" in decision.reason
    assert decision.trace[-1].startswith("decision: denied")


# --- the property -------------------------------------------------------------------------------------------

candidate_strategy = st.builds(
    lambda spec, size, delivered, state, location, substituted: Candidate(
        spec.id, spec.kind, spec.quality, spec.purpose, size, delivered, state,
        location if spec.kind is Kind.ORIGINAL else "hot", substituted,
        10, "lossless" if substituted and spec.kind is Kind.LOSSY else None,
    ),
    st.sampled_from(VERSIONS.versions),
    st.integers(0, 10**10),
    st.sampled_from(["*", "1.2.840.10008.1.2.1", None]),
    st.sampled_from(["ready", "ready", "pending", "failed", "missing"]),
    st.sampled_from(["hot", "cold", "archive"]),
    st.sampled_from([0, 0, 3, 10]),
)  # fmt: skip
facts_strategy = st.builds(
    Facts,
    roles=st.frozensets(st.sampled_from([*ROLES, "stranger"]), max_size=3),
    status=st.sampled_from(list(DiagnosisStatus)),
    candidates=st.lists(candidate_strategy, max_size=6, unique_by=lambda c: c.id).map(tuple),
    wanted=st.builds(
        Wanted,
        version=st.none() | st.sampled_from(VERSION_IDS),
        quality=st.none() | st.integers(1, 100),
        purpose=st.none() | st.sampled_from(list(Purpose)),
        display=st.none() | st.builds(Display, long_side=st.integers(1, 5000)),
    ),
    client=st.builds(
        Client,
        location=st.sampled_from(["hospital", "er", "home", "elsewhere"]),
        downlink_mbps=st.none() | st.floats(0.01, 10_000),
        measured_mbps=st.none() | st.floats(0.01, 10_000),
        rtt_ms=st.floats(0, 3000),
        save_data=st.booleans(),
        device_memory_gb=st.none() | st.sampled_from([0.25, 0.5, 1.0, 8.0]),
    ),
    image=st.none() | st.tuples(st.integers(1, 8000), st.integers(1, 8000)),
    previous=st.none() | st.sampled_from(VERSION_IDS),
)


@settings(max_examples=400, deadline=None)
@given(facts_strategy)
def test_the_engine_never_picks_a_denied_version(facts: Facts) -> None:
    decision = choose(facts, ACCESS)
    by_id = {c.id: c for c in facts.candidates}
    if decision.outcome is not Outcome.SERVE:
        assert decision.version is None and decision.served is None and decision.reason
        return
    chosen = by_id[decision.version]  # type: ignore[index]
    for version in {decision.version, decision.served}:
        assert any(written_allows(r, version, facts.status) for r in facts.roles if r in RAW["roles"]), (
            decision.trace
        )
    if chosen.substituted:
        assert any(
            written_allows(r, chosen.substitute, facts.status) for r in facts.roles if r in RAW["roles"]
        )
    assert chosen.delivered is not None and chosen.state == "ready" and chosen.location != "archive"
    assert decision.http_status == 200
    if facts.wanted.explicit and not decision.restore:
        assert facts.wanted.matches(chosen)


@settings(max_examples=200, deadline=None)
@given(facts_strategy)
def test_a_decision_survives_its_json_form(facts: Facts) -> None:
    decision = choose(facts, ACCESS)
    assert Decision.from_json(decision.to_json()) == decision


# --- budgets, ties and precedence ---------------------------------------------------------------------------


def test_teleradiologist_at_home_gets_the_best_that_fits_the_budget() -> None:
    # 60 s at home: lossless (50 MB) needs 200 s at 2 Mbit/s, q50 (10 MB) 40 s
    slow = decide("teleradiologist", DiagnosisStatus.READ, client=Client(location="home", downlink_mbps=2.0))
    assert slow.served == "q50" and "60 s budget" in slow.reason
    fast = decide("teleradiologist", DiagnosisStatus.READ, client=Client(location="home", downlink_mbps=50.0))
    assert fast.served == "original"  # 100 MB in 16 s; at equal quality the hot original wins
    hospital = decide(
        "teleradiologist", DiagnosisStatus.READ, client=Client(location="hospital", downlink_mbps=0.1)
    )
    assert hospital.served == "original" and hospital.budget_seconds is None


def test_nothing_fits_the_budget_sends_the_smallest() -> None:
    decision = decide("referring", DiagnosisStatus.READ, client=Client(location="er", downlink_mbps=0.1))
    assert decision.served == "q25" and "nothing fits" in decision.reason


def test_bandwidth_is_the_lower_of_hints_and_measured() -> None:
    assert bandwidth(Client(downlink_mbps=10.0, measured_mbps=2.0)) == (2.0, "measured")
    assert bandwidth(Client(downlink_mbps=1.5, measured_mbps=20.0)) == (1.5, "hints")
    assert bandwidth(Client(location="er", assumed_mbps=50.0)) == (50.0, "assumed at er")
    # hints say 10 Mbit/s (Chromium's cap) but the line measured 1: q25 for the teleradiologist
    decision = decide(
        "teleradiologist",
        DiagnosisStatus.READ,
        client=Client(location="home", downlink_mbps=10, measured_mbps=1),
    )
    assert decision.served == "q25" and decision.bandwidth_mbps == 1


def test_transfer_time_is_size_over_bandwidth_plus_rtt() -> None:
    assert transfer_seconds(10 * MB, 8.0, 100) == pytest.approx(10.1)
    decision = decide(
        "teleradiologist", DiagnosisStatus.READ, client=Client(location="home", downlink_mbps=4.0, rtt_ms=100)
    )
    # lossless: 50 MB at 4 Mbit/s = 100 s > 60 s; q50: 10 MB = 20 s + 0.1 s
    assert decision.served == "q50" and decision.seconds == pytest.approx(20.1)


def test_rtt_alone_can_break_the_budget() -> None:
    # q25 (5 MB) at 1000 Mbit/s takes 0.04 s, but a 25 s RTT makes every version miss the 20 s budget
    decision = decide(
        "referring", DiagnosisStatus.READ, client=Client(location="home", downlink_mbps=1000, rtt_ms=25000)
    )
    assert decision.served == "q25" and "nothing fits" in decision.reason


def test_sizes_are_those_of_the_delivered_syntax() -> None:
    # a client that takes only Explicit VR LE gets every version uncompressed: lossy saves nothing
    same = {v: {"size": 200 * MB, "delivered": "1.2.840.10008.1.2.1"} for v in VERSION_IDS}
    decision = decide("teleradiologist", DiagnosisStatus.READ, cands=candidates(**same),
                      client=Client(location="home", downlink_mbps=2.0))  # fmt: skip
    assert decision.served == "original" and "nothing fits" in decision.reason  # smallest tie: best quality


def test_save_data_and_low_memory_get_the_smallest_where_a_budget_applies() -> None:
    fast = Client(location="home", downlink_mbps=1000.0, save_data=True)
    assert decide("teleradiologist", DiagnosisStatus.READ, client=fast).served == "q25"
    small = Client(location="home", downlink_mbps=1000.0, device_memory_gb=0.5)
    assert decide("teleradiologist", DiagnosisStatus.READ, client=small).served == "q25"
    assert decide("radiologist", DiagnosisStatus.READ, client=fast).served == "original"  # no budget


def test_a_cold_original_loses_the_tie_to_lossless() -> None:
    cold = candidates(original={"location": "cold"})
    decision = decide("radiologist", DiagnosisStatus.UNREAD, cands=cold)
    assert decision.served == "lossless"
    only = tuple(c for c in cold if c.id != "lossless")
    assert decide("radiologist", DiagnosisStatus.UNREAD, cands=only).served == "original"


def test_an_archived_original_asked_by_name_gets_lossless_and_a_restore() -> None:
    archived = candidates(original={"location": "archive"})
    decision = decide(
        "radiologist", DiagnosisStatus.UNREAD, cands=archived, wanted=Wanted(version="original")
    )
    assert decision.served == "lossless" and decision.restore and "restored" in decision.reason
    # where lossless is not allowed (teleradiologist, reported study), the best version they may have
    decision = decide(
        "teleradiologist", DiagnosisStatus.REPORTED, cands=archived, wanted=Wanted(version="original")
    )
    assert decision.outcome is Outcome.DENIED  # the original itself is not sent at status reported
    decision = decide("admin", DiagnosisStatus.READ, cands=candidates(original={"location": "archive"},
                      lossless={"state": "pending"}), wanted=Wanted(version="original"))  # fmt: skip
    assert decision.served == "q50" and decision.restore


def test_policy_denial_is_403_and_no_syntax_is_406() -> None:
    nowhere = {v: {"delivered": None} for v in VERSION_IDS}
    decision = decide("referring", DiagnosisStatus.READ, cands=candidates(**nowhere))
    assert decision.http_status == 406 and "q50" in decision.reason and "syntax" in decision.reason
    decision = decide(
        "referring", DiagnosisStatus.READ, cands=candidates(**nowhere), wanted=Wanted(version="original")
    )
    assert decision.http_status == 403  # policy first: a syntax could not help
    partly = candidates(q50={"delivered": None})
    decision = decide("referring", DiagnosisStatus.READ, cands=partly, wanted=Wanted(version="q50"))
    assert decision.http_status == 406
    assert decide("referring", DiagnosisStatus.READ, cands=partly).served == "q25"


def test_versions_not_made_yet_are_503_not_denial() -> None:
    pending = candidates(q50={"state": "pending", "note": "3 of 10 instances still being made"},
                         q25={"state": "pending"})  # fmt: skip
    decision = decide("referring", DiagnosisStatus.READ, cands=pending)
    assert decision.http_status == 503 and "pending" in decision.reason and "retry" in decision.reason
    assert decide("radiologist", DiagnosisStatus.READ, cands=pending).served == "original"


def test_a_lossy_version_not_made_is_served_as_lossless_only_where_lossless_is_allowed() -> None:
    skipped = {"substituted": 10, "substitute": "lossless", "note": "lossless already reaches 1/12"}
    cands = candidates(q50=skipped, q25=skipped)
    tele = decide("teleradiologist", DiagnosisStatus.READ, cands=cands, wanted=Wanted(version="q50"))
    assert tele.version == "q50" and tele.served == "lossless" and "lossless already" in tele.reason
    referring = decide("referring", DiagnosisStatus.READ, cands=cands, wanted=Wanted(version="q50"))
    assert referring.http_status == 403 and "may not receive lossless" in referring.reason


def test_explicit_quality_and_purpose_choose_among_matching_versions() -> None:
    home = Client(location="home", downlink_mbps=2.0)
    assert (
        decide("teleradiologist", DiagnosisStatus.READ, wanted=Wanted(quality=50), client=home).served
        == "q50"
    )
    diag = decide(
        "teleradiologist", DiagnosisStatus.READ, wanted=Wanted(purpose=Purpose.DIAGNOSIS), client=home
    )
    assert diag.served == "lossless" and "nothing fits" in diag.reason  # the smaller of original and lossless
    assert (
        decide("referring", DiagnosisStatus.READ, wanted=Wanted(purpose=Purpose.COMPARISON)).served == "q25"
    )
    nothing = decide("radiologist", DiagnosisStatus.READ, wanted=Wanted(version="q50", quality=90))
    assert nothing.http_status == 406 and "matches" in nothing.reason


def test_the_previous_version_sticks_for_implicit_requests_only() -> None:
    slow = Client(location="home", downlink_mbps=0.5)
    assert decide("teleradiologist", DiagnosisStatus.READ, client=slow).served == "q25"
    sticky = decide("teleradiologist", DiagnosisStatus.READ, client=slow, previous="lossless")
    assert sticky.served == "lossless" and "moments ago" in sticky.reason
    explicit = decide("teleradiologist", DiagnosisStatus.READ, client=slow, previous="lossless",
                      wanted=Wanted(version="q50"))  # fmt: skip
    assert explicit.served == "q50"
    denied = decide("referring", DiagnosisStatus.READ, client=slow, previous="original")
    assert denied.served == "q25"  # a remembered version the rules deny is never reused


# --- resolution ---------------------------------------------------------------------------------------------


def test_decomposition_levels_reach_64_pixels() -> None:
    assert decomposition_levels(512, 512) == 3
    assert decomposition_levels(2140, 1760) == 6
    assert decomposition_levels(64, 64) == 0
    assert decomposition_levels(65, 10) == 1


@pytest.mark.parametrize(
    ("columns", "rows", "display", "expected"),
    [
        (2000, 2500, "1000", (1, 1000, 1250)),  # long side 1250 >= 1000; the next level (625) is too small
        (2000, 2500, "600x700", (1, 1000, 1250)),
        (2000, 2500, "500x625", (2, 500, 625)),
        (2000, 2500, "4000", (0, 2000, 2500)),  # a display larger than the image: full size
        (512, 512, "64", (3, 64, 64)),
        (512, 512, "65", (2, 128, 128)),
        (3062, 2394, "1920x1080", (0, 3062, 2394)),  # 1531 columns would not cover 1920
        (3062, 2394, "1500x1100", (1, 1531, 1197)),
    ],
)
def test_the_smallest_level_that_covers_the_display(
    columns: int, rows: int, display: str, expected: tuple[int, int, int]
) -> None:
    assert covering_level(columns, rows, Display.parse(display)) == expected


def test_resolution_comes_from_the_request_else_the_client() -> None:
    image = (2000, 2500)
    wanted = Wanted(display=Display.parse("500"))
    by_request = decide(
        "radiologist",
        DiagnosisStatus.READ,
        image=image,
        wanted=wanted,
        client=Client(display=Display.parse("2000")),
    )
    assert by_request.resolution is not None and by_request.resolution.source == "request"
    assert by_request.resolution.level == 2
    by_client = decide(
        "radiologist", DiagnosisStatus.READ, image=image, client=Client(display=Display.parse("1000"))
    )
    assert by_client.resolution is not None and (by_client.resolution.source, by_client.resolution.level) == (
        "client",
        1,
    )
    assert decide("radiologist", DiagnosisStatus.READ, image=image).resolution is None


@pytest.mark.parametrize("text", ["", "x", "0", "12x", "1x2x3", "-5", "1e3", "70000"])
def test_a_bad_resolution_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="resolution"):
        Display.parse(text)
