"""Which version a retrieve gets, and where each instance's bytes then come from. Core: no Flask.

select_version() is the one place a WADO-RS retrieve (study, series, instance, frames, bulk data,
metadata) learns its version. Today it applies the explicit rules of issue 4: the vendor parameters
`version`, `quality` (a minimum) and `purpose`; else an Accept transfer syntax a ready version is
stored in; else the original. The policy engine (gateway/decide.py) replaces choose() later; the
per-instance sources and their fallbacks stay here. A study or series gets one version for all its
images (DESIGN.md step 5); an instance that lacks it (SR, SEG, skipped, failed, pending) is sent the
best it has, and its Source says why."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from sqlalchemy import select

from gateway import decide, tiers, transcode
from gateway.accept import ANY_SYNTAX
from gateway.connections import Connections
from gateway.errors import NotAcceptable, PolicyDenied, PolicyNotAcceptable, PolicyUnavailable, Unavailable
from gateway.index.db import session_scope
from gateway.index.models import Version
from gateway.retrieve import ORIGINAL, Layout, StoredInstance
from policies.rules import Kind, VersionRules, VersionSpec

READY, SKIPPED = "ready", "skipped"
_CHUNK = 500  # SOP Instance UIDs per IN (...) query
_REASON_LIMIT = 600  # characters of X-Policy-Reason


RequestFacts = decide.RequestFacts


def request_facts(
    args: Mapping[str, str], rules: VersionRules, accepted: Iterable[str] = (), vendor_quality: bool = True
) -> RequestFacts:
    """The vendor parameters of a WADO-RS request, checked (gateway.decide.request_facts), with the
    transfer syntaxes this gateway can produce on the fly.

    Raises:
        InvalidParameter: naming the parameter and what it may be.
    """
    return decide.request_facts(
        args, rules, accepted, producible=transcode.PRODUCIBLE, vendor_quality=vendor_quality
    )


def explicit(request: Any) -> bool:
    """The request names a version, a quality or a purpose (works for decide.RequestFacts too)."""
    return any(getattr(request, name, None) is not None for name in ("version", "quality", "purpose"))


def may_choose_a_version(request: Any) -> bool:
    """Whether anything but the original can be chosen. The policy engine decides every retrieve
    (a referring physician never gets the original), so: always."""
    return True


# --- what the index holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    version_id: str
    state: str
    transfer_syntax: str | None
    size: int | None
    sha256: str | None
    ratio: float | None
    reason: str | None
    frames: str | None


def version_rows(conn: Connections, sop_uids: Sequence[str]) -> dict[str, dict[str, VersionRow]]:
    """Every version row of these instances, by SOP Instance UID then version id."""
    found: dict[str, dict[str, VersionRow]] = {}
    columns = (
        Version.sop_uid,
        Version.version_id,
        Version.state,
        Version.transfer_syntax_uid,
        Version.size,
        Version.sha256,
        Version.ratio,
        Version.reason,
        Version.frames,
    )
    unique = list(dict.fromkeys(sop_uids))
    with session_scope(conn.sessions) as session:
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            for row in session.execute(select(*columns).where(Version.sop_uid.in_(chunk))):
                found.setdefault(row.sop_uid, {})[row.version_id] = VersionRow(*row[1:])
    return found


@dataclass(frozen=True)
class Held:
    """What the instances of a retrieve hold: the originals' syntaxes (images only) and, per version,
    how many image instances have it in each state. Images are the instances that get versions."""

    images: int
    original_syntaxes: frozenset[str]
    states: Mapping[str, Counter[str]]

    def available(self, version_id: str) -> bool:
        """Ready for at least one image, or skipped (its substitute is sent) for one."""
        if version_id == ORIGINAL:
            return True
        counts = self.states.get(version_id, Counter())
        return counts[READY] + counts[SKIPPED] > 0


def held(instances: Sequence[StoredInstance], rows: Mapping[str, Mapping[str, VersionRow]]) -> Held:
    states: dict[str, Counter[str]] = {}
    syntaxes: set[str] = set()
    images = 0
    for instance in instances:
        own = rows.get(instance.ref.sop_uid)
        if not own or all(row.state == SKIPPED for row in own.values()):
            continue  # gets no versions (no pixel data, SEG, video...): sent as stored whatever is chosen
        images += 1
        syntaxes.add(instance.transfer_syntax)
        for version_id, row in own.items():
            states.setdefault(version_id, Counter())[row.state] += 1
    return Held(images, frozenset(syntaxes), states)


# --- the choice -------------------------------------------------------------------------------------


def _describe(spec: VersionSpec) -> str:
    return f"{spec.id} (quality {spec.quality}, {spec.purpose.value})"


def choose(rules: VersionRules, request: Any, facts: Callable[[], Held]) -> tuple[str, str]:
    """The version for the whole retrieve and why (issue 4's explicit rules). `facts` is called only
    when availability matters, so a plain request costs no index query.

    Raises:
        NotAcceptable: no version in versions.yaml matches version/quality/purpose together.
    """
    if explicit(request):
        return _explicit(rules, request, facts)
    for syntax in request.accepted:
        if syntax == ANY_SYNTAX:
            break
        stored = [spec for spec in rules.derived if spec.transfer_syntax == syntax]
        if not stored:  # no version is kept in it: made on the fly from the original, or not at all
            if syntax in transcode.PRODUCIBLE:
                break
            continue
        found = facts()
        if found.images == 0 or found.original_syntaxes == {syntax}:
            break
        for spec in sorted(stored, key=lambda s: -s.quality):
            if found.available(spec.id):
                name = UID(syntax).name if UID(syntax).is_valid else syntax
                return spec.id, f"Accept asks for {name} ({syntax}), which the {spec.id} version is stored in"
        if syntax in transcode.PRODUCIBLE:
            break
    return ORIGINAL, "no version was asked for (version, quality, purpose or a stored transfer syntax)"


def _explicit(rules: VersionRules, request: Any, facts: Callable[[], Held]) -> tuple[str, str]:
    said = [f"version={request.version}"] if request.version else []
    said += [f"quality={request.quality}"] if request.quality is not None else []
    said += [f"purpose={request.purpose.value}"] if request.purpose else []
    asked = ", ".join(said)
    matches = [
        spec
        for spec in rules.versions
        if (request.version is None or spec.id == request.version)
        and (request.quality is None or spec.quality >= request.quality)
        and (request.purpose is None or spec.purpose is request.purpose)
    ]
    if not matches:
        versions = ", ".join(_describe(spec) for spec in rules.versions)
        parameter = "version" if request.version else ("quality" if request.quality else "purpose")
        raise NotAcceptable(f"no version matches {asked}; the versions are {versions}", parameter=parameter)
    if len(matches) == 1:
        return matches[0].id, f"{asked} asked for the {matches[0].id} version"
    # quality is a minimum: the smallest version that meets it, the original first at equal quality
    order = sorted(matches, key=lambda spec: (spec.quality, rules.versions.index(spec)))
    found = facts()
    chosen = next((spec for spec in order if found.available(spec.id)), order[0])
    return chosen.id, f"{asked}: {chosen.id} is the smallest version that meets it"


# --- where each instance's bytes come from --------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The object one instance is read from, and why it is not the selected version when it is not."""

    instance: StoredInstance
    version_id: str
    kind: Kind
    reason: str | None = None
    ratio: float | None = None

    @property
    def lossy(self) -> bool:
        return self.kind is Kind.LOSSY


@dataclass(frozen=True)
class Selection:
    """The version of a retrieve, why, and each instance's source. `display` is what frames are cut
    for (RPCL prefixes): the request's `resolution`, later also the engine's reading of the client."""

    version_id: str
    reason: str
    sources: Mapping[str, Source] = field(default_factory=dict)
    display: Any = None

    def source(self, instance: StoredInstance) -> Source:
        found = self.sources.get(instance.ref.sop_uid)
        return found if found is not None else Source(instance, ORIGINAL, Kind.ORIGINAL)

    @property
    def served(self) -> str:
        """What X-Served-Version says: the selected version when any instance got it, else what most
        instances got instead (a skipped lossy version's substitute, say)."""
        got = Counter(source.version_id for source in self.sources.values())
        if not got or self.version_id in got:
            return self.version_id
        return got.most_common(1)[0][0]

    @property
    def policy_reason(self) -> str:
        """X-Policy-Reason: the choice, then each group of instances that got something else."""
        groups: dict[str, list[Source]] = {}
        for source in self.sources.values():
            if source.reason is not None:
                groups.setdefault(source.version_id, []).append(source)
        text = self.reason
        total = len(self.sources)
        for version_id, members in groups.items():
            count = f"{len(members)} of {total} instances" if total > 1 else "this instance"
            text += f"; {count} sent as {version_id}: {members[0].reason}"
        return header_safe(text)

    def headers(self) -> dict[str, str]:
        """What every retrieve response says about the choice (DESIGN.md "Choosing the version")."""
        return {"X-Served-Version": self.served, "X-Policy-Reason": self.policy_reason}


def header_safe(text: str, limit: int = _REASON_LIMIT) -> str:
    """One line of printable ASCII (HTTP field values), cut to `limit` characters."""
    clean = "".join(c if 32 <= ord(c) < 127 else " " for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _as_version(instance: StoredInstance, row: VersionRow) -> StoredInstance:
    return dataclasses.replace(
        instance,
        version=row.version_id,
        transfer_syntax=row.transfer_syntax or instance.transfer_syntax,
        size=int(row.size or 0),
        sha256=row.sha256 or "",
        layout=Layout.from_json(row.frames),
    )


def sources(
    rules: VersionRules,
    instances: Sequence[StoredInstance],
    rows: Mapping[str, Mapping[str, VersionRow]],
    version_id: str,
) -> dict[str, Source]:
    """One Source per instance: the selected version where it is ready, else the best it has."""
    kinds = {spec.id: spec.kind for spec in rules.versions}
    lossless = next((spec.id for spec in rules.derived if spec.kind is Kind.LOSSLESS), None)
    found: dict[str, Source] = {}
    for instance in instances:
        own = rows.get(instance.ref.sop_uid) or {}
        found[instance.ref.sop_uid] = _source(instance, own, version_id, kinds, lossless)
    return found


def _source(
    instance: StoredInstance,
    own: Mapping[str, VersionRow],
    version_id: str,
    kinds: Mapping[str, Kind],
    lossless: str | None,
) -> Source:
    original = Source(instance, ORIGINAL, Kind.ORIGINAL)
    if version_id == ORIGINAL:
        return original
    if not own:
        return dataclasses.replace(
            original,
            reason="no versions are made of this object (no image to derive), so it is sent as stored",
        )
    row = own.get(version_id)
    if row is not None and row.state == READY:
        return Source(
            _as_version(instance, row), version_id, kinds.get(version_id, Kind.LOSSY), None, row.ratio
        )
    substitute = own.get(lossless) if lossless and lossless != version_id else None
    if row is None:
        why = f"{version_id} is not made for this instance"
    elif row.state == SKIPPED:
        why = f"{version_id} was not made for this instance ({row.reason or 'skipped'})"
    else:
        why = f"{version_id} is {row.state} for this instance" + (f" ({row.reason})" if row.reason else "")
    if substitute is not None and substitute.state == READY:
        return Source(
            _as_version(instance, substitute), substitute.version_id, Kind.LOSSLESS, why, substitute.ratio
        )
    return dataclasses.replace(original, reason=why)


def select_version(
    conn: Connections,
    instances: Sequence[StoredInstance],
    request: Any,
    identity: Any = None,
    profile: Any = None,
) -> Selection:
    """The version this retrieve gets and each instance's source (the one entry point for WADO-RS).

    With an identity the policy engine decides (gateway.decide: status, role, bandwidth, display);
    without one (internal callers) only the explicit rules of choose() apply.

    Raises:
        PolicyDenied: the rules allow this caller no version (403, with the reason).
        NotAcceptable: no version matches the request, or none can be delivered in an accepted syntax.
        Unavailable: the version asked for is still being made.
        IndexUnavailable: the index failed.
    """
    rules = conn.rules.versions
    loaded: dict[str, dict[str, VersionRow]] | None = None

    def rows() -> dict[str, dict[str, VersionRow]]:
        nonlocal loaded
        if loaded is None:
            loaded = version_rows(conn, [instance.ref.sop_uid for instance in instances])
        return loaded

    display = getattr(request, "display", None)
    if identity is None:
        version_id, reason = choose(rules, request, lambda: held(instances, rows()))
    else:
        decision = _decide(conn, instances, request, identity, profile, rows)
        version_id, reason = str(decision.version), decision.reason
        if decision.resolution is not None and display is None:
            display = decision.resolution.display
    if version_id == ORIGINAL:
        return Selection(version_id, reason, {}, display)
    return Selection(version_id, reason, sources(rules, instances, rows(), version_id), display)


def _decide(
    conn: Connections,
    instances: Sequence[StoredInstance],
    request: Any,
    identity: Any,
    profile: Any,
    rows: Callable[[], Mapping[str, Mapping[str, VersionRow]]],
) -> Any:
    """Ask the engine; where it picks the original, ask again knowing where the originals are (an
    archived original gives way to the lossless version while its restore runs: DESIGN.md "Tiers")."""
    if not isinstance(request, decide.RequestFacts):
        request = decide.RequestFacts(**dataclasses.asdict(request))
    if not explicit(request):
        # An Accept naming a syntax a version is stored in asks for that version (issue 4: served from
        # its stored bytes, never re-encoded); the engine still says whether this caller may have it.
        wanted, _why = choose(conn.rules.versions, request, lambda: held(instances, rows()))
        if wanted != ORIGINAL:
            try:
                return _decide(
                    conn, instances, dataclasses.replace(request, version=wanted), identity, profile, rows
                )
            except (PolicyDenied, NotAcceptable, Unavailable):
                pass  # not this version for this caller: let the engine choose among the others
    first = instances[0].ref
    narrowed = dataclasses.replace(
        request,
        series_uid=first.series_uid if len({i.ref.series_uid for i in instances}) == 1 else None,
        sop_uid=first.sop_uid if len(instances) == 1 else None,
    )
    decision = decide.decide_for_retrieve(conn, identity, profile, first.study_uid, narrowed)
    if decision.version == ORIGINAL and not decision.denied:
        location = tiers.original_location(conn, [instance.ref for instance in instances])
        if location != "hot":
            decision = decide.decide_for_retrieve(
                conn,
                identity,
                profile,
                first.study_uid,
                dataclasses.replace(narrowed, original_location=location),
            )
    if decision.denied:
        raise PolicyDenied(decision.reason)
    if decision.not_acceptable:
        raise PolicyNotAcceptable(decision.reason)
    if decision.unavailable:
        raise PolicyUnavailable(decision.reason)
    return decision
