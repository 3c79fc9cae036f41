"""Client inputs: hints in both spellings, the client address behind trusted proxies only, measured
throughput (decaying, only from responses over 1 MB, per subject or address), registered profiles
(Redis copy rebuilt from the index; the index answers when Redis is down)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import clienthints
from gateway.auth import Identity
from gateway.clienthints import (
    Metered,
    client_address,
    measured_mbps,
    parse_hints,
    profile_for,
    record_throughput,
)
from gateway.connections import Connections
from gateway.errors import InvalidParameter

MB = 1_000_000
ALICE = Identity("alice", frozenset({"teleradiologist"}), frozenset({"night", "er-team"}), authenticated=True)


def test_hints_in_either_spelling() -> None:
    hints = parse_hints(
        {
            "Downlink": "1.55",
            "RTT": "150",
            "ECT": "3g",
            "Save-Data": "on",
            "Sec-CH-Device-Memory": "0.5",
            "Sec-CH-Viewport-Width": "1280",
            "Sec-CH-DPR": "2",
        }  # fmt: skip
    )
    assert hints == {
        "downlink": 1.55, "rtt": 150.0, "ect": "3g", "save_data": True, "device_memory": 0.5,
        "viewport_width": 1280, "dpr": 2.0,
    }  # fmt: skip
    legacy = parse_hints(
        {"Device-Memory": "8", "Viewport-Width": "800", "DPR": "1.5", "Sec-CH-Save-Data": "?1"}
    )
    assert (legacy["device_memory"], legacy["viewport_width"], legacy["dpr"], legacy["save_data"]) == (
        8.0,
        800,
        1.5,
        True,
    )


@given(
    st.dictionaries(
        st.sampled_from(["Downlink", "RTT", "ECT", "Save-Data", "DPR", "Viewport-Width"]), st.text()
    )
)
def test_garbage_hints_are_ignored_never_an_error(headers: dict[str, str]) -> None:
    hints = parse_hints(headers)
    assert hints["downlink"] is None or 0 < hints["downlink"] <= 100_000
    assert hints["ect"] in (None, "slow-2g", "2g", "3g", "4g")


def test_forwarded_headers_count_only_from_trusted_proxies() -> None:
    spoofed = {"X-Forwarded-For": "10.0.0.5"}
    assert client_address("203.0.113.9", spoofed, ()) == "203.0.113.9"
    assert client_address("203.0.113.9", spoofed, ("10.9.0.0/16",)) == "203.0.113.9"
    proxied = {"X-Forwarded-For": "10.0.0.5, 198.51.100.7, 10.9.0.2"}
    # the peer and the last hop are our proxies; the client is the right-most address that is not
    assert client_address("10.9.0.1", proxied, ("10.9.0.0/16",)) == "198.51.100.7"
    forwarded = {
        "Forwarded": 'for="[2001:db8::17]:4711";proto=https, for=10.9.0.3',
        "X-Forwarded-For": "1.2.3.4",
    }
    assert client_address("10.9.0.1", forwarded, ("10.9.0.0/16",)) == "2001:db8::17"
    assert client_address("10.9.0.1", {"Forwarded": "for=192.0.2.60:8080"}, ("10.9.0.1",)) == "192.0.2.60"
    # an unknown hop: what lies left of it may be forged, so the client is unknown
    assert client_address("10.9.0.1", {"Forwarded": "for=1.1.1.1, for=unknown"}, ("10.9.0.0/16",)) is None
    # only trusted hops: the left-most is the client (a request from inside the proxy network)
    assert client_address("10.9.0.1", {"X-Forwarded-For": "10.9.0.7"}, ("10.9.0.0/16",)) == "10.9.0.7"


def test_profile_location_from_the_address_behind_a_trusted_proxy(make_settings: Any) -> None:
    settings = make_settings(TRUSTED_PROXIES="127.0.0.1")
    conn = Connections(settings)
    try:
        anonymous = Identity("anonymous@127.0.0.1", frozenset({"referring"}))
        home = profile_for(conn, anonymous, {"X-Forwarded-For": "203.0.113.9"}, "127.0.0.1")
        assert (home.address, home.location, home.location_source) == ("203.0.113.9", "home", "default")
        assert home.key == "addr:203.0.113.9" and home.assumed_mbps == 10
        inside = profile_for(conn, anonymous, {"X-Forwarded-For": "10.1.2.3"}, "127.0.0.1")
        assert (inside.location, inside.location_source, inside.assumed_mbps) == ("hospital", "address", 100)
        spoof = profile_for(conn, anonymous, {"X-Forwarded-For": "10.1.2.3"}, "203.0.113.50")
        assert spoof.location == "home"
    finally:
        conn.close()


def test_display_and_downlink_from_hints(conn: Connections) -> None:
    profile = profile_for(
        conn, ALICE, {"Downlink": "10", "ECT": "3g", "Sec-CH-Viewport-Width": "1000", "DPR": "2"}, "10.0.0.1"
    )
    assert profile.downlink_mbps == 0.7  # the lower of Downlink and what 3g can carry
    assert profile.display is not None and profile.display.long_side == 2000
    assert profile.key == "sub:alice"  # a verified subject, not the address


def test_throughput_is_measured_only_from_responses_over_1_mb(conn: Connections) -> None:
    assert record_throughput(conn.redis, "sub:alice", MB - 1, 0.1) is None
    assert measured_mbps(conn.redis, "sub:alice") is None
    assert record_throughput(conn.redis, "sub:alice", 2 * MB, 1.0, now=1000.0) == pytest.approx(16.0)
    assert measured_mbps(conn.redis, "sub:alice") == pytest.approx(16.0)


def test_the_average_decays_toward_recent_measurements(conn: Connections) -> None:
    key = "addr:192.0.2.1"
    record_throughput(conn.redis, key, 10 * MB, 1.0, now=1000.0)  # 80 Mbit/s
    soon = record_throughput(conn.redis, key, 10 * MB, 10.0, now=1000.0)  # 8 Mbit/s right after
    assert soon == pytest.approx(0.7 * 80 + 0.3 * 8)
    later = record_throughput(conn.redis, key, 10 * MB, 10.0, now=1000.0 + 6000)  # ten half-lives later
    assert later == pytest.approx(8.0, rel=0.02)
    assert measured_mbps(conn.redis, "addr:192.0.2.2") is None  # per client


def test_a_metered_body_records_its_throughput(conn: Connections) -> None:
    def body() -> Any:
        for _ in range(4):
            time.sleep(0.05)
            yield b"x" * 500_000

    profile = profile_for(conn, ALICE, {}, "10.0.0.1")
    wrapped = clienthints.metered(body(), conn.redis, profile)
    assert b"".join(wrapped) == b"x" * 2_000_000
    wrapped.close()
    measured = measured_mbps(conn.redis, "sub:alice")
    # 2 MB in ~0.15 s (timed from the first chunk): about 100 Mbit/s, surely between 40 and 400
    assert measured is not None and 40 < measured < 400
    assert profile_for(conn, ALICE, {}, "10.0.0.1").measured_mbps == pytest.approx(measured)


def test_a_metered_body_closes_what_it_wraps() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Any:
            yield b"a"

        def close(self) -> None:
            closed.append(True)

    reports: list[tuple[int, float]] = []
    wrapped = Metered(Body(), lambda n, s: reports.append((n, s)))
    list(wrapped)
    wrapped.close()
    wrapped.close()
    assert closed == [True, True] and len(reports) == 1 and reports[0][0] == 1


# --- registered profiles ------------------------------------------------------------------------------------


def test_a_users_profile_wins_over_its_groups(conn: Connections) -> None:
    access = conn.rules.access
    clienthints.put_profile(
        conn, "group:er-team", clienthints.check_profile({"location": "er"}, access), "admin"
    )
    clienthints.put_profile(
        conn, "group:night", clienthints.check_profile({"display": "1024"}, access), "admin"
    )
    profile = profile_for(conn, ALICE, {}, "203.0.113.9")
    assert (profile.profile, profile.location, profile.location_source) == ("group:er-team", "er", "profile")
    own = {
        "display": "2560x1440",
        "downlink_mbps": 5,
        "decode": ["1.2.840.10008.1.2.4.202"],
        "save_data": True,
    }
    clienthints.put_profile(conn, "user:alice", clienthints.check_profile(own, access), "admin")
    profile = profile_for(conn, ALICE, {"Downlink": "50"}, "203.0.113.9")
    assert profile.profile == "user:alice" and profile.location == "home"
    assert profile.downlink_mbps == 5 and profile.save_data and profile.decode == ("1.2.840.10008.1.2.4.202",)
    assert profile.display is not None and (profile.display.columns, profile.display.rows) == (2560, 1440)


def test_profiles_survive_the_loss_of_redis(conn: Connections) -> None:
    access = conn.rules.access
    clienthints.put_profile(
        conn, "user:alice", clienthints.check_profile({"location": "er"}, access), "admin"
    )
    conn.redis.flushall()
    assert profile_for(conn, ALICE, {}, "203.0.113.9").location == "er"
    assert conn.redis.hexists(clienthints.PROFILES_KEY, "user:alice")  # the copy is back
    assert clienthints.delete_profile(conn, "user:alice")
    assert profile_for(conn, ALICE, {}, "203.0.113.9").location == "home"


def test_the_index_answers_when_redis_is_down(make_settings: Any, private_redis: Any) -> None:
    conn = Connections(make_settings(REDIS_URL=private_redis.url))
    try:
        access = conn.rules.access
        clienthints.put_profile(
            conn, "user:alice", clienthints.check_profile({"location": "er"}, access), "admin"
        )
        private_redis.stop()
        profile = profile_for(conn, ALICE, {}, "203.0.113.9")
        assert profile.location == "er" and profile.measured_mbps is None
        assert record_throughput(conn.redis, "sub:alice", 5 * MB, 1.0) is None  # logged, not raised
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"display": "big"}, "display"),
        ({"location": "moon"}, "location"),
        ({"downlink_mbps": -1}, "downlink_mbps"),
        ({"decode": "htj2k"}, "decode"),
        ({"save_data": "yes"}, "save_data"),
        ({"colour": "blue"}, "colour"),
        ([1, 2], "body"),
    ],
)
def test_bad_profiles_are_refused_naming_the_field(conn: Connections, body: Any, field: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        clienthints.check_profile(body, conn.rules.access)
    assert caught.value.extra.get("parameter") == field


@pytest.mark.parametrize(
    ("raw", "name"),
    [("alice", "user:alice"), ("user:bob@example.org", "user:bob@example.org"), ("group:ward 3", None)],
)
def test_profile_names(raw: str, name: str | None) -> None:
    if name is None:
        with pytest.raises(InvalidParameter):
            clienthints.profile_name(raw)
    else:
        assert clienthints.profile_name(raw) == name
