"""access.yaml -> AccessRules: the status x version matrix, roles, locations, budgets, status rules.

Pure: PyYAML and the standard library only. A bad file raises RulesError with its line and reason."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.permissions import Action
from policies.rules import VersionRules, _Checker
from policies.status import DiagnosisStatus, StatusRule

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RoleRules:
    name: str
    may: frozenset[Action]
    versions: frozenset[str]
    follows_matrix: bool


@dataclass(frozen=True)
class AccessRules:
    matrix: dict[str, frozenset[DiagnosisStatus]]
    roles: dict[str, RoleRules]
    role_aliases: dict[str, str]
    locations: tuple[tuple[str, Network], ...]  # most specific first
    location_names: tuple[str, ...]
    default_location: str
    assumed_mbps: dict[str, float]
    budgets: dict[str, dict[str, float | None]]
    status_rules: tuple[StatusRule, ...]
    low_memory_gb: float = 1.0
    decision_cache_seconds: int = 300
    reload_check_seconds: float = 5.0
    source: str = ""

    def known_roles(self, claimed: set[str] | frozenset[str]) -> frozenset[str]:
        """Claimed role names mapped through role_aliases, unknown ones dropped."""
        mapped = {self.role_aliases.get(name, name) for name in claimed}
        return frozenset(name for name in mapped if name in self.roles)

    def may(self, roles: frozenset[str] | set[str], action: Action) -> bool:
        """A user with several roles gets the most permissive (DESIGN.md "Details settled")."""
        return any(action in self.roles[r].may for r in roles if r in self.roles)

    def transmittable(self, version_id: str, status: DiagnosisStatus) -> bool:
        return status in self.matrix.get(version_id, frozenset())

    def allowed(self, roles: frozenset[str] | set[str], version_id: str, status: DiagnosisStatus) -> bool:
        """Some role of the user may receive the version at this status (its own or the matrix's say)."""
        for name in roles:
            role = self.roles.get(name)
            if role is None or version_id not in role.versions:
                continue
            if not role.follows_matrix or self.transmittable(version_id, status):
                return True
        return False

    def location_of(self, address: str | None) -> str:
        """The most specific named CIDR range holding the address, else the default location."""
        if address:
            try:
                ip = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                return self.default_location
            for name, network in self.locations:
                if ip.version == network.version and ip in network:
                    return name
        return self.default_location

    def budget(self, roles: frozenset[str] | set[str], location: str) -> float | None:
        """Seconds for a whole study; None = no budget. Several roles: the most permissive (largest)."""
        found: list[float] = []
        for name in roles:
            if name not in self.roles:
                continue
            table = self.budgets.get(name)
            if table is None:
                return None
            seconds = table.get(location, table.get("default"))
            if seconds is None:
                return None
            found.append(seconds)
        return max(found) if found else None

    def assumed(self, location: str) -> float:
        return self.assumed_mbps.get(location, self.assumed_mbps.get("default", 10.0))


_ROLE_KEYS = {"may", "versions", "matrix"}
_MATCH_KEYS = {"sop_classes", "completion_flag", "template", "document_title"}


def _status(check: _Checker, value: Any, where: list[Any]) -> DiagnosisStatus:
    try:
        return DiagnosisStatus.parse(value)
    except ValueError as exc:
        raise check.fail(where, str(exc)) from exc


def _seconds(check: _Checker, value: Any, where: list[Any], allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise check.fail(where, f"{value!r} must be a positive number")
    return float(value)


def _matrix(
    check: _Checker, data: dict[str, Any], versions: VersionRules
) -> dict[str, frozenset[DiagnosisStatus]]:
    raw = data.get("matrix")
    if not isinstance(raw, dict):
        raise check.fail(["matrix"], "must map each version id to the statuses it may be sent at")
    ids = {v.id for v in versions.versions}
    out: dict[str, frozenset[DiagnosisStatus]] = {}
    for version_id, statuses in raw.items():
        if version_id not in ids:
            raise check.fail(["matrix", version_id], f"{version_id!r} is not a version of versions.yaml")
        if not isinstance(statuses, list):
            raise check.fail(["matrix", version_id], "must be a list of statuses")
        out[version_id] = frozenset(
            _status(check, s, ["matrix", version_id, i]) for i, s in enumerate(statuses)
        )
    missing = ids - set(out)
    if missing:
        raise check.fail(["matrix"], f"has no row for {', '.join(sorted(missing))}")
    return out


def _roles(check: _Checker, data: dict[str, Any], versions: VersionRules) -> dict[str, RoleRules]:
    raw = data.get("roles")
    if not isinstance(raw, dict) or not raw:
        raise check.fail(["roles"], "must map role names to their rules")
    ids = {v.id for v in versions.versions}
    out: dict[str, RoleRules] = {}
    for name, body in raw.items():
        where = ["roles", name]
        if not isinstance(body, dict) or not set(body) <= _ROLE_KEYS:
            raise check.fail(where, f"a role has only {', '.join(sorted(_ROLE_KEYS))}")
        try:
            may = frozenset(Action(a) for a in body.get("may") or [])
        except ValueError as exc:
            allowed = ", ".join(a.value for a in Action)
            raise check.fail(where + ["may"], f"{exc}; actions are {allowed}") from exc
        wanted = body.get("versions", [])
        if wanted == "all":
            granted = frozenset(ids)
        elif isinstance(wanted, list) and set(wanted) <= ids:
            granted = frozenset(map(str, wanted))
        else:
            raise check.fail(where + ["versions"], f"must be `all` or a list of {', '.join(sorted(ids))}")
        matrix = body.get("matrix", "follow")
        if matrix not in ("follow", "ignore"):
            raise check.fail(where + ["matrix"], f"{matrix!r} must be follow or ignore")
        out[str(name)] = RoleRules(str(name), may, granted, matrix == "follow")
    return out


def _locations(
    check: _Checker, data: dict[str, Any]
) -> tuple[tuple[tuple[str, Network], ...], tuple[str, ...]]:
    raw = data.get("locations") or {}
    if not isinstance(raw, dict):
        raise check.fail(["locations"], "must map location names to CIDR lists")
    ranges: list[tuple[str, Network]] = []
    for name, cidrs in raw.items():
        if not isinstance(cidrs, list):
            raise check.fail(["locations", name], "must be a list of CIDR ranges")
        for index, cidr in enumerate(cidrs):
            try:
                ranges.append((str(name), ipaddress.ip_network(str(cidr), strict=False)))
            except ValueError as exc:
                raise check.fail(["locations", name, index], f"{cidr!r} is not a CIDR range") from exc
    ranges.sort(key=lambda item: -item[1].prefixlen)
    return tuple(ranges), tuple(map(str, raw))


def _budgets(
    check: _Checker, data: dict[str, Any], roles: dict[str, RoleRules]
) -> dict[str, dict[str, float | None]]:
    raw = data.get("budgets") or {}
    if not isinstance(raw, dict):
        raise check.fail(["budgets"], "must map roles to {location: seconds}")
    out: dict[str, dict[str, float | None]] = {}
    for role, table in raw.items():
        if role not in roles:
            raise check.fail(["budgets", role], f"{role!r} is not a role of `roles`")
        if not isinstance(table, dict):
            raise check.fail(["budgets", role], "must map locations to seconds (or null)")
        out[str(role)] = {
            str(place): _seconds(check, seconds, ["budgets", role, place], allow_none=True)
            for place, seconds in table.items()
        }
    return out


def _status_rules(check: _Checker, data: dict[str, Any]) -> tuple[StatusRule, ...]:
    rules: list[StatusRule] = []
    for index, raw in enumerate(data.get("status_rules") or []):
        where = ["status_rules", index]
        match = raw.get("match") if isinstance(raw, dict) else None
        if not isinstance(match, dict) or not match or not set(match) <= _MATCH_KEYS:
            raise check.fail(where, f"match must map some of {', '.join(sorted(_MATCH_KEYS))}")
        classes = match.get("sop_classes") or []
        if not isinstance(classes, list):
            raise check.fail(where + ["match", "sop_classes"], "must be a list of SOP Class UIDs")
        flag = match.get("completion_flag")
        if flag is not None and str(flag).upper() not in ("COMPLETE", "PARTIAL"):
            raise check.fail(where + ["match", "completion_flag"], f"{flag!r} must be COMPLETE or PARTIAL")
        title = match.get("document_title")
        if title is not None and ":" not in str(title):
            raise check.fail(where + ["match", "document_title"], f"{title!r} must be SCHEME:VALUE")
        rules.append(
            StatusRule(
                name=str(raw.get("name") or f"rule {index + 1}"),
                status=_status(check, raw.get("status"), where + ["status"]),
                sop_classes=tuple(map(str, classes)),
                completion_flag=str(flag).upper() if flag is not None else None,
                template=str(match["template"]) if match.get("template") is not None else None,
                document_title=str(title).upper() if title is not None else None,
            )
        )
    return tuple(rules)


def load_access(path: Path, versions: VersionRules) -> AccessRules:
    """Parse access.yaml against the versions it names.

    Raises:
        RulesError: with the file, line and reason.
    """
    check = _Checker.read(path)
    data = check.data
    roles = _roles(check, data, versions)
    aliases = data.get("role_aliases") or {}
    if not isinstance(aliases, dict) or any(str(v) not in roles for v in aliases.values()):
        raise check.fail(["role_aliases"], "must map claim values to roles of `roles`")
    ranges, names = _locations(check, data)
    default_location = str(data.get("default_location") or "home")
    assumed = data.get("assumed_mbps") or {}
    if not isinstance(assumed, dict):
        raise check.fail(["assumed_mbps"], "must map locations to Mbit/s")
    cache = data.get("decision_cache_seconds", 300)
    if not isinstance(cache, int) or isinstance(cache, bool) or not 0 <= cache <= 86400:
        raise check.fail(["decision_cache_seconds"], f"{cache!r} must be an integer 0..86400")
    return AccessRules(
        matrix=_matrix(check, data, versions),
        roles=roles,
        role_aliases={str(k): str(v) for k, v in aliases.items()},
        locations=ranges,
        location_names=tuple(dict.fromkeys((*names, default_location))),
        default_location=default_location,
        assumed_mbps={
            str(k): float(_seconds(check, v, ["assumed_mbps", k]) or 0.0) for k, v in assumed.items()
        },
        budgets=_budgets(check, data, roles),
        status_rules=_status_rules(check, data),
        low_memory_gb=float(_seconds(check, data.get("low_memory_gb", 1), ["low_memory_gb"]) or 1.0),
        decision_cache_seconds=cache,
        reload_check_seconds=float(
            _seconds(check, data.get("reload_check_seconds", 5), ["reload_check_seconds"]) or 5.0
        ),
        source=str(path),
    )
