"""Choosing the version and resolution for a retrieve (DESIGN.md "Choosing the version", steps 1-5).

Pure: facts in, a Decision out; no Redis, SQL or Flask. gateway/decide.py gathers the facts (status,
the versions the study has and their sizes in the syntax the request would get, the client's
bandwidth and display) for the whole study, so a study, series or frame retrieve of one viewer load
all get one version (step 5)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from policies.access import AccessRules
from policies.rules import Kind, Purpose
from policies.status import DiagnosisStatus

MEGABIT = 1_000_000 / 8  # bytes per second in one Mbit/s
SMALLEST_LEVEL = 64  # PS3.5 A.4.7 (HTJ2K RPCL): the lowest resolution level is at most 64 px


class Outcome(StrEnum):
    SERVE = "serve"
    DENIED = "denied"  # 403: the rules allow nothing that matches
    NOT_ACCEPTABLE = "not_acceptable"  # 406: allowed versions exist, no accepted syntax carries them
    UNAVAILABLE = "unavailable"  # 503: allowed and deliverable, but not made yet (Retry-After)


HTTP_STATUS = {Outcome.SERVE: 200, Outcome.DENIED: 403, Outcome.NOT_ACCEPTABLE: 406, Outcome.UNAVAILABLE: 503}


@dataclass(frozen=True)
class Display:
    """The client's display in device pixels: columns x rows, or only the long side."""

    columns: int | None = None
    rows: int | None = None
    long_side: int | None = None

    @classmethod
    def parse(cls, text: str) -> Display:
        """'2000' (long side) or '2000x1500' (columns x rows), as the `resolution` parameter.

        Raises:
            ValueError: not one or two positive integers.
        """
        parts = text.strip().lower().split("x")
        if len(parts) > 2 or not all(p.isdigit() and 0 < int(p) <= 1 << 16 for p in parts):
            raise ValueError(f"resolution {text[:40]!r} must be N or NxM (positive pixel counts)")
        if len(parts) == 1:
            return cls(long_side=int(parts[0]))
        return cls(columns=int(parts[0]), rows=int(parts[1]))

    def covered_by(self, columns: int, rows: int) -> bool:
        if self.long_side is not None:
            return max(columns, rows) >= self.long_side
        return columns >= (self.columns or 0) and rows >= (self.rows or 0)

    def __str__(self) -> str:
        return str(self.long_side) if self.long_side is not None else f"{self.columns}x{self.rows}"


@dataclass(frozen=True)
class Resolution:
    display: Display
    source: str  # "request" (resolution=) or "client" (hints, profile)
    level: int  # 0 = full size; k = each side divided by 2**k (rounded up)
    columns: int | None = None
    rows: int | None = None


def decomposition_levels(columns: int, rows: int) -> int:
    """Levels an HTJ2K version has: enough for the smallest to be at most 64 px (DESIGN.md)."""
    side = max(columns, rows, 1)
    return max(0, math.ceil(math.log2(side / SMALLEST_LEVEL))) if side > SMALLEST_LEVEL else 0


def covering_level(
    columns: int, rows: int, display: Display, levels: int | None = None
) -> tuple[int, int, int]:
    """(level, columns, rows) of the smallest resolution level that still covers the display (step 4)."""
    top = decomposition_levels(columns, rows) if levels is None else levels
    for level in range(top, 0, -1):
        scaled = (-(-columns // (1 << level)), -(-rows // (1 << level)))
        if display.covered_by(*scaled):
            return level, scaled[0], scaled[1]
    return 0, columns, rows


@dataclass(frozen=True)
class Candidate:
    """One version of the study as the request would get it; sizes are for the whole study."""

    id: str
    kind: Kind
    quality: int
    purpose: Purpose
    size: int  # estimated bytes in the delivered syntax
    delivered: str | None  # transfer syntax UID, "*" (as stored), or None: no accepted syntax carries it
    state: str = "ready"  # ready | pending | failed | missing
    location: str = "hot"  # hot | cold (instant) | archive (restore first): the original only
    substituted: int = 0  # instances served by `substitute` because this version was not made for them
    instances: int = 0  # instances this version covers (0: unknown)
    substitute: str | None = None
    note: str = ""  # why not ready, or why substituted


@dataclass(frozen=True)
class Client:
    location: str = "home"
    downlink_mbps: float | None = None  # lowest hint (Downlink, ECT, a registered profile)
    measured_mbps: float | None = None  # decaying average of what the gateway measured
    assumed_mbps: float = 10.0  # when neither is known (the location's, access.yaml)
    rtt_ms: float = 0.0
    save_data: bool = False
    device_memory_gb: float | None = None
    display: Display | None = None


@dataclass(frozen=True)
class Wanted:
    """What the request names (vendor parameters); all None = an implicit request."""

    version: str | None = None
    quality: int | None = None  # minimum
    purpose: Purpose | None = None
    display: Display | None = None  # resolution=

    @property
    def explicit(self) -> bool:
        return self.version is not None or self.quality is not None or self.purpose is not None

    def matches(self, candidate: Candidate) -> bool:
        return (
            (self.version is None or candidate.id == self.version)
            and (self.quality is None or candidate.quality >= self.quality)
            and (self.purpose is None or candidate.purpose is self.purpose)
        )

    def __str__(self) -> str:
        said = [f"version={self.version}"] if self.version else []
        said += [f"quality>={self.quality}"] if self.quality is not None else []
        said += [f"purpose={self.purpose.value}"] if self.purpose else []
        return ", ".join(said) or "nothing in particular"


@dataclass(frozen=True)
class Facts:
    roles: frozenset[str]
    status: DiagnosisStatus
    candidates: tuple[Candidate, ...]
    wanted: Wanted = field(default_factory=Wanted)
    client: Client = field(default_factory=Client)
    image: tuple[int, int] | None = None  # (columns, rows) of the study's largest image
    previous: str | None = None  # the version this identity got for this study moments ago


@dataclass(frozen=True)
class Verdict:
    """Everything the engine concluded about one candidate, for the trace and /api/policy/explain."""

    id: str
    requested: bool
    allowed: bool
    why_not: str
    deliverable: bool
    delivered: str | None
    available: bool
    size: int
    seconds: float


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    version: str | None  # the version chosen (None unless outcome is SERVE)
    reason: str
    trace: tuple[str, ...] = ()
    resolution: Resolution | None = None
    served: str | None = None  # what X-Served-Version says: the version, or its substitute
    delivered: str | None = None  # transfer syntax ("*": as stored)
    seconds: float | None = None  # estimated transfer time of the chosen version
    bandwidth_mbps: float | None = None
    budget_seconds: float | None = None
    restore: bool = False  # an archived original was wanted: the caller starts its restore
    verdicts: tuple[Verdict, ...] = ()

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.outcome]

    @property
    def denied(self) -> bool:
        return self.outcome is Outcome.DENIED

    @property
    def not_acceptable(self) -> bool:
        return self.outcome is Outcome.NOT_ACCEPTABLE

    @property
    def unavailable(self) -> bool:
        return self.outcome is Outcome.UNAVAILABLE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        resolution = data.get("resolution")
        if resolution is not None:
            resolution = Resolution(**{**resolution, "display": Display(**resolution["display"])})
        return cls(
            **{
                **data,
                "outcome": Outcome(data["outcome"]),
                "trace": tuple(data.get("trace") or ()),
                "resolution": resolution,
                "verdicts": tuple(Verdict(**v) for v in data.get("verdicts") or ()),
            }
        )


def bandwidth(client: Client) -> tuple[float, str]:
    """Mbit/s and where it came from: the lower of the hints and the measured throughput (DESIGN.md)."""
    known = [
        (v, name) for v, name in ((client.downlink_mbps, "hints"), (client.measured_mbps, "measured")) if v
    ]
    if known:
        return min(known)
    return client.assumed_mbps, f"assumed at {client.location}"


def transfer_seconds(size: int, mbps: float, rtt_ms: float) -> float:
    """Estimated transfer time: size in the delivered syntax / bandwidth + RTT (DESIGN.md)."""
    return size / (max(mbps, 0.001) * MEGABIT) + rtt_ms / 1000.0


def _why_not_allowed(
    rules: AccessRules, roles: frozenset[str], candidate: Candidate, status: DiagnosisStatus
) -> str:
    granted = [r for r in roles if r in rules.roles and candidate.id in rules.roles[r].versions]
    if not granted:
        return f"role {_names(roles)} may not receive {candidate.id}"
    return f"{candidate.id} is not sent at status {status.label}"


def _names(roles: frozenset[str]) -> str:
    return ", ".join(sorted(roles)) or "none"


def _order_key(verdict: Verdict, candidate: Candidate) -> tuple[int, int, int]:
    """Best first: quality; at equal quality a hot original, then lossless, then the rest (DESIGN.md)."""
    if candidate.kind is Kind.ORIGINAL and candidate.location == "hot":
        tie = 0
    elif candidate.kind is Kind.LOSSLESS:
        tie = 1
    elif candidate.kind is Kind.ORIGINAL:
        tie = 2
    else:
        tie = 3
    return (-candidate.quality, tie, verdict.size)


def choose(facts: Facts, rules: AccessRules) -> Decision:
    """Steps 1-4 for one identity and study; never returns a version the rules deny."""
    roles, status, client = facts.roles, facts.status, facts.client
    mbps, mbps_source = bandwidth(client)
    budget = rules.budget(roles, client.location)
    trace = [
        f"study status {status.value} ({status.label}); roles {_names(roles)}; location {client.location}",
        f"bandwidth {mbps:.2f} Mbit/s ({mbps_source}); RTT {client.rtt_ms:.0f} ms; budget "
        + (f"{budget:g} s" if budget is not None else "none"),
        f"request names {facts.wanted}",
    ]
    by_id = {c.id: c for c in facts.candidates}
    verdicts = [_verdict(facts, rules, c, mbps) for c in facts.candidates]
    for v in verdicts:
        trace.append(_describe(v, by_id[v.id]))

    def refuse(outcome: Outcome, reason: str) -> Decision:
        trace.append(f"decision: {outcome.value}: {reason}")
        return Decision(
            outcome,
            None,
            reason,
            tuple(trace),
            _resolution(facts),
            bandwidth_mbps=mbps,
            budget_seconds=budget,
            verdicts=tuple(verdicts),
        )

    pool = [v for v in verdicts if v.requested]
    if not pool:
        known = ", ".join(f"{c.id} (quality {c.quality}, {c.purpose.value})" for c in facts.candidates)
        return refuse(
            Outcome.NOT_ACCEPTABLE,
            f"no version of this study matches {facts.wanted}; the versions are {known}",
        )
    allowed = [v for v in pool if v.allowed]
    if not allowed:
        return refuse(Outcome.DENIED, _denial(pool, roles, status))
    deliverable = [v for v in allowed if v.deliverable]
    if not deliverable:
        listed = ", ".join(v.id for v in allowed)
        return refuse(Outcome.NOT_ACCEPTABLE, f"no accepted transfer syntax can carry {listed}")
    restore = any(by_id[v.id].location == "archive" for v in deliverable)
    usable = [v for v in deliverable if v.available and _substitute_ok(rules, roles, status, by_id[v.id])]
    if not usable and restore and facts.wanted.explicit:
        # DESIGN.md "Tiers": an archived original asked for by name gets lossless meanwhile, else the best.
        fallback = [v for v in verdicts if v.allowed and v.deliverable and v.available]
        usable = [v for v in fallback if _substitute_ok(rules, roles, status, by_id[v.id])]
        trace.append(
            "the original is in the archive class: its restore starts; sending the best allowed meanwhile"
        )
    if not usable:
        return refuse(*_not_usable(rules, roles, status, deliverable, by_id))
    pick, why = _pick(usable, by_id, facts, budget, rules)
    chosen = by_id[pick.id]
    served = chosen.substitute if chosen.substituted and chosen.substituted >= chosen.instances else chosen.id
    if chosen.substituted:
        why += f"; {chosen.substituted} instance(s) get {chosen.substitute} ({chosen.note})"
    if restore and pick.id != "original" and facts.wanted.version == "original":
        why = f"the original is being restored from the archive; {why}"
    trace.append(f"decision: serve {pick.id}: {why}")
    return Decision(
        Outcome.SERVE,
        pick.id,
        why,
        tuple(trace),
        _resolution(facts),
        served=served,
        delivered=pick.delivered,
        seconds=pick.seconds,
        bandwidth_mbps=mbps,
        budget_seconds=budget,
        restore=restore,
        verdicts=tuple(verdicts),
    )


def _verdict(facts: Facts, rules: AccessRules, candidate: Candidate, mbps: float) -> Verdict:
    allowed = rules.allowed(facts.roles, candidate.id, facts.status)
    available = candidate.state == "ready" and candidate.location != "archive"
    return Verdict(
        id=candidate.id,
        requested=facts.wanted.matches(candidate),
        allowed=allowed,
        why_not="" if allowed else _why_not_allowed(rules, facts.roles, candidate, facts.status),
        deliverable=candidate.delivered is not None,
        delivered=candidate.delivered,
        available=available,
        size=candidate.size,
        seconds=round(transfer_seconds(candidate.size, mbps, facts.client.rtt_ms), 3),
    )


def _describe(verdict: Verdict, candidate: Candidate) -> str:
    said = [f"{verdict.id}:"]
    said.append("requested" if verdict.requested else "not requested")
    said.append("allowed" if verdict.allowed else f"denied ({verdict.why_not})")
    said.append(f"as {verdict.delivered}" if verdict.deliverable else "no accepted syntax")
    said.append(
        candidate.state if candidate.location == "hot" else f"{candidate.state}, {candidate.location}"
    )
    said.append(f"{verdict.size} bytes, ~{verdict.seconds:g} s")
    if candidate.note:
        said.append(candidate.note)
    return " ".join(said[:1]) + " " + "; ".join(said[1:])


def _denial(pool: list[Verdict], roles: frozenset[str], status: DiagnosisStatus) -> str:
    """One sentence naming every refused version and why: the body of the 403."""
    by_role = [v.id for v in pool if " may not receive " in v.why_not]
    by_status = [v.id for v in pool if v.why_not and v.id not in by_role]
    parts = [f"role {_names(roles)} may not receive {_listed(by_role, 'or')}"] if by_role else []
    if by_status:
        verb = "is" if len(by_status) == 1 else "are"
        parts.append(f"{_listed(by_status, 'and')} {verb} not sent at status {status.value} ({status.label})")
    text = "; ".join(parts)
    if status is DiagnosisStatus.UNREAD and by_status:
        text += ": the study is not read yet"
    return text


def _listed(ids: list[str], word: str) -> str:
    return ids[0] if len(ids) == 1 else f"{', '.join(ids[:-1])} {word} {ids[-1]}"


def _substitute_ok(rules: AccessRules, roles: frozenset[str], status: DiagnosisStatus, c: Candidate) -> bool:
    """Instances served by a substitute get it only where the rules allow the substitute too."""
    return not c.substituted or (c.substitute is not None and rules.allowed(roles, c.substitute, status))


def _not_usable(
    rules: AccessRules,
    roles: frozenset[str],
    status: DiagnosisStatus,
    pool: list[Verdict],
    by_id: dict[str, Candidate],
) -> tuple[Outcome, str]:
    blocked = [
        by_id[v.id] for v in pool if v.available and not _substitute_ok(rules, roles, status, by_id[v.id])
    ]
    waiting = [by_id[v.id] for v in pool if not v.available]
    if blocked and not any(c.state == "pending" for c in waiting):
        c = blocked[0]
        return Outcome.DENIED, (
            f"{c.id} was not made for {c.substituted} instance(s) ({c.note}) and role {_names(roles)} "
            f"may not receive {c.substitute}"
        )
    said = []
    for c in waiting:
        if c.location == "archive":
            said.append(f"{c.id} is in the archive class (restore started)")
        else:
            said.append(f"{c.id} is {c.state}" + (f" ({c.note})" if c.note else ""))
    return Outcome.UNAVAILABLE, "; ".join(said) + "; retry later"


def _pick(
    usable: list[Verdict], by_id: dict[str, Candidate], facts: Facts, budget: float | None, rules: AccessRules
) -> tuple[Verdict, str]:
    """Steps 2 (among the matching versions) and 3: the best that fits the budget, else the smallest."""
    ordered = sorted(usable, key=lambda v: _order_key(v, by_id[v.id]))
    client = facts.client
    if facts.previous and not facts.wanted.explicit:
        same = next((v for v in ordered if v.id == facts.previous), None)
        if same is not None:
            return same, "the version this viewer got for this study moments ago (one version per study)"
    smallest = min(usable, key=lambda v: (v.size, -by_id[v.id].quality))
    wanted = facts.wanted
    if wanted.explicit and len(usable) == 1:
        only = usable[0]
        said = f"{wanted} asked for {only.id}, which role {_names(facts.roles)} may have"
        if budget is not None and only.seconds > budget:
            said += f" (~{only.seconds:g} s, over the {budget:g} s budget at {client.location})"
        return only, said
    if wanted.quality is not None and wanted.version is None:
        # quality is a minimum (DESIGN.md): the least that meets it, the original first at equal quality
        least = min(usable, key=lambda v: (by_id[v.id].quality, _order_key(v, by_id[v.id])))
        return least, f"quality>={wanted.quality}: {least.id} is the smallest allowed version that meets it"
    if budget is None:
        if facts.wanted.explicit:
            return ordered[
                0
            ], f"{facts.wanted} asked for {ordered[0].id}, which role {_names(facts.roles)} may have"
        return ordered[
            0
        ], f"the highest-quality allowed version; no transfer-time budget for role {_names(facts.roles)}"
    frugal = client.save_data or (
        client.device_memory_gb is not None and client.device_memory_gb < rules.low_memory_gb
    )
    if frugal:
        said = "Save-Data" if client.save_data else f"Device-Memory {client.device_memory_gb:g} GiB"
        return smallest, f"the smallest allowed version ({said})"
    for v in ordered:
        if v.seconds <= budget:
            return v, (
                f"the highest-quality allowed version that fits the {budget:g} s budget at {client.location} "
                f"(~{v.seconds:g} s)"
            )
    return (
        smallest,
        f"nothing fits the {budget:g} s budget at {client.location}: the smallest (~{smallest.seconds:g} s)",
    )


def _resolution(facts: Facts) -> Resolution | None:
    """Step 4: the smallest level covering the display the request, else the client, gives."""
    display, source = facts.wanted.display, "request"
    if display is None:
        display, source = facts.client.display, "client"
    if display is None:
        return None
    if facts.image is None:
        return Resolution(display, source, 0)
    level, columns, rows = covering_level(facts.image[0], facts.image[1], display)
    return Resolution(display, source, level, columns, rows)
