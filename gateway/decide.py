"""The policy decision for one retrieve: gathers the facts (diagnosis status, the versions the study
has, their sizes in the syntax the request would get, the client) and asks policies/engine.py.

The decision for an identity and a study is kept in Redis for access.yaml's decision_cache_seconds,
so the frame-by-frame requests of one viewer load get one version (DESIGN.md "Details settled");
a cache hit costs one Redis round trip. Redis down: the status comes from the index and nothing is
cached, never "allow everything". Core: no Flask (the WADO modules and api.py call in)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from pydicom.uid import (
    HTJ2K,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import BigInteger, and_, case, cast, func, select
from sqlalchemy.orm import aliased

from gateway import diagnosis, logs
from gateway.accept import ANY_SYNTAX, DEFAULT_SYNTAX, DICOM, IMAGE_TYPES, MediaRange
from gateway.connections import Connections
from gateway.errors import InvalidParameter
from gateway.index.db import session_scope
from gateway.index.models import Instance, Version
from policies.engine import Candidate, Client, Decision, Display, Facts, Outcome, Resolution, Wanted, choose
from policies.engine import covering_level as _covering
from policies.rules import Kind, Purpose, VersionRules
from policies.status import DiagnosisStatus

if TYPE_CHECKING:
    from gateway.auth import Identity
    from gateway.clienthints import ClientProfile

log = logging.getLogger(__name__)

UNCOMPRESSED = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
LOSSLESS_ONLY = frozenset(
    {
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000MCLossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        RLELossless,
    }
)
# A stored codestream that is also valid under another HTJ2K syntax (PS3.5 A.4.x: .202 is .201 with
# RPCL, and .203 admits any HTJ2K codestream), so it is sent as stored under that name.
SAME_BYTES = {
    HTJ2KLosslessRPCL: frozenset({HTJ2KLossless, HTJ2K}),
    HTJ2KLossless: frozenset({HTJ2K}),
}
DEFAULT_PRODUCIBLE = frozenset({ExplicitVRLittleEndian})


@dataclass(frozen=True)
class RequestFacts:
    """What the retrieve asks for. `accepted`: transfer syntaxes the client takes, best first ("*" =
    as stored; empty = no constraint). `producible`: syntaxes the WADO side can transcode into."""

    version: str | None = None
    quality: int | None = None
    purpose: Purpose | None = None
    display: Display | None = None
    accepted: tuple[str, ...] = ()
    producible: frozenset[str] = DEFAULT_PRODUCIBLE
    series_uid: str | None = None
    sop_uid: str | None = None
    # Where the originals are: "hot", "cold" (instant retrieval: loses the tie to lossless) or
    # "archive" (a restore first). The WADO side knows it from gateway/tiers.py.
    original_location: str = "hot"

    @property
    def wanted(self) -> Wanted:
        return Wanted(self.version, self.quality, self.purpose, self.display)


def request_facts(
    args: Mapping[str, str],
    versions: VersionRules,
    accepted: Iterable[str] = (),
    producible: Iterable[str] = DEFAULT_PRODUCIBLE,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    vendor_quality: bool = True,
) -> RequestFacts:
    """The vendor parameters of a WADO-RS request (version, quality, purpose, resolution), checked.

    vendor_quality=False on /rendered and /thumbnail, where `quality` keeps its PS3.18 meaning.

    Raises:
        InvalidParameter: naming the parameter and what it may be.
    """
    version = args.get("version") or None
    if version is not None and versions.by_id(version) is None:
        known = ", ".join(v.id for v in versions.versions)
        raise InvalidParameter(f"version {version[:40]!r} is not one of {known}", parameter="version")
    quality = None
    raw = args.get("quality") if vendor_quality else None
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise InvalidParameter(f"quality {raw[:20]!r} must be an integer 1..100", parameter="quality")
        quality = int(raw)
    purpose = None
    if args.get("purpose"):
        try:
            purpose = Purpose(args["purpose"].lower())
        except ValueError:
            names = ", ".join(p.value for p in Purpose)
            raise InvalidParameter(
                f"purpose {args['purpose'][:40]!r} is not one of {names}", parameter="purpose"
            ) from None
    display = None
    if args.get("resolution"):
        try:
            display = Display.parse(args["resolution"])
        except ValueError as exc:
            raise InvalidParameter(str(exc), parameter="resolution") from exc
    return RequestFacts(
        version, quality, purpose, display, tuple(accepted), frozenset(producible), series_uid, sop_uid
    )


def accepted_syntaxes(ranges: Sequence[MediaRange]) -> tuple[str, ...]:
    """The transfer syntaxes parsed Accept ranges take, best first ("*" = as stored)."""
    found: list[str] = []
    for wanted in ranges:
        if wanted.transfer_syntax == ANY_SYNTAX:
            found.append("*")
        elif wanted.transfer_syntax:
            found.append(wanted.transfer_syntax)
        elif wanted.media_type == "*/*":
            found.append(DEFAULT_SYNTAX[DICOM])
        elif wanted.is_wildcard:
            found.append("*")
        elif wanted.media_type in IMAGE_TYPES:
            found.extend(IMAGE_TYPES[wanted.media_type])
        else:
            found.append(DEFAULT_SYNTAX.get(wanted.media_type, ExplicitVRLittleEndian))
    return tuple(dict.fromkeys(found))


# --- what the study holds -----------------------------------------------------------------------------------


@dataclass
class Tally:
    ready: int = 0
    ready_size: int = 0
    skipped: int = 0
    pending: int = 0
    failed: int = 0
    substitute_size: int = 0
    reason: str | None = None


@dataclass(frozen=True)
class StudyVersions:
    """Sums over the study's image instances (those that get versions); other objects (SR, SEG...)
    are served as stored whatever the version, so their bytes count the same for every candidate."""

    instances: int
    unversioned: int
    unversioned_size: int
    original_size: int
    original_syntaxes: frozenset[str]
    uncompressed_size: int
    largest: tuple[int, int] | None
    tallies: dict[str, Tally]


def study_versions(conn: Connections, study_uid: str, versions: VersionRules) -> StudyVersions:
    """Three grouped index queries, whatever the size of the study."""
    derived = versions.derived
    marker = next((v.id for v in derived if v.kind is Kind.LOSSLESS), derived[0].id if derived else "")
    marker_row = aliased(Version)
    unversioned = case((func.coalesce(marker_row.state, "skipped") == "skipped", 1), else_=0)
    pixels = (
        cast(func.coalesce(Instance.rows, 0), BigInteger)
        * func.coalesce(Instance.columns, 0)
        * func.coalesce(Instance.number_of_frames, 1)
        * func.coalesce(Instance.bits_allocated, 8)
        / 8
    )
    first = (
        select(
            Instance.transfer_syntax_uid,
            unversioned.label("unversioned"),
            func.count(),
            func.sum(Instance.size),
            func.sum(pixels),
            func.max(Instance.columns),
            func.max(Instance.rows),
        )
        .outerjoin(marker_row, and_(marker_row.sop_uid == Instance.sop_uid, marker_row.version_id == marker))
        .where(Instance.study_uid == study_uid)
        .group_by(Instance.transfer_syntax_uid, unversioned)
    )
    second = (
        select(
            Version.version_id, Version.state, func.count(), func.sum(Version.size), func.max(Version.reason)
        )
        .where(Version.study_uid == study_uid)
        .group_by(Version.version_id, Version.state)
    )
    instances = unversioned_count = unversioned_size = original_size = uncompressed = 0
    syntaxes: set[str] = set()
    columns = rows = 0
    tallies: dict[str, Tally] = {v.id: Tally() for v in derived}
    with session_scope(conn.sessions) as session:
        for syntax, is_unversioned, count, size, raw, max_columns, max_rows in session.execute(first):
            if is_unversioned and derived:
                unversioned_count += count
                unversioned_size += int(size or 0)
                continue
            instances += count
            original_size += int(size or 0)
            syntaxes.add(syntax)
            uncompressed += int(size or 0) if syntax in UNCOMPRESSED else int(raw or 0)
            columns, rows = max(columns, max_columns or 0), max(rows, max_rows or 0)
        for version_id, state, count, size, reason in session.execute(second):
            tally = tallies.setdefault(version_id, Tally())
            if state == "ready":
                tally.ready, tally.ready_size = count, int(size or 0)
            elif state == "skipped":
                tally.skipped = count - unversioned_count
                tally.reason = reason
            elif state == "failed":
                tally.failed, tally.reason = count, reason
            else:
                tally.pending += count
        if any(t.skipped for t in tallies.values()):
            _substitute_sizes(session, study_uid, marker, tallies)
    return StudyVersions(
        instances,
        unversioned_count,
        unversioned_size,
        original_size,
        frozenset(syntaxes),
        uncompressed,
        (columns, rows) if columns and rows else None,
        tallies,
    )


def _substitute_sizes(session: Any, study_uid: str, marker: str, tallies: dict[str, Tally]) -> None:
    """Bytes of the lossless version where a lossy one was not made (lossless already beats it)."""
    skipped, marker_row = aliased(Version), aliased(Version)
    query = (
        select(skipped.version_id, func.sum(marker_row.size))
        .join(marker_row, and_(marker_row.sop_uid == skipped.sop_uid, marker_row.version_id == marker))
        .where(skipped.study_uid == study_uid, skipped.state == "skipped", marker_row.state == "ready")
        .group_by(skipped.version_id)
    )
    for version_id, size in session.execute(query):
        if version_id in tallies:
            tallies[version_id].substitute_size = int(size or 0)


def _carries(stored: str, wanted: str) -> bool:
    return stored == wanted or wanted in SAME_BYTES.get(stored, frozenset())


def _delivery(
    stored: frozenset[str],
    compressed_size: int,
    held: StudyVersions,
    lossless_size: int | None,
    request: RequestFacts,
    decode: frozenset[str],
) -> tuple[str | None, int]:
    """The syntax the request would get this version in, and the bytes that makes (an estimate when
    transcoded: uncompressed pixels, the lossless version's size, or the version's own size)."""

    def decodable(syntax: str) -> bool:
        return not decode or syntax in decode or syntax in UNCOMPRESSED

    for wanted in request.accepted or ("*",):
        if wanted == "*":
            if all(decodable(s) for s in stored):
                return "*", compressed_size
            continue
        if stored and all(_carries(s, wanted) for s in stored) and decodable(wanted):
            return wanted, compressed_size
        if wanted in request.producible and decodable(wanted):
            if wanted in UNCOMPRESSED:
                return wanted, held.uncompressed_size
            if wanted in LOSSLESS_ONLY:
                return wanted, lossless_size or held.uncompressed_size // 2
            return wanted, min(compressed_size, held.uncompressed_size) or held.uncompressed_size // 10
    return None, compressed_size


def candidates(
    versions: VersionRules, held: StudyVersions, request: RequestFacts, decode: frozenset[str] = frozenset()
) -> tuple[Candidate, ...]:
    """One Candidate per version of versions.yaml, sized for this study and request."""
    lossless = next((v.id for v in versions.derived if v.kind is Kind.LOSSLESS), None)
    lossless_tally = held.tallies.get(lossless) if lossless else None
    lossless_size = (
        lossless_tally.ready_size if lossless_tally and lossless_tally.ready == held.instances else None
    )
    found = []
    for spec in versions.versions:
        if spec.kind is Kind.ORIGINAL:
            syntax, size = _delivery(
                held.original_syntaxes, held.original_size, held, lossless_size, request, decode
            )
            total = size + held.unversioned_size
            found.append(
                Candidate(
                    spec.id,
                    spec.kind,
                    spec.quality,
                    spec.purpose,
                    total,
                    syntax,
                    location=request.original_location,
                    instances=held.instances,
                )
            )
            continue
        tally = held.tallies.get(spec.id, Tally())
        done = tally.ready + tally.skipped
        if done >= held.instances:
            state, note = "ready", (tally.reason or "") if tally.skipped else ""
        elif tally.pending:
            state, note = "pending", f"{tally.pending} of {held.instances} instances still being made"
        elif tally.failed:
            state, note = "failed", f"failed for {tally.failed} instances: {tally.reason or 'see /versions'}"
        else:
            state, note = "missing", f"not made for {held.instances - done} instances"
        stored = frozenset({spec.transfer_syntax or ""})
        if tally.skipped and lossless:
            stored |= {versions.by_id(lossless).transfer_syntax or ""}  # type: ignore[union-attr]
        own = tally.ready_size + tally.substitute_size
        syntax, size = _delivery(stored, own, held, lossless_size, request, decode)
        found.append(
            Candidate(
                spec.id,
                spec.kind,
                spec.quality,
                spec.purpose,
                size + held.unversioned_size,
                syntax,
                state=state,
                substituted=tally.skipped if tally.skipped > 0 else 0,
                instances=held.instances,
                substitute=lossless if tally.skipped > 0 else None,
                note=note,
            )
        )
    return tuple(found)


# --- the decision -------------------------------------------------------------------------------------------


def decision_key(study_uid: str, identity: Identity) -> str:
    roles = "+".join(sorted(identity.roles)) or "-"
    return f"gw:decision:{study_uid}:{roles}:{identity.subject}"


def _signature(request: RequestFacts, decode: frozenset[str]) -> str:
    said = [request.version, request.quality, request.purpose, request.accepted, sorted(request.producible),
            request.original_location]  # fmt: skip
    return "req:" + hashlib.blake2b(repr((said, sorted(decode))).encode(), digest_size=8).hexdigest()


def client_of(profile: ClientProfile | None, default_location: str, assumed_mbps: float) -> Client:
    if profile is None:
        return Client(location=default_location, assumed_mbps=assumed_mbps)
    return profile.engine_client()


def gather(
    conn: Connections,
    roles: frozenset[str],
    profile: ClientProfile | None,
    study_uid: str,
    request: RequestFacts,
    status: DiagnosisStatus,
    previous: str | None = None,
    held: StudyVersions | None = None,
) -> Facts:
    """The engine's facts for this study and request (index queries unless `held` is given; no cache)."""
    rules = conn.rules
    access, versions = rules.access, rules.versions
    held = held if held is not None else study_versions(conn, study_uid, versions)
    decode = frozenset(profile.decode) if profile is not None else frozenset()
    location = profile.location if profile is not None else access.default_location
    return Facts(
        roles=roles,
        status=status,
        candidates=candidates(versions, held, request, decode),
        wanted=request.wanted,
        client=client_of(profile, location, access.assumed(location)),
        image=held.largest,
        previous=previous,
    )


def resolution_for(
    request: RequestFacts, profile: ClientProfile | None, image: tuple[int, int] | None
) -> Resolution | None:
    """Step 4 again for a cached decision: the display may differ from request to request."""
    display, source = request.display, "request"
    if display is None and profile is not None:
        display, source = profile.display, "client"
    if display is None:
        return None
    if image is None:
        return Resolution(display, source, 0)
    level, columns, rows = _covering(image[0], image[1], display)
    return Resolution(display, source, level, columns, rows)


def decide_for_retrieve(
    conn: Connections,
    identity: Identity,
    profile: ClientProfile | None,
    study_uid: str,
    request: RequestFacts,
) -> Decision:
    """The version (and resolution) this retrieve gets; the same for every request of this identity
    and study while the cache entry lives, unless the status or the rules changed meanwhile.

    Raises:
        ObjectNotFound: no such study. IndexUnavailable: the index failed (Redis faults are absorbed).
    """
    rules = conn.rules
    access = rules.access
    generation = rules.generation
    decode = frozenset(profile.decode) if profile is not None else frozenset()
    key, field = decision_key(study_uid, identity), _signature(request, decode)
    raw_status = cached = sticky = None
    use_redis = access.decision_cache_seconds > 0
    try:
        with conn.redis.pipeline(transaction=False) as pipe:
            pipe.get(diagnosis.status_key(study_uid))
            pipe.hmget(key, field, "implicit")
            raw_status, (cached, sticky) = pipe.execute()
    except redis.RedisError as exc:
        log.warning("Redis down: deciding %s from the index, uncached (%s)", study_uid, type(exc).__name__)
        use_redis = False
    if raw_status is not None:
        status = DiagnosisStatus(int(raw_status))
    else:
        status = diagnosis.from_index(conn, study_uid)
        if use_redis:
            diagnosis.remember(conn, study_uid, status)
    stamp = [int(status), generation]
    if cached is not None:
        entry = json.loads(cached)
        if entry.get("stamp") == stamp:
            decision = _revive(entry, request, profile)
            if decision.outcome is not Outcome.SERVE:
                _audit(identity, study_uid, request, decision, cached=True)
            return decision
    previous = None
    if sticky is not None:
        remembered = json.loads(sticky)
        previous = remembered.get("version") if remembered.get("stamp") == stamp else None
    facts = gather(conn, identity.roles, profile, study_uid, request, status, previous)
    decision = choose(facts, access)
    _audit(identity, study_uid, request, decision, cached=False)
    if use_redis and decision.outcome is not Outcome.UNAVAILABLE:
        _remember(conn, key, field, decision, stamp, facts.image, access.decision_cache_seconds, request)
    return decision


def _compact(decision: Decision) -> dict[str, Any]:
    keep = ("outcome", "version", "reason", "served", "delivered", "seconds", "bandwidth_mbps",
            "budget_seconds", "restore")  # fmt: skip
    return {name: getattr(decision, name) for name in keep}


def _remember(
    conn: Connections,
    key: str,
    field: str,
    decision: Decision,
    stamp: list[Any],
    image: tuple[int, int] | None,
    ttl: int,
    request: RequestFacts,
) -> None:
    entry = {"stamp": stamp, "image": list(image) if image else None, "decision": _compact(decision)}
    try:
        with conn.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, field, json.dumps(entry))
            if decision.outcome is Outcome.SERVE and not request.wanted.explicit:
                pipe.hset(key, "implicit", json.dumps({"stamp": stamp, "version": decision.version}))
            pipe.expire(key, ttl)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("decision for %s not cached: %s", key, type(exc).__name__)


def _revive(entry: dict[str, Any], request: RequestFacts, profile: ClientProfile | None) -> Decision:
    data = entry["decision"]
    image = tuple(entry["image"]) if entry.get("image") else None
    return Decision(
        outcome=Outcome(data["outcome"]),
        version=data["version"],
        reason=data["reason"],
        trace=("the decision made for this identity and study moments ago (cached)",),
        resolution=resolution_for(request, profile, image),  # type: ignore[arg-type]
        served=data["served"],
        delivered=data["delivered"],
        seconds=data["seconds"],
        bandwidth_mbps=data["bandwidth_mbps"],
        budget_seconds=data["budget_seconds"],
        restore=data["restore"],
    )


def _audit(
    identity: Identity, study_uid: str, request: RequestFacts, decision: Decision, cached: bool
) -> None:
    """Fresh decisions and every refusal; a cached serve is audited by the retrieve that uses it."""
    logs.audit(
        "decision",
        identity.subject,
        identity.role,
        study=study_uid,
        series=request.series_uid,
        instance=request.sop_uid,
        version=decision.served,
        outcome=decision.outcome.value,
        why=decision.reason,
        cached=cached,
    )


def explain(
    conn: Connections,
    roles: frozenset[str],
    profile: ClientProfile | None,
    study_uid: str,
    request: RequestFacts,
    status: DiagnosisStatus | None = None,
    held: StudyVersions | None = None,
) -> Decision:
    """The full trace for a hypothetical request (GET /api/policy/explain): never cached."""
    status = status if status is not None else diagnosis.current(conn, study_uid)
    facts = gather(conn, roles, profile, study_uid, request, status, held=held)
    return choose(facts, conn.rules.access)


def hypothetical(
    versions: VersionRules, modality: str | None, size: int, columns: int = 512, rows: int = 512
) -> StudyVersions:
    """A study that is not stored, for explain: `size` bytes of uncompressed originals, lossless at
    about 1/2.5 and each lossy version at its target ratio for the modality (versions.yaml)."""
    instances = max(1, size // max(1, columns * rows * 2))
    tallies: dict[str, Tally] = {}
    for spec in versions.derived:
        ratio = 2.5 if spec.kind is Kind.LOSSLESS else versions.target_ratio(spec.id, modality)
        tallies[spec.id] = Tally(ready=instances, ready_size=int(size / ratio))
    return StudyVersions(
        instances, 0, 0, size, frozenset({ExplicitVRLittleEndian}), size, (columns, rows), tallies
    )
