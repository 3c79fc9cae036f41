"""Client inputs -> ClientProfile: Client Hints, the network location of the client's address, the
throughput the gateway measured for it, and the profile an admin registered for the user or a group.

Browsers send Client Hints to a cross-origin gateway only when the viewer's page delegates them: the
page that serves the viewer answers with
    Accept-CH: Downlink, RTT, ECT, Save-Data, Sec-CH-Device-Memory, Sec-CH-Viewport-Width, Sec-CH-DPR
    Permissions-Policy: ch-downlink=(self "https://gateway.example"), ch-rtt=(self "https://gateway.example"),
      ch-ect=(...), ch-save-data=(...), ch-device-memory=(...), ch-viewport-width=(...), ch-dpr=(...)
(or the equivalent <meta http-equiv="Delegate-CH" content="sec-ch-downlink https://gateway.example; ...">),
and the gateway's CORS preflight allows those headers. Chromium caps Downlink at 10 Mbit/s, which is
why the throughput the gateway measured also counts.

No Flask: headers come in as a Mapping, so the WADO modules and api.py share one parser."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import delete, select

from gateway.connections import Connections
from gateway.errors import InvalidParameter
from gateway.index.db import session_scope
from gateway.index.models import ClientProfileRecord
from policies.engine import Client, Display

if TYPE_CHECKING:
    from gateway.auth import Identity
    from policies.access import AccessRules

log = logging.getLogger(__name__)

# Header names, each with its Sec-CH- form (browsers send one or the other).
HINTS: dict[str, tuple[str, ...]] = {
    "downlink": ("Downlink", "Sec-CH-Downlink"),
    "rtt": ("RTT", "Sec-CH-RTT"),
    "ect": ("ECT", "Sec-CH-ECT"),
    "save_data": ("Save-Data", "Sec-CH-Save-Data"),
    "device_memory": ("Sec-CH-Device-Memory", "Device-Memory"),
    "viewport_width": ("Sec-CH-Viewport-Width", "Viewport-Width"),
    "dpr": ("Sec-CH-DPR", "DPR"),
}
ACCEPT_CH = "Downlink, RTT, ECT, Save-Data, Sec-CH-Device-Memory, Sec-CH-Viewport-Width, Sec-CH-DPR"
# Network Information API: the ECT names the downlink ranges it was made from (upper bounds, Mbit/s).
ECT_MBPS = {"slow-2g": 0.05, "2g": 0.07, "3g": 0.7}

MEASURE_MIN_BYTES = 1_000_000  # DESIGN.md: throughput is taken only from responses over 1 MB
HALF_LIFE_SECONDS = 600.0  # an older average counts half as much after ten minutes
NEW_WEIGHT = 0.3
KEEP_SECONDS = 86400
PROFILES_KEY = "gw:profiles"
LOADED = "__loaded__"


def throughput_key(client_key: str) -> str:
    return f"gw:throughput:{client_key}"


@dataclass(frozen=True)
class ClientProfile:
    key: str  # whose throughput: "sub:NAME" (a verified token's subject) or "addr:IP"
    address: str | None
    location: str
    location_source: str  # "profile", "address" or "default"
    assumed_mbps: float
    downlink_mbps: float | None = None  # the lowest of Downlink, ECT and the registered profile's
    measured_mbps: float | None = None
    rtt_ms: float = 0.0
    ect: str | None = None
    save_data: bool = False
    device_memory_gb: float | None = None
    viewport_width: int | None = None
    dpr: float | None = None
    display: Display | None = None
    decode: tuple[str, ...] = ()
    profile: str | None = None  # the registered profile applied ("user:alice", "group:ward-3")
    hints: dict[str, str] = field(default_factory=dict)

    def engine_client(self) -> Client:
        return Client(
            location=self.location,
            downlink_mbps=self.downlink_mbps,
            measured_mbps=self.measured_mbps,
            assumed_mbps=self.assumed_mbps,
            rtt_ms=self.rtt_ms,
            save_data=self.save_data,
            device_memory_gb=self.device_memory_gb,
            display=self.display,
        )


# --- parsing ------------------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for spelling in HINTS[name]:
        value = headers.get(spelling)
        if value is not None and value.strip():
            return value.strip().strip('"')
    return None


def _number(text: str | None, low: float, high: float) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def parse_hints(headers: Mapping[str, str]) -> dict[str, Any]:
    """The hints a request carries; malformed or absurd values are ignored, never an error."""
    ect = (_header(headers, "ect") or "").lower() or None
    save = (_header(headers, "save_data") or "").lower()
    width = _number(_header(headers, "viewport_width"), 1, 1 << 16)
    return {
        "downlink": _number(_header(headers, "downlink"), 0.001, 100_000),
        "rtt": _number(_header(headers, "rtt"), 0, 60_000),
        "ect": ect if ect in (*ECT_MBPS, "4g") else None,
        "save_data": save in ("on", "?1", "1"),  # Save-Data: on; Sec-CH-Save-Data is a structured boolean
        "device_memory": _number(_header(headers, "device_memory"), 0.0, 4096),
        "viewport_width": int(width) if width else None,
        "dpr": _number(_header(headers, "dpr"), 0.1, 16),
    }


def _networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    found = []
    for entry in entries:
        try:
            found.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            log.warning("TRUSTED_PROXIES entry %r is not an address or CIDR range; ignored", entry)
    return found


def _address(token: str) -> str | None:
    """A Forwarded `for=` node or X-Forwarded-For item -> the bare address (RFC 7239 6), or None."""
    value = token.strip().strip('"')
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        value = value.split(":")[0]  # IPv4 with a port
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None  # "unknown", obfuscated identifiers


def _forwarded_chain(headers: Mapping[str, str]) -> list[str | None]:
    forwarded = headers.get("Forwarded")
    if forwarded:
        chain = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.strip().lower() == "for":
                    chain.append(_address(value))
        return chain
    return [_address(item) for item in (headers.get("X-Forwarded-For") or "").split(",") if item.strip()]


def client_address(
    remote_addr: str | None, headers: Mapping[str, str], trusted_proxies: Iterable[str]
) -> str | None:
    """The client's address: the peer, unless the peer is a trusted proxy; then the right-most address
    of Forwarded (RFC 7239) or X-Forwarded-For that is not itself a trusted proxy (None when a hop in
    between is "unknown": whatever lies left of it may be forged)."""
    trusted = _networks(trusted_proxies)

    def is_trusted(address: str | None) -> bool:
        if address is None:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in trusted)

    peer = _address(remote_addr or "") if remote_addr else None
    if not trusted or not is_trusted(peer):
        return peer
    chain = _forwarded_chain(headers)
    for address in reversed(chain):
        if address is None:
            return None  # an obfuscated or unknown hop: the client cannot be known
        if not is_trusted(address):
            return address
    return chain[0] if chain else peer


# --- measured throughput ------------------------------------------------------------------------------------

# Atomic read-decay-update of one client's average: the old value weighs less the older it is.
_RECORD = """
local now = tonumber(ARGV[1])
local sample = tonumber(ARGV[2])
local half = tonumber(ARGV[3])
local alpha = tonumber(ARGV[4])
local old = redis.call('HMGET', KEYS[1], 'mbps', 'at')
local value = sample
if old[1] and old[2] then
  local weight = (1 - alpha) * math.pow(0.5, math.max(0, now - tonumber(old[2])) / half)
  value = (weight * tonumber(old[1]) + alpha * sample) / (weight + alpha)
end
redis.call('HSET', KEYS[1], 'mbps', tostring(value), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return tostring(value)
"""


def record_throughput(
    connection: redis.Redis, client_key: str, nbytes: int, seconds: float, now: float | None = None
) -> float | None:
    """Fold one response into the client's decaying average (Mbit/s); responses up to 1 MB say too
    little about the line (slow start, buffers) and are ignored. Redis faults are logged, not raised."""
    if nbytes < MEASURE_MIN_BYTES or seconds <= 0:
        return None
    sample = nbytes * 8 / seconds / 1_000_000
    moment = time.time() if now is None else now
    try:
        value = connection.eval(
            _RECORD,
            1,
            throughput_key(client_key),
            moment,
            sample,
            HALF_LIFE_SECONDS,
            NEW_WEIGHT,
            KEEP_SECONDS,
        )
    except redis.RedisError as exc:
        log.warning("throughput of %s not recorded: %s", client_key, type(exc).__name__)
        return None
    return float(value)


def measured_mbps(connection: redis.Redis, client_key: str) -> float | None:
    try:
        value = connection.hget(throughput_key(client_key), "mbps")
    except redis.RedisError:
        return None
    return float(value) if value is not None else None


class Metered:
    """A WSGI response body that times itself from the first chunk to the end and reports the bytes
    and seconds when the server closes it (also after a client disconnect: still a measurement)."""

    def __init__(self, body: Iterable[bytes], report: Callable[[int, float], object]) -> None:
        self._body = body
        self._report = report
        self._bytes = 0
        self._started: float | None = None
        self._reported = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            if self._started is None:
                self._started = time.perf_counter()
            self._bytes += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if not self._reported and self._started is not None:
                self._reported = True
                self._report(self._bytes, time.perf_counter() - self._started)


def metered(body: Iterable[bytes], connection: redis.Redis, profile: ClientProfile) -> Metered:
    """Wrap a retrieve's body so its throughput feeds this client's measured average."""
    return Metered(body, lambda nbytes, seconds: record_throughput(connection, profile.key, nbytes, seconds))


# --- registered profiles ------------------------------------------------------------------------------------

_NAME = re.compile(r"^(user|group):[^\s\x00-\x1f]{1,250}$")
_FIELDS = {"display", "decode", "location", "downlink_mbps", "rtt_ms", "save_data", "note"}


def profile_name(raw: str) -> str:
    """ "user:NAME" or "group:NAME"; a bare name is a user.

    Raises:
        InvalidParameter: not such a name.
    """
    name = raw if raw.startswith(("user:", "group:")) else f"user:{raw}"
    if not _NAME.match(name):
        raise InvalidParameter(f"{raw[:60]!r} is not user:NAME or group:NAME", parameter="profile")
    return name


def check_profile(body: Any, access: AccessRules) -> dict[str, Any]:
    """A registered profile's fields, validated.

    Raises:
        InvalidParameter: naming the field.
    """
    if not isinstance(body, dict):
        raise InvalidParameter("a profile is a JSON object", parameter="body")
    unknown = set(body) - _FIELDS
    if unknown:
        raise InvalidParameter(
            f"unknown field(s) {', '.join(sorted(unknown))}; fields: {', '.join(sorted(_FIELDS))}",
            parameter=sorted(unknown)[0],
        )
    out: dict[str, Any] = {}
    if body.get("display") is not None:
        try:
            out["display"] = str(Display.parse(str(body["display"])))
        except ValueError as exc:
            raise InvalidParameter(str(exc).replace("resolution", "display"), parameter="display") from exc
    if body.get("decode") is not None:
        decode = body["decode"]
        if not isinstance(decode, list) or not all(
            isinstance(d, str) and re.fullmatch(r"[0-9.]{1,64}", d) for d in decode
        ):
            raise InvalidParameter("decode must be a list of transfer syntax UIDs", parameter="decode")
        out["decode"] = decode
    if body.get("location") is not None:
        if body["location"] not in access.location_names:
            known = ", ".join(access.location_names)
            raise InvalidParameter(
                f"location {body['location']!r} is not one of {known}", parameter="location"
            )
        out["location"] = body["location"]
    for name, high in (("downlink_mbps", 100_000), ("rtt_ms", 60_000)):
        if body.get(name) is not None:
            value = body[name]
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= high:
                raise InvalidParameter(f"{name} must be a number in (0, {high}]", parameter=name)
            out[name] = float(value)
    if body.get("save_data") is not None:
        if not isinstance(body["save_data"], bool):
            raise InvalidParameter("save_data must be true or false", parameter="save_data")
        out["save_data"] = body["save_data"]
    if body.get("note") is not None:
        out["note"] = str(body["note"])[:500]
    return out


def _load_profiles(conn: Connections) -> dict[str, dict[str, Any]]:
    with session_scope(conn.sessions) as session:
        rows = session.execute(select(ClientProfileRecord.name, ClientProfileRecord.body)).all()
    return {name: json.loads(body) for name, body in rows}


def _hot_copy(conn: Connections, profiles: dict[str, dict[str, Any]]) -> None:
    """Rebuild Redis's copy from the index in one transaction (after Redis lost it)."""
    try:
        with conn.redis.pipeline(transaction=True) as pipe:
            pipe.delete(PROFILES_KEY)
            pipe.hset(PROFILES_KEY, mapping={LOADED: "1", **{n: json.dumps(b) for n, b in profiles.items()}})
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("client profiles not copied to Redis: %s", type(exc).__name__)


def put_profile(conn: Connections, name: str, body: dict[str, Any], who: str) -> dict[str, Any]:
    """Index first (the truth), then the hot copy."""
    with session_scope(conn.sessions) as session:
        session.merge(ClientProfileRecord(name=name, body=json.dumps(body), updated_by=who[:256]))
    try:
        if conn.redis.hexists(PROFILES_KEY, LOADED):
            conn.redis.hset(PROFILES_KEY, name, json.dumps(body))
        else:
            _hot_copy(conn, _load_profiles(conn))
    except redis.RedisError as exc:
        log.warning("client profile %s not copied to Redis: %s", name, type(exc).__name__)
    return body


def delete_profile(conn: Connections, name: str) -> bool:
    with session_scope(conn.sessions) as session:
        gone = session.execute(delete(ClientProfileRecord).where(ClientProfileRecord.name == name)).rowcount
    try:
        conn.redis.hdel(PROFILES_KEY, name)
    except redis.RedisError as exc:
        log.warning("client profile %s not removed from Redis: %s", name, type(exc).__name__)
    return bool(gone)


def all_profiles(conn: Connections) -> dict[str, dict[str, Any]]:
    return _load_profiles(conn)


def registered_for(conn: Connections, identity: Identity) -> tuple[str, dict[str, Any]] | None:
    """The user's own profile, else the first of its groups' (by name)."""
    return _registered_and_measured(conn, identity, None)[0]


def _registered_and_measured(
    conn: Connections, identity: Identity, key: str | None
) -> tuple[tuple[str, dict[str, Any]] | None, float | None]:
    """One Redis round trip for both. When Redis lost the profiles they are copied back from the index;
    when Redis is down the index answers and nothing is measured."""
    names = [f"user:{identity.subject}", *(f"group:{g}" for g in sorted(identity.groups))]
    measured = None
    try:
        with conn.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(PROFILES_KEY, [LOADED, *names])
            if key is not None:
                pipe.hget(throughput_key(key), "mbps")
            replies = pipe.execute()
        values = replies[0]
        measured = float(replies[1]) if key is not None and replies[1] is not None else None
        if values[0] is None:
            profiles = _load_profiles(conn)
            _hot_copy(conn, profiles)
            values = [b"1", *(json.dumps(profiles[n]).encode() if n in profiles else None for n in names)]
    except redis.RedisError:
        profiles = _load_profiles(conn)
        values = [b"1", *(json.dumps(profiles[n]).encode() if n in profiles else None for n in names)]
    for name, raw in zip(names, values[1:], strict=True):
        if raw is not None:
            return (name, json.loads(raw)), measured
    return None, measured


# --- the profile --------------------------------------------------------------------------------------------


def client_key(identity: Identity, address: str | None) -> str:
    """Measured throughput belongs to the token's subject, else to the client address (DESIGN.md)."""
    return f"sub:{identity.subject}" if identity.authenticated else f"addr:{address or 'unknown'}"


def profile_for(
    conn: Connections, identity: Identity, headers: Mapping[str, str], remote_addr: str | None
) -> ClientProfile:
    """Everything the policy engine knows of the client of this request."""
    access = conn.rules.access
    address = client_address(remote_addr, headers, conn.settings.trusted_proxies)
    key = client_key(identity, address)
    hints = parse_hints(headers)
    registered, measured = _registered_and_measured(conn, identity, key)
    body = registered[1] if registered else {}
    if body.get("location"):
        location, source = body["location"], "profile"
    else:
        location = access.location_of(address)
        source = "default" if location == access.default_location and address else "address"
    downlinks = [
        v for v in (hints["downlink"], ECT_MBPS.get(hints["ect"] or ""), body.get("downlink_mbps")) if v
    ]
    display = None
    if hints["viewport_width"]:
        display = Display(long_side=round(hints["viewport_width"] * (hints["dpr"] or 1.0)))
    elif body.get("display"):
        display = Display.parse(body["display"])
    rtt = hints["rtt"] if hints["rtt"] is not None else body.get("rtt_ms", 0.0)
    return ClientProfile(
        key=key,
        address=address,
        location=location,
        location_source=source,
        assumed_mbps=access.assumed(location),
        downlink_mbps=min(downlinks) if downlinks else None,
        measured_mbps=measured,
        rtt_ms=float(rtt or 0.0),
        ect=hints["ect"],
        save_data=bool(hints["save_data"] or body.get("save_data")),
        device_memory_gb=hints["device_memory"],
        viewport_width=hints["viewport_width"],
        dpr=hints["dpr"],
        display=display,
        decode=tuple(body.get("decode") or ()),
        profile=registered[0] if registered else None,
        hints={k: str(v) for k, v in hints.items() if v not in (None, False)},
    )
