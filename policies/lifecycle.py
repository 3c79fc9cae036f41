"""lifecycle.yaml -> LifecycleRules: what moves when (the mover's moves between buckets, by age or by
diagnosis status) and each bucket's S3-native lifecycle configuration (class changes within a bucket).

Pure: PyYAML and the standard library only. The mover hands in facts (ages, status, where the copies
are) and gets steps back; a bad file raises RulesError with its line and reason."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway.errors import RulesError
from policies.rules import Kind, VersionRules, _Checker

TIERS = ("originals", "hot", "cold")
# The S3 storage classes, warm to cold, in the order S3 lets an object go down (the "waterfall").
CLASSES = (
    "STANDARD",
    "STANDARD_IA",
    "INTELLIGENT_TIERING",
    "ONEZONE_IA",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
)
# Served at once, no restore (DESIGN.md: "from an instant-retrieval class it is served at once").
INSTANT = frozenset({"STANDARD", "STANDARD_IA", "INTELLIGENT_TIERING", "ONEZONE_IA", "GLACIER_IR"})
# A restore (S3 RestoreObject) is needed before a byte can be read.
ARCHIVE = frozenset({"GLACIER", "DEEP_ARCHIVE"})
# S3: transitions to the infrequent-access classes need objects at least 30 days old, and an object must
# stay 30 days in them before it may go further down.
MIN_IA_DAYS = 30
_IA = frozenset({"STANDARD_IA", "ONEZONE_IA"})
PRESETS = ("archive-originals", "mirror", "archive-lossy")
DAY = timedelta(days=1)


def is_archive(storage_class: str) -> bool:
    return storage_class in ARCHIVE


class Action(StrEnum):
    COPY = "copy"  # a copy goes to the target tier; the source stays
    MOVE = "move"  # copy, verify, record, then the source copy goes


@dataclass(frozen=True)
class Move:
    """One rule of `moves`: some objects leave their home bucket for the cold bucket."""

    id: str
    objects: frozenset[str]  # "original", kinds ("lossless", "lossy"), "versions", or version ids
    storage_class: str
    read_days: float | None
    ingest_days: float | None
    keep_source: bool
    target: str = "cold"

    def covers(self, object_id: str, kind: str) -> bool:
        if object_id in self.objects or kind in self.objects:
            return True
        return kind != "original" and "versions" in self.objects

    def due_at(self, ingested_at: datetime, read_at: datetime | None) -> datetime | None:
        """When the rule starts to apply: `read_days` after the study was read; for a study never read
        (or a rule without read_days), `ingest_days` after ingest; None: not (yet) due at any time."""
        if read_at is not None and self.read_days is not None:
            return read_at + self.read_days * DAY
        if self.ingest_days is not None and (read_at is None or self.read_days is None):
            return ingested_at + self.ingest_days * DAY
        return None


@dataclass(frozen=True)
class Step:
    days: float
    storage_class: str


@dataclass(frozen=True)
class Transition:
    """One S3-native rule: objects of one bucket change class by age (prefix, tags, size narrow it)."""

    id: str
    bucket: str  # a tier: originals, hot or cold
    prefix: str
    tags: tuple[tuple[str, str], ...]
    steps: tuple[Step, ...]
    min_size: int | None = None


@dataclass(frozen=True)
class MoverLimits:
    """Throttle of one mover run: it stops at either cap and paces itself to the rates."""

    every_minutes: float = 15.0
    max_objects_per_run: int = 1000
    max_bytes_per_run: int = 50 << 30
    objects_per_second: float = 20.0
    bytes_per_second: float = 100e6
    lease_seconds: int = 600


@dataclass(frozen=True)
class RestoreSettings:
    days: int = 7  # how long S3 keeps a restored copy readable
    tier: str = "Standard"  # S3 retrieval tier: Expedited, Standard, Bulk
    # The local backend's stand-in for an archive retrieval: seconds until a restore is ready.
    local_delay_seconds: Mapping[str, float] = field(
        default_factory=lambda: {"GLACIER": 60.0, "DEEP_ARCHIVE": 300.0}
    )


@dataclass(frozen=True)
class PrefetchSettings:
    priors: int = 3  # earlier studies of the same Patient ID made hot with a study
    keep_hot_days: float = 7.0  # the mover leaves a prefetched object hot at least this long


@dataclass(frozen=True)
class Copy:
    """Where one copy of an object is, as the mover sees it."""

    tier: str
    storage_class: str = "STANDARD"
    usable: bool = True  # verified and not on its way out


@dataclass(frozen=True)
class Holding:
    """The facts about one object the decision needs: what it is, its age, its study's reading, its copies."""

    object_id: str  # "original" or a version id
    kind: str  # "original", "lossless" or "lossy"
    ingested_at: datetime
    read_at: datetime | None
    copies: tuple[Copy, ...]
    pinned_until: datetime | None = None  # a prefetch keeps it hot until then

    @property
    def home(self) -> str:
        return "originals" if self.kind == "original" else "hot"


@dataclass(frozen=True)
class Planned:
    """What the mover should do with one object now, and why."""

    action: Action
    source: str  # the tier the copy is read from (and, for a move, deleted from)
    target: str
    storage_class: str
    rules: tuple[str, ...]
    reason: str
    copy_needed: bool  # False: a usable copy with that class is there already (a move only deletes)


@dataclass(frozen=True)
class LifecycleRules:
    moves: tuple[Move, ...]
    transitions: tuple[Transition, ...]
    mover: MoverLimits = MoverLimits()
    restore: RestoreSettings = RestoreSettings()
    prefetch: PrefetchSettings = PrefetchSettings()
    abort_incomplete_upload_days: int | None = 7
    source: str = ""

    def plan(self, holding: Holding, now: datetime) -> Planned | None:
        """The step due now for one object, or None.

        Every rule due for the object that targets the cold tier is merged: the first one (file order)
        gives the storage class, and any `move` among them makes the step a move. A prefetched object
        (pinned hot) keeps its home copy: only copies are planned for it until the pin expires."""
        due: list[tuple[Move, datetime]] = []
        for rule in self.moves:
            if not rule.covers(holding.object_id, holding.kind):
                continue
            when = rule.due_at(holding.ingested_at, holding.read_at)
            if when is not None and when <= now:
                due.append((rule, when))
        if not due:
            return None
        storage_class = due[0][0].storage_class
        pinned = holding.pinned_until is not None and holding.pinned_until > now
        wants_move = any(not rule.keep_source for rule, _ in due) and not pinned
        home = [c for c in holding.copies if c.tier == holding.home and c.usable]
        target = [c for c in holding.copies if c.tier == "cold" and c.usable]
        in_place = any(c.storage_class == storage_class for c in target)
        if not home:
            return None  # nothing left to move; a class change of a cold copy is a transition's job
        if in_place and not wants_move:
            return None
        names = tuple(rule.id for rule, _ in due)
        first_rule, first_when = due[0]
        reason = f"rule {first_rule.id}: due since {first_when.isoformat(timespec='seconds')}"
        return Planned(
            action=Action.MOVE if wants_move else Action.COPY,
            source=holding.home,
            target="cold",
            storage_class=storage_class,
            rules=names,
            reason=reason,
            copy_needed=not in_place,
        )

    def render(self, buckets: Mapping[str, str]) -> dict[str, dict[str, Any] | None]:
        """Each bucket's LifecycleConfiguration, as boto3's put_bucket_lifecycle_configuration takes it
        (None: the bucket gets no configuration). `buckets` maps tiers to the configured bucket names."""
        out: dict[str, dict[str, Any] | None] = {}
        for tier in TIERS:
            name = buckets[tier]
            rules = [_render_transition(t) for t in self.transitions if t.bucket == tier]
            if self.abort_incomplete_upload_days is not None:
                rules.append(
                    {
                        "ID": "abort-incomplete-multipart-uploads",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "AbortIncompleteMultipartUpload": {
                            "DaysAfterInitiation": self.abort_incomplete_upload_days
                        },
                    }
                )
            out[name] = {"Rules": rules} if rules else None
        return out


def _render_transition(rule: Transition) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    if rule.prefix:
        conditions["Prefix"] = rule.prefix
    tags = [{"Key": k, "Value": v} for k, v in rule.tags]
    if rule.min_size is not None:
        conditions["ObjectSizeGreaterThan"] = rule.min_size
    if tags and not conditions and len(tags) == 1:
        filter_: dict[str, Any] = {"Tag": tags[0]}
    elif tags or len(conditions) > 1:
        filter_ = {"And": {**conditions, **({"Tags": tags} if tags else {})}}
    else:
        filter_ = conditions or {"Prefix": ""}
    return {
        "ID": rule.id,
        "Status": "Enabled",
        "Filter": filter_,
        "Transitions": [{"Days": int(s.days), "StorageClass": s.storage_class} for s in rule.steps],
    }


# --- loading ------------------------------------------------------------------------------------------------

_MOVE_KEYS = {"id", "objects", "to", "storage_class", "after", "keep_source"}
_AFTER_KEYS = {"read_days", "ingest_days"}
_TRANSITION_KEYS = {"id", "bucket", "prefix", "tags", "transitions", "min_size"}
_TOP_KEYS = {"moves", "transitions", "mover", "restore", "prefetch", "abort_incomplete_upload_days"}


def _number(check: _Checker, value: Any, where: list[Any], low: float = 0, integer: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < low or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise check.fail(where, f"{value!r} must be {kind} of at least {low:g}")
    return value


def _class(check: _Checker, value: Any, where: list[Any]) -> str:
    if value not in CLASSES:
        raise check.fail(where, f"{value!r} is not a storage class ({', '.join(CLASSES)})")
    return str(value)


def _unknown_keys(check: _Checker, raw: dict[str, Any], allowed: set[str], where: list[Any]) -> None:
    extra = sorted(set(map(str, raw)) - allowed)
    if extra:
        raise check.fail(
            where + [extra[0]], f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _objects(check: _Checker, value: Any, where: list[Any], versions: VersionRules | None) -> frozenset[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise check.fail(where, "must name objects: original, lossless, lossy, versions or version ids")
    known = {"original", "lossless", "lossy", "versions"}
    if versions is not None:
        known |= {v.id for v in versions.versions}
    for index, name in enumerate(names):
        if not isinstance(name, str) or (versions is not None and name not in known):
            raise check.fail(where + [index], f"{name!r} is not one of {', '.join(sorted(known))}")
    return frozenset(names)


def _move(check: _Checker, raw: Any, index: int, versions: VersionRules | None) -> Move:
    where: list[Any] = ["moves", index]
    if not isinstance(raw, dict) or not raw.get("id"):
        raise check.fail(where, "each move needs an id")
    _unknown_keys(check, raw, _MOVE_KEYS, where)
    if raw.get("to", "cold") != "cold":
        raise check.fail(where + ["to"], f"{raw.get('to')!r}: moves go to the cold bucket (to: cold)")
    after = raw.get("after")
    if not isinstance(after, dict) or not after or not set(after) <= _AFTER_KEYS:
        raise check.fail(where + ["after"], "must give read_days and/or ingest_days")
    days = {key: _number(check, after[key], where + ["after", key]) for key in after}
    keep = raw.get("keep_source", False)
    if not isinstance(keep, bool):
        raise check.fail(where + ["keep_source"], f"{keep!r} must be true or false")
    storage_class = _class(check, raw.get("storage_class"), where + ["storage_class"])
    return Move(
        id=str(raw["id"]),
        objects=_objects(check, raw.get("objects"), where + ["objects"], versions),
        storage_class=storage_class,
        read_days=days.get("read_days"),
        ingest_days=days.get("ingest_days"),
        keep_source=keep,
    )


def _transition(check: _Checker, raw: Any, index: int) -> Transition:
    where: list[Any] = ["transitions", index]
    if not isinstance(raw, dict) or not raw.get("id"):
        raise check.fail(where, "each transition needs an id")
    _unknown_keys(check, raw, _TRANSITION_KEYS, where)
    bucket = raw.get("bucket")
    if bucket not in TIERS:
        raise check.fail(where + ["bucket"], f"{bucket!r} must be one of {', '.join(TIERS)}")
    prefix = raw.get("prefix", "studies/")
    if not isinstance(prefix, str):
        raise check.fail(where + ["prefix"], "must be a key prefix such as studies/")
    tags = raw.get("tags") or {}
    if not isinstance(tags, dict):
        raise check.fail(where + ["tags"], "must map tag keys to values")
    if tags and bucket != "cold":
        # Only the mover's copies carry tags (gw-object, gw-study); objects stored by STOW and derive do not.
        raise check.fail(
            where + ["tags"], "tag filters only match in the cold bucket, where the mover tags copies"
        )
    size = raw.get("min_size")
    if size is not None:
        size = int(_number(check, size, where + ["min_size"], 0, integer=True))
    steps_raw = raw.get("transitions")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise check.fail(where + ["transitions"], "must list steps of {days, storage_class}")
    steps: list[Step] = []
    for number, step in enumerate(steps_raw):
        at = where + ["transitions", number]
        if not isinstance(step, dict) or set(step) != {"days", "storage_class"}:
            raise check.fail(at, "each step is {days: N, storage_class: CLASS}")
        days = _number(check, step["days"], at + ["days"], 0, integer=True)
        storage_class = _class(check, step["storage_class"], at + ["storage_class"])
        if storage_class == "STANDARD":
            raise check.fail(at + ["storage_class"], "objects cannot transition to STANDARD")
        if storage_class in _IA and days < MIN_IA_DAYS:
            raise check.fail(
                at + ["days"], f"S3 moves objects to {storage_class} after {MIN_IA_DAYS} days at the earliest"
            )
        if steps:
            before = steps[-1]
            if CLASSES.index(storage_class) <= CLASSES.index(before.storage_class):
                raise check.fail(
                    at + ["storage_class"], f"{storage_class} is not colder than {before.storage_class}"
                )
            gap = MIN_IA_DAYS if before.storage_class in _IA else 1
            if days < before.days + gap:
                raise check.fail(
                    at + ["days"], f"must be at least {gap} days after the step to {before.storage_class}"
                )
        steps.append(Step(float(days), storage_class))
    return Transition(
        id=str(raw["id"]),
        bucket=str(bucket),
        prefix=prefix,
        tags=tuple((str(k), str(v)) for k, v in sorted(tags.items())),
        steps=tuple(steps),
        min_size=size,
    )


def _mover(check: _Checker, raw: Any) -> MoverLimits:
    if raw is None:
        return MoverLimits()
    if not isinstance(raw, dict):
        raise check.fail(["mover"], "must be a mapping")
    allowed = {"every_minutes", "max_objects_per_run", "max_megabytes_per_run", "objects_per_second",
               "megabytes_per_second", "lease_seconds"}  # fmt: skip
    _unknown_keys(check, raw, allowed, ["mover"])
    base = MoverLimits()

    def get(key: str, default: float, low: float = 0.001, integer: bool = False) -> float:
        return _number(check, raw[key], ["mover", key], low, integer) if key in raw else default

    return MoverLimits(
        every_minutes=float(get("every_minutes", base.every_minutes, 0.1)),
        max_objects_per_run=int(get("max_objects_per_run", base.max_objects_per_run, 1, True)),
        max_bytes_per_run=int(get("max_megabytes_per_run", base.max_bytes_per_run / 1e6, 0.001) * 1e6),
        objects_per_second=float(get("objects_per_second", base.objects_per_second)),
        bytes_per_second=float(get("megabytes_per_second", base.bytes_per_second / 1e6) * 1e6),
        lease_seconds=int(get("lease_seconds", base.lease_seconds, 10, True)),
    )


def _restore(check: _Checker, raw: Any) -> RestoreSettings:
    if raw is None:
        return RestoreSettings()
    if not isinstance(raw, dict):
        raise check.fail(["restore"], "must be a mapping")
    _unknown_keys(check, raw, {"days", "tier", "local_delay_seconds"}, ["restore"])
    base = RestoreSettings()
    days = int(_number(check, raw.get("days", base.days), ["restore", "days"], 1, integer=True))
    tier = raw.get("tier", base.tier)
    if tier not in ("Expedited", "Standard", "Bulk"):
        raise check.fail(["restore", "tier"], f"{tier!r} must be Expedited, Standard or Bulk")
    delays = dict(base.local_delay_seconds)
    given = raw.get("local_delay_seconds") or {}
    if not isinstance(given, dict):
        raise check.fail(["restore", "local_delay_seconds"], "must map archive classes to seconds")
    for name, seconds in given.items():
        where = ["restore", "local_delay_seconds", name]
        if name not in ARCHIVE:
            raise check.fail(where, f"{name!r} is not an archive class ({', '.join(sorted(ARCHIVE))})")
        delays[str(name)] = float(_number(check, seconds, where))
    return RestoreSettings(days=days, tier=str(tier), local_delay_seconds=delays)


def _prefetch(check: _Checker, raw: Any) -> PrefetchSettings:
    if raw is None:
        return PrefetchSettings()
    if not isinstance(raw, dict):
        raise check.fail(["prefetch"], "must be a mapping")
    _unknown_keys(check, raw, {"priors", "keep_hot_days"}, ["prefetch"])
    base = PrefetchSettings()
    priors = int(_number(check, raw.get("priors", base.priors), ["prefetch", "priors"], 0, integer=True))
    keep = float(_number(check, raw.get("keep_hot_days", base.keep_hot_days), ["prefetch", "keep_hot_days"]))
    return PrefetchSettings(priors=priors, keep_hot_days=keep)


def _targets(move: Move, versions: VersionRules | None) -> set[str]:
    """The object ids a rule covers, where the versions are known (for the conflict check)."""
    specs = {"original": "original"}
    if versions is not None:
        specs = {v.id: ("original" if v.kind is Kind.ORIGINAL else v.kind.value) for v in versions.versions}
    return {oid for oid, kind in specs.items() if move.covers(oid, kind)}


def load_lifecycle(path: Path, versions: VersionRules | None = None) -> LifecycleRules:
    """Parse lifecycle.yaml (version ids are checked against `versions` when given).

    Raises:
        RulesError: with the file, line and reason.
    """
    check = _Checker.read(path)
    data = check.data
    _unknown_keys(check, data, _TOP_KEYS, [])
    raw_moves = data.get("moves") or []
    raw_transitions = data.get("transitions") or []
    if not isinstance(raw_moves, list):
        raise check.fail(["moves"], "must be a list of rules")
    if not isinstance(raw_transitions, list):
        raise check.fail(["transitions"], "must be a list of rules")
    moves = [_move(check, raw, index, versions) for index, raw in enumerate(raw_moves)]
    ids = [m.id for m in moves]
    if len(set(ids)) != len(ids):
        raise check.fail(["moves"], "move ids must be unique")
    for index, move in enumerate(moves):
        for earlier in moves[:index]:
            shared = _targets(move, versions) & _targets(earlier, versions)
            if shared and move.storage_class != earlier.storage_class:
                raise check.fail(
                    ["moves", index, "storage_class"],
                    f"{', '.join(sorted(shared))} would go to the cold bucket as {move.storage_class} here "
                    f"and as {earlier.storage_class} by rule {earlier.id}: one class per object; "
                    "change classes later with a transition of the cold bucket",
                )
    transitions = [_transition(check, raw, index) for index, raw in enumerate(raw_transitions)]
    if len({t.id for t in transitions}) != len(transitions):
        raise check.fail(["transitions"], "transition ids must be unique")
    abort = data.get("abort_incomplete_upload_days", 7)
    if abort is not None:
        abort = int(_number(check, abort, ["abort_incomplete_upload_days"], 1, integer=True))
    return LifecycleRules(
        moves=tuple(moves),
        transitions=tuple(transitions),
        mover=_mover(check, data.get("mover")),
        restore=_restore(check, data.get("restore")),
        prefetch=_prefetch(check, data.get("prefetch")),
        abort_incomplete_upload_days=abort,
        source=str(path),
    )


def rules_path(folder: Path, rules: Path | None = None, preset: str | None = None) -> Path:
    """The file to load: an explicit one, a preset shipped in `presets/`, else lifecycle.yaml.

    Raises:
        RulesError: an unknown preset.
    """
    if rules is not None and preset is not None:
        raise RulesError("give either a rules file or a preset, not both")
    if rules is not None:
        return rules
    if preset is not None:
        path = folder / "presets" / f"{preset}.yaml"
        if not path.is_file():
            shipped = sorted(p.stem for p in (folder / "presets").glob("*.yaml"))
            raise RulesError(f"no lifecycle preset {preset!r} (shipped: {', '.join(shipped) or 'none'})")
        return path
    return folder / "lifecycle.yaml"
