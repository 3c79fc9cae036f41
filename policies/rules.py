"""Loads and validates the rule files into frozen dataclasses; a bad file is refused with its line
and reason, and the last good rules stay in force. Pure: PyYAML and the standard library only."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gateway.errors import RulesError

if TYPE_CHECKING:
    from policies.access import AccessRules

log = logging.getLogger(__name__)


class Purpose(StrEnum):
    DIAGNOSIS = "diagnosis"
    REFERENCE = "reference"
    COMPARISON = "comparison"


class Kind(StrEnum):
    ORIGINAL = "original"
    LOSSLESS = "lossless"
    LOSSY = "lossy"


@dataclass(frozen=True)
class VersionSpec:
    id: str
    kind: Kind
    quality: int
    purpose: Purpose
    transfer_syntax: str | None = None


@dataclass(frozen=True)
class RatioRule:
    match: dict[str, str]
    ratios: dict[str, float]

    def applies(self, facts: dict[str, str | None]) -> bool:
        for key, wanted in self.match.items():
            have = (facts.get(key) or "").upper()
            if key in ("study_description", "series_description"):
                if wanted.upper() not in have:
                    return False
            elif have != wanted.upper():
                return False
        return True


@dataclass(frozen=True)
class VersionRules:
    versions: tuple[VersionSpec, ...]
    default_ratios: dict[str, float]
    modality_ratios: dict[str, dict[str, float]]
    rules: tuple[RatioRule, ...] = ()
    no_version_sop_classes: frozenset[str] = frozenset()
    no_version_sop_prefixes: tuple[str, ...] = ()
    no_version_syntaxes: frozenset[str] = frozenset()
    source: str = ""

    def by_id(self, version_id: str) -> VersionSpec | None:
        return next((v for v in self.versions if v.id == version_id), None)

    @property
    def derived(self) -> tuple[VersionSpec, ...]:
        return tuple(v for v in self.versions if v.kind is not Kind.ORIGINAL)

    def target_ratio(
        self,
        version_id: str,
        modality: str | None,
        body_part: str | None = None,
        study_description: str | None = None,
        series_description: str | None = None,
    ) -> float:
        """The ratio a lossy version aims at: first matching rule, else the modality's, else the default."""
        facts = {
            "modality": modality,
            "body_part": body_part,
            "study_description": study_description,
            "series_description": series_description,
        }
        for rule in self.rules:
            if version_id in rule.ratios and rule.applies(facts):
                return rule.ratios[version_id]
        by_modality = self.modality_ratios.get((modality or "").upper(), {})
        return by_modality.get(version_id, self.default_ratios[version_id])

    def gets_versions(self, sop_class_uid: str, transfer_syntax: str, has_pixels: bool) -> tuple[bool, str]:
        """Whether an object gets derived versions, and why not (DESIGN.md "Details settled")."""
        if not has_pixels:
            return False, "no Pixel Data"
        if sop_class_uid in self.no_version_sop_classes:
            return False, f"SOP Class {sop_class_uid} is served as stored"
        if any(sop_class_uid.startswith(prefix) for prefix in self.no_version_sop_prefixes):
            return False, f"SOP Class {sop_class_uid} (RT) is served as stored"
        if transfer_syntax in self.no_version_syntaxes:
            return False, f"video transfer syntax {transfer_syntax} is served as stored"
        return True, ""


def _line(node: yaml.Node | None, path: list[Any]) -> int:
    """1-based line of the YAML node at `path` (keys and list indexes), or of the nearest parent."""
    line = node.start_mark.line + 1 if node is not None else 1
    for step in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            match = node.value[step]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line


class _Checker:
    @classmethod
    def read(cls, path: Path) -> _Checker:
        """Read and parse a rules file; an unreadable file is refused like a bad one."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise RulesError(f"{path}: line 1: cannot read the file ({exc.strerror})") from exc
        return cls(path, text)

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        try:
            self.root = yaml.compose(text)
            self.data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "somewhere"
            raise RulesError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        if not isinstance(self.data, dict):
            raise RulesError(f"{path}: line 1: the file must be a mapping")

    def fail(self, where: list[Any], reason: str) -> RulesError:
        return RulesError(
            f"{self.path}: line {_line(self.root, where)}: {'.'.join(map(str, where))}: {reason}"
        )

    def ratio_map(self, value: Any, where: list[Any], ids: set[str]) -> dict[str, float]:
        if not isinstance(value, dict):
            raise self.fail(where, "must map version ids to ratios")
        out: dict[str, float] = {}
        for key, ratio in value.items():
            if key not in ids:
                raise self.fail(
                    where + [key], f"{key!r} is not a lossy version id ({', '.join(sorted(ids))})"
                )
            if not isinstance(ratio, int | float) or isinstance(ratio, bool) or ratio <= 1:
                raise self.fail(where + [key], f"ratio {ratio!r} must be a number above 1 (20 means 1/20)")
            out[key] = float(ratio)
        return out


def load_versions(path: Path) -> VersionRules:
    """Parse versions.yaml.

    Raises:
        RulesError: with the file, line and reason.
    """
    check = _Checker.read(path)
    data = check.data
    versions: list[VersionSpec] = []
    for index, raw in enumerate(data.get("versions") or []):
        where = ["versions", index]
        if not isinstance(raw, dict) or not raw.get("id"):
            raise check.fail(where, "each version needs an id")
        try:
            kind, purpose = Kind(raw.get("kind")), Purpose(raw.get("purpose"))
        except ValueError as exc:
            raise check.fail(where, f"bad kind or purpose: {exc}") from exc
        quality = raw.get("quality")
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise check.fail(where + ["quality"], f"quality {quality!r} must be an integer 1..100")
        if kind is not Kind.ORIGINAL and not raw.get("transfer_syntax"):
            raise check.fail(where, f"version {raw['id']} needs a transfer_syntax")
        versions.append(VersionSpec(str(raw["id"]), kind, quality, purpose, raw.get("transfer_syntax")))
    if not versions or versions[0].kind is not Kind.ORIGINAL:
        raise check.fail(["versions"], "the first version must be the original")
    if len({v.id for v in versions}) != len(versions):
        raise check.fail(["versions"], "version ids must be unique")
    lossy = {v.id for v in versions if v.kind is Kind.LOSSY}
    ratios = data.get("ratios") or {}
    default = check.ratio_map(ratios.get("default"), ["ratios", "default"], lossy)
    if set(default) != lossy:
        raise check.fail(
            ["ratios", "default"], f"needs a ratio for every lossy version ({', '.join(sorted(lossy))})"
        )
    modalities = {
        str(name).upper(): check.ratio_map(value, ["ratios", "modalities", name], lossy)
        for name, value in (ratios.get("modalities") or {}).items()
    }
    rules = []
    for index, raw in enumerate(ratios.get("rules") or []):
        where = ["ratios", "rules", index]
        match = raw.get("match") if isinstance(raw, dict) else None
        allowed = {"modality", "body_part", "study_description", "series_description"}
        if not isinstance(match, dict) or not match or not set(match) <= allowed:
            raise check.fail(where, f"match must map some of {', '.join(sorted(allowed))} to values")
        rules.append(
            RatioRule(
                {k: str(v) for k, v in match.items()},
                check.ratio_map(raw.get("ratios"), where + ["ratios"], lossy),
            )
        )
    none = data.get("no_versions") or {}
    return VersionRules(
        versions=tuple(versions),
        default_ratios=default,
        modality_ratios=modalities,
        rules=tuple(rules),
        no_version_sop_classes=frozenset(map(str, none.get("sop_classes") or [])),
        no_version_sop_prefixes=tuple(map(str, none.get("sop_class_prefixes") or [])),
        no_version_syntaxes=frozenset(map(str, none.get("transfer_syntaxes") or [])),
        source=str(path),
    )


@dataclass
class RulesStore:
    """The rules in force; reload() swaps them only when the new files are good.

    Reloads without a restart: each read of `versions` or `access` checks, at most every
    `reload_check_seconds` (access.yaml, default 5), whether a file's modification time changed and
    reloads then; a bad file is logged once and the last good rules stay in force. access.yaml is
    optional until someone asks for the access rules (the versions tests use a folder without it)."""

    folder: Path
    _versions: VersionRules | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _access: AccessRules | None = None
    _stamps: tuple[tuple[str, float], ...] = ()
    _checked_at: float = 0.0
    _refused: tuple[tuple[str, float], ...] = ()
    generation: str = ""
    last_error: str | None = None

    @property
    def versions(self) -> VersionRules:
        if self._versions is None:
            self.reload()
        else:
            self._maybe_reload()
        assert self._versions is not None
        return self._versions

    @property
    def access(self) -> AccessRules:
        if self._access is None:
            self.reload(require_access=True)
        else:
            self._maybe_reload()
        assert self._access is not None
        return self._access

    def _files(self) -> tuple[Path, Path]:
        return self.folder / "versions.yaml", self.folder / "access.yaml"

    def _current_stamps(self) -> tuple[tuple[str, float], ...]:
        stamps = []
        for path in self._files():
            try:
                stamps.append((path.name, path.stat().st_mtime))
            except OSError:
                stamps.append((path.name, -1.0))
        return tuple(stamps)

    def _maybe_reload(self) -> None:
        """Reload when a file changed since the last load; never raises (the last good rules stay)."""
        interval = self._access.reload_check_seconds if self._access is not None else 5.0
        now = time.monotonic()
        if now - self._checked_at < interval:
            return
        self._checked_at = now
        stamps = self._current_stamps()
        if stamps == self._stamps or stamps == self._refused:
            return
        try:
            self.reload(require_access=self._access is not None)
        except RulesError as exc:
            self._refused = stamps
            self.last_error = str(exc)
            log.error("rules not reloaded, the last good rules stay in force: %s", exc)

    def reload(self, require_access: bool = False) -> None:
        """Load both files, then swap them in together.

        Raises:
            RulesError: a file is bad (the previous rules stay in force).
        """
        from policies.access import load_access  # access.py builds on this module's checker

        stamps = self._current_stamps()
        versions_path, access_path = self._files()
        fresh = load_versions(versions_path)
        access = None
        if require_access or self._access is not None or access_path.exists():
            access = load_access(access_path, fresh)
        digest = hashlib.sha256()
        for path in (versions_path, access_path):
            digest.update(path.read_bytes() if path.exists() else b"")
        with self._lock:
            self._versions = fresh
            if access is not None:
                self._access = access
            self._stamps = stamps
            self._checked_at = time.monotonic()
            self.generation = digest.hexdigest()[:12]
            self.last_error = None
