"""decide_for_retrieve: facts from the index (versions made by real derive jobs), the per-identity-per-study
decision cache in Redis, request parameters, Accept, and the client's decode capability."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydicom.uid import (
    HTJ2K,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)

from gateway import clienthints, diagnosis
from gateway.accept import Resource
from gateway.accept import parse as parse_accept
from gateway.auth import Identity
from gateway.decide import (
    RequestFacts,
    accepted_syntaxes,
    decide_for_retrieve,
    decision_key,
    request_facts,
    study_versions,
)
from gateway.errors import InvalidParameter
from policies.engine import Outcome
from policies.status import DiagnosisStatus
from tests.factories import make_ct
from tests.gateway.policy_support import Gateway, derive_all, gateway_fixture  # noqa: F401

S = DiagnosisStatus
REFERRING = Identity("ref-1", frozenset({"referring"}), authenticated=True)
TELE = Identity("tele-1", frozenset({"teleradiologist"}), authenticated=True)
RADIOLOGIST = Identity("rad-1", frozenset({"radiologist"}), authenticated=True)


@pytest.fixture
def study(gateway: Gateway) -> str:
    """Two 256 x 256 CT slices with every version derived."""
    study_uid = str(make_ct().StudyInstanceUID)
    gateway.stow(*(make_ct(study_uid=study_uid, rows=256, columns=256, InstanceNumber=i) for i in (1, 2)))
    derive_all(gateway.conn)
    return study_uid


def profile(
    gw: Gateway, who: Identity, headers: dict[str, str] | None = None, address: str = "203.0.113.9"
) -> Any:
    return clienthints.profile_for(gw.conn, who, headers or {}, address)


def test_study_facts_come_from_the_index(gateway: Gateway, study: str) -> None:
    held = study_versions(gateway.conn, study, gateway.conn.rules.versions)
    assert held.instances == 2 and held.unversioned == 0 and held.largest == (256, 256)
    assert held.original_syntaxes == {ExplicitVRLittleEndian}
    # native originals: their own size is the uncompressed size (pixels plus headers)
    assert held.uncompressed_size == held.original_size > 2 * 256 * 256 * 2
    assert all(held.tallies[v].ready == 2 for v in ("lossless", "q50", "q25")), held.tallies
    assert (
        held.tallies["q25"].ready_size < held.tallies["q50"].ready_size < held.tallies["lossless"].ready_size
    )


def test_the_decision_is_cached_per_identity_and_study(gateway: Gateway, study: str) -> None:
    diagnosis.set_status(gateway.conn, study, S.READ, "rad-1", "radiologist")
    first = decide_for_retrieve(gateway.conn, REFERRING, profile(gateway, REFERRING), study, RequestFacts())
    assert first.outcome is Outcome.SERVE and first.served == "q50" and len(first.trace) > 3
    again = decide_for_retrieve(gateway.conn, REFERRING, profile(gateway, REFERRING), study, RequestFacts())
    assert (again.served, again.reason) == (first.served, first.reason) and "cached" in again.trace[0]
    assert gateway.conn.redis.ttl(decision_key(study, REFERRING)) > 0
    other = decide_for_retrieve(gateway.conn, TELE, profile(gateway, TELE), study, RequestFacts())
    assert "cached" not in other.trace[0]  # another identity decides afresh


def test_a_status_change_invalidates_the_cached_decision(gateway: Gateway, study: str) -> None:
    diagnosis.set_status(gateway.conn, study, S.READ, "rad-1", "radiologist")
    assert decide_for_retrieve(gateway.conn, REFERRING, None, study, RequestFacts()).outcome is Outcome.SERVE
    diagnosis.set_status(gateway.conn, study, S.UNREAD, "rad-1", "radiologist")  # a correction
    decision = decide_for_retrieve(gateway.conn, REFERRING, None, study, RequestFacts())
    assert decision.outcome is Outcome.DENIED and "cached" not in decision.trace[0]


def test_one_version_per_viewer_load_even_when_accept_changes(gateway: Gateway, study: str) -> None:
    """The study retrieve picks a version; the frame requests that follow (other Accept) keep it."""
    diagnosis.set_status(gateway.conn, study, S.READ, "rad-1", "radiologist")
    # 1 kbit/s: even q25 (about 15 kB) misses the 60 s budget at home, so the smallest is sent
    slow = profile(gateway, TELE, {"Downlink": "0.001"})
    first = decide_for_retrieve(gateway.conn, TELE, slow, study, RequestFacts(accepted=("*",)))
    assert first.served == "q25" and "nothing fits" in first.reason
    fast = profile(gateway, TELE, {"Downlink": "1000"})
    frames = RequestFacts(accepted=(HTJ2KLosslessRPCL, HTJ2K, ExplicitVRLittleEndian))
    later = decide_for_retrieve(gateway.conn, TELE, fast, study, frames)
    assert later.served == "q25" and "moments ago" in later.reason
    explicit = decide_for_retrieve(gateway.conn, TELE, fast, study, RequestFacts(version="lossless"))
    assert explicit.served == "lossless"  # an explicit request is not bound by it


def test_versions_being_made_are_503_and_not_cached(gateway: Gateway) -> None:
    ds = make_ct()
    gateway.stow(ds)
    study_uid = str(ds.StudyInstanceUID)
    diagnosis.set_status(gateway.conn, study_uid, S.READ, "rad-1", "radiologist")
    pending = decide_for_retrieve(gateway.conn, REFERRING, None, study_uid, RequestFacts())
    assert pending.http_status == 503 and "pending" in pending.reason
    assert (
        decide_for_retrieve(gateway.conn, RADIOLOGIST, None, study_uid, RequestFacts()).served == "original"
    )
    derive_all(gateway.conn)
    assert decide_for_retrieve(gateway.conn, REFERRING, None, study_uid, RequestFacts()).served == "q50"


def test_sizes_and_syntaxes_follow_accept(gateway: Gateway, study: str) -> None:
    conn = gateway.conn
    as_stored = decide_for_retrieve(
        conn, RADIOLOGIST, None, study, RequestFacts(version="q50", accepted=("*",))
    )
    assert as_stored.delivered == "*"
    uncompressed = decide_for_retrieve(
        conn, RADIOLOGIST, None, study, RequestFacts(version="q50", accepted=(ExplicitVRLittleEndian,))
    )
    assert uncompressed.delivered == ExplicitVRLittleEndian
    # .202 bytes are valid .201 and .203 codestreams: sent as stored under the name asked for
    as_201 = decide_for_retrieve(
        conn, RADIOLOGIST, None, study, RequestFacts(version="lossless", accepted=(HTJ2KLossless,))
    )
    assert as_201.delivered == HTJ2KLossless
    refused = decide_for_retrieve(
        conn, RADIOLOGIST, None, study, RequestFacts(version="q50", accepted=(JPEGLosslessSV1,))
    )
    assert refused.http_status == 406 and "syntax" in refused.reason
    made = RequestFacts(version="q50", accepted=(JPEGBaseline8Bit,), producible=frozenset({JPEGBaseline8Bit}))
    assert decide_for_retrieve(conn, RADIOLOGIST, None, study, made).delivered == JPEGBaseline8Bit


def test_a_registered_decode_capability_limits_what_is_deliverable(gateway: Gateway, study: str) -> None:
    access = gateway.conn.rules.access
    body = clienthints.check_profile({"decode": [HTJ2KLosslessRPCL]}, access)
    clienthints.put_profile(gateway.conn, "user:rad-1", body, "admin")
    limited = profile(gateway, RADIOLOGIST)
    assert limited.decode == (HTJ2KLosslessRPCL,)
    decision = decide_for_retrieve(gateway.conn, RADIOLOGIST, limited, study, RequestFacts(accepted=("*",)))
    assert decision.served == "original"  # native pixels need no decoder
    q50 = decide_for_retrieve(
        gateway.conn, RADIOLOGIST, limited, study, RequestFacts(version="q50", accepted=("*",))
    )
    assert q50.http_status == 406  # .203 is not in what this client decodes


def test_the_original_location_decides_the_tie(gateway: Gateway, study: str) -> None:
    cold = RequestFacts(original_location="cold")
    assert decide_for_retrieve(gateway.conn, RADIOLOGIST, None, study, cold).served == "lossless"
    archived = RequestFacts(version="original", original_location="archive")
    decision = decide_for_retrieve(gateway.conn, RADIOLOGIST, None, study, archived)
    assert decision.served == "lossless" and decision.restore


def test_resolution_is_recomputed_for_a_cached_decision(gateway: Gateway, study: str) -> None:
    first = decide_for_retrieve(gateway.conn, RADIOLOGIST, None, study, RequestFacts(display=None))
    assert first.resolution is None
    small = dataclasses.replace(
        RequestFacts(), display=request_facts({"resolution": "64"}, gateway.conn.rules.versions).display
    )
    cached = decide_for_retrieve(gateway.conn, RADIOLOGIST, None, study, small)
    assert "cached" in cached.trace[0]
    assert cached.resolution is not None and (cached.resolution.level, cached.resolution.columns) == (2, 64)


@pytest.mark.parametrize(
    ("args", "parameter"),
    [
        ({"version": "q99"}, "version"),
        ({"quality": "0"}, "quality"),
        ({"quality": "high"}, "quality"),
        ({"purpose": "fun"}, "purpose"),
        ({"resolution": "big"}, "resolution"),
    ],
)
def test_bad_vendor_parameters_are_400s_naming_the_parameter(
    gateway: Gateway, args: dict[str, str], parameter: str
) -> None:
    with pytest.raises(InvalidParameter) as caught:
        request_facts(args, gateway.conn.rules.versions)
    assert caught.value.extra["parameter"] == parameter


def test_vendor_parameters(gateway: Gateway) -> None:
    facts = request_facts(
        {"version": "q25", "quality": "25", "purpose": "Comparison", "resolution": "800x600"},
        gateway.conn.rules.versions,
    )
    assert (facts.version, facts.quality, facts.purpose.value, str(facts.display)) == (
        "q25",
        25,
        "comparison",
        "800x600",
    )  # type: ignore[union-attr]
    rendered = request_facts({"quality": "90"}, gateway.conn.rules.versions, vendor_quality=False)
    assert rendered.quality is None  # /rendered keeps PS3.18's quality


@pytest.mark.parametrize(
    ("accept", "syntaxes"),
    [
        ('multipart/related; type="application/dicom"; transfer-syntax=*', ("*",)),
        ("multipart/related; type=application/dicom", (ExplicitVRLittleEndian,)),
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.203, */*;q=0.5',
         (HTJ2K, ExplicitVRLittleEndian)),
    ],
)  # fmt: skip
def test_accepted_syntaxes_from_an_accept_header(accept: str, syntaxes: tuple[str, ...]) -> None:
    assert accepted_syntaxes(parse_accept(accept, Resource.INSTANCES)) == syntaxes


def test_image_media_types_take_their_syntaxes() -> None:
    found = accepted_syntaxes(parse_accept('multipart/related; type="image/jphc"', Resource.FRAMES))
    assert set(found) == {HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}
    assert accepted_syntaxes(parse_accept("image/*", Resource.FRAMES)) == ("*",)


def test_the_same_facts_and_decisions_on_sqlite_and_postgresql(make_settings: Any, index_kind: str) -> None:
    from gateway.app import create_app
    from gateway.connections import Connections
    from tests.gateway.policy_support import stow

    conn = Connections(make_settings(index=index_kind))
    try:
        client = create_app(conn.settings, conn).test_client()
        study_uid = str(make_ct().StudyInstanceUID)
        stow(
            client,
            *(make_ct(study_uid=study_uid, rows=128, columns=128, InstanceNumber=i) for i in (1, 2, 3)),
        )
        derive_all(conn)
        held = study_versions(conn, study_uid, conn.rules.versions)
        assert held.instances == 3 and held.largest == (128, 128)
        assert all(held.tallies[v].ready == 3 for v in ("lossless", "q50", "q25"))
        for status in (S.READ, S.UNREAD, S.REPORTED):  # backwards and forwards through compare-and-set
            diagnosis.set_status(conn, study_uid, status, "rad-1", "radiologist")
        assert diagnosis.advance(conn, study_uid, S.NOTES, "auto", None, "test") is None  # never backwards
        assert [h["to"] for h in diagnosis.history(conn, study_uid)] == [2, 1, 5]
        decision = decide_for_retrieve(conn, REFERRING, None, study_uid, RequestFacts())
        assert decision.served == "q50"
    finally:
        conn.close()
