"""QIDO-RS parameters -> a typed Query (PS3.18 8.3.4; matching PS3.4 C.2.2.2). Pure: no Flask, no SQL."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword

from gateway.errors import InvalidParameter
from gateway.uids import is_valid_uid

MAX_RESULTS = 1000


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}


class Kind(StrEnum):
    EQUAL = "equal"  # single value matching
    WILDCARD = "wildcard"  # '*' and '?' (PS3.4 C.2.2.2.4)
    RANGE = "range"  # DA / TM / DT range, either end may be open (PS3.4 C.2.2.2.5)
    FUZZY = "fuzzy"  # PN with fuzzymatching=true: each token a prefix of some name component


@dataclass(frozen=True)
class Term:
    """One alternative of a criterion; PN values are already upper-cased (matching is case-insensitive)."""

    kind: Kind
    value: str = ""
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True)
class Criterion:
    """An attribute to match: it matches when any of its terms does (UID lists, backslash lists)."""

    tag: str
    keyword: str
    vr: str
    level: Level
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class Query:
    level: Level
    study_uid: str | None = None
    series_uid: str | None = None
    criteria: tuple[Criterion, ...] = ()
    fuzzy: bool = False
    limit: int = MAX_RESULTS
    offset: int = 0
    include_all: bool = False
    # Tags to return beyond the level's defaults: includefield values and every query key (PS3.18 8.3.4.3).
    include: tuple[str, ...] = ()
    # Texts for Warning: 299 headers (ignored attributes, a capped limit).
    warnings: tuple[str, ...] = ()

    def criterion(self, tag: str) -> Criterion | None:
        return next((c for c in self.criteria if c.tag == tag), None)


# Attributes the index can match, by the level they belong to. Patient attributes count as study
# attributes (Study Root model). Computed attributes 00080061 / 00080062 are matched through the children.
MATCHABLE: dict[str, Level] = {
    "0020000D": Level.STUDY,  # StudyInstanceUID
    "00100010": Level.STUDY,  # PatientName
    "00100020": Level.STUDY,  # PatientID
    "00100030": Level.STUDY,  # PatientBirthDate
    "00100040": Level.STUDY,  # PatientSex
    "00080020": Level.STUDY,  # StudyDate
    "00080030": Level.STUDY,  # StudyTime
    "00080050": Level.STUDY,  # AccessionNumber
    "00080090": Level.STUDY,  # ReferringPhysicianName
    "00081030": Level.STUDY,  # StudyDescription
    "00200010": Level.STUDY,  # StudyID
    "00080061": Level.STUDY,  # ModalitiesInStudy
    "00080062": Level.STUDY,  # SOPClassesInStudy
    "0020000E": Level.SERIES,  # SeriesInstanceUID
    "00080060": Level.SERIES,  # Modality
    "00200011": Level.SERIES,  # SeriesNumber
    "0008103E": Level.SERIES,  # SeriesDescription
    "00080021": Level.SERIES,  # SeriesDate
    "00080031": Level.SERIES,  # SeriesTime
    "00180015": Level.SERIES,  # BodyPartExamined
    "00400244": Level.SERIES,  # PerformedProcedureStepStartDate
    "00400245": Level.SERIES,  # PerformedProcedureStepStartTime
    "00080018": Level.INSTANCE,  # SOPInstanceUID
    "00080016": Level.INSTANCE,  # SOPClassUID
    "00200013": Level.INSTANCE,  # InstanceNumber
    "00280010": Level.INSTANCE,  # Rows
    "00280011": Level.INSTANCE,  # Columns
    "00280100": Level.INSTANCE,  # BitsAllocated
    "00280008": Level.INSTANCE,  # NumberOfFrames
}

# Parameters that are not attributes: handled here, or by the HTTP layer (accept, charset: PS3.18 8.3.3).
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}
_TRANSPORT = {"accept", "charset"}

_INTEGER_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV"}
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_COMMA_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?$")
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_NAME_SEPARATORS = re.compile(r"[\^= ]+")


def attribute_tag(name: str) -> str | None:
    """'PatientName', '00100010' or '0010,0010' -> '00100010'; None when it names no attribute."""
    if _HEX_TAG.match(name):
        return name.upper()
    match = _COMMA_TAG.match(name)
    if match:
        return (match.group(1) + match.group(2)).upper()
    tag = tag_for_keyword(name)
    return None if tag is None else f"{tag:08X}"


def _path(name: str, parameter: str) -> tuple[str, ...]:
    """An attribute or a sequence path ('00400275.00400009'), as tags; unknown names are a 400."""
    tags = []
    for part in name.split("."):
        tag = attribute_tag(part)
        if tag is None:
            raise InvalidParameter(
                f"{parameter!r}: {part!r} is neither a DICOM keyword nor an 8-digit hex tag",
                parameter=parameter,
            )
        tags.append(tag)
    return tuple(tags)


@lru_cache(maxsize=4096)
def vr_of(tag: str) -> str:
    """Dictionary VR; the first choice for 'US or SS'; 'UN' for private and unknown tags."""
    number = int(tag, 16)
    if not dictionary_has_tag(number):
        return "UN"
    return dictionary_VR(number).split(" or ")[0]


@lru_cache(maxsize=4096)
def keyword_of(tag: str) -> str:
    number = int(tag, 16)
    return keyword_for_tag(number) if dictionary_has_tag(number) else ""


def name_tokens(value: str) -> tuple[str, ...]:
    """Name components of a PN query value, for fuzzy matching ('SMITH^JO' -> ('SMITH', 'JO'))."""
    return tuple(token for token in _NAME_SEPARATORS.split(value) if token)


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as a SQL LIKE pattern with ESCAPE '\\': '%' and '_' stay literal."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern (case-sensitive); '[' is made literal."""
    return value.replace("[", "[[]")


def _pairs(args: Any) -> Iterable[tuple[str, list[str]]]:
    """(name, values) from a werkzeug MultiDict (repeated keys kept) or a plain mapping."""
    if hasattr(args, "lists"):
        return list(args.lists())
    assert isinstance(args, Mapping)
    return [(k, [v] if isinstance(v, str) else list(v)) for k, v in args.items()]


def _integer(parameter: str, values: list[str]) -> int:
    raw = values[-1].strip()
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidParameter(f"{parameter}={raw!r} is not a non-negative integer", parameter=parameter)
    return int(raw)


def _boolean(parameter: str, values: list[str]) -> bool:
    raw = values[-1].strip().lower()
    if raw not in ("true", "false"):
        raise InvalidParameter(f"{parameter}={raw!r} must be true or false", parameter=parameter)
    return raw == "true"


def _check_date(value: str, parameter: str) -> None:
    ok = _DA.match(value) is not None
    try:
        ok = ok and date(int(value[:4]), int(value[4:6]), int(value[6:])) is not None
    except ValueError:
        ok = False
    if not ok:
        raise InvalidParameter(f"{parameter}: {value!r} is not a date (YYYYMMDD)", parameter=parameter)


def _check_temporal(vr: str, value: str, parameter: str) -> None:
    if vr == "DA":
        _check_date(value, parameter)
    elif vr == "TM" and not _TM.match(value):
        raise InvalidParameter(f"{parameter}: {value!r} is not a time (HHMMSS.FFFFFF)", parameter=parameter)
    elif vr == "DT" and not _DT.match(value):
        raise InvalidParameter(f"{parameter}: {value!r} is not a date-time", parameter=parameter)


def _range_term(vr: str, item: str, parameter: str) -> Term:
    """'a-b', 'a-', '-b' (PS3.4 C.2.2.2.5); a DT offset's '-' is told apart by trying each split."""
    splits = [i for i, char in enumerate(item) if char == "-"]
    for i in splits:
        low, high = item[:i], item[i + 1 :]
        if not low and not high:
            break
        try:
            for end in (low, high):
                if end:
                    _check_temporal(vr, end, parameter)
        except InvalidParameter:
            if vr == "DT":
                continue
            raise
        if low and high and low > high:
            raise InvalidParameter(f"{parameter}: range {item!r} ends before it starts", parameter=parameter)
        return Term(Kind.RANGE, low=low or None, high=high or None)
    raise InvalidParameter(f"{parameter}: {item!r} is not a {vr} range", parameter=parameter)


def _term(vr: str, item: str, parameter: str, fuzzy: bool) -> Term:
    has_wildcard = "*" in item or "?" in item
    if vr == "UI":
        if not is_valid_uid(item):
            raise InvalidParameter(f"{parameter}: {item[:80]!r} is not a valid UID", parameter=parameter)
        return Term(Kind.EQUAL, item)
    if vr in ("DA", "TM", "DT"):
        if vr == "DT" and _DT.match(item):
            return Term(Kind.EQUAL, item)
        if "-" in item:
            return _range_term(vr, item, parameter)
        _check_temporal(vr, item, parameter)
        return Term(Kind.EQUAL, item)
    if vr in _INTEGER_VRS:
        try:
            return Term(Kind.EQUAL, str(int(item)))
        except ValueError:
            raise InvalidParameter(f"{parameter}: {item!r} is not an integer", parameter=parameter) from None
    if vr == "PN":
        item = item.upper()
        if fuzzy:
            return Term(Kind.FUZZY, item)
    return Term(Kind.WILDCARD if has_wildcard else Kind.EQUAL, item)


def _split(vr: str, values: list[str]) -> list[str]:
    """Repeated keys, backslash lists (OHIF) and, for UIDs and CS, comma lists (PS3.18 8.3.4.1)."""
    items: list[str] = []
    for value in values:
        if vr in ("UI", "CS"):
            value = value.replace(",", "\\")
        items.extend(item.strip() for item in value.split("\\"))
    if vr == "UI" and len(items) > 1:
        items = [item for item in items if item]  # tolerate a trailing separator in a UID list
    if vr == "PN":
        # The index keeps the alphabetic group; trailing empty components are insignificant (PS3.5 6.2).
        items = [item.split("=")[0].rstrip("^ ") for item in items]
    return items


def _criterion(
    tag: str, keyword: str, level: Level, values: list[str], parameter: str, fuzzy: bool
) -> Criterion | None:
    """The criterion for one attribute, or None for universal matching ('' or '*')."""
    vr = vr_of(tag)
    items = _split(vr, values)
    if any(item in ("", "*") for item in items) or not items:
        return None
    terms = tuple(dict.fromkeys(_term(vr, item, parameter, fuzzy) for item in items))
    return Criterion(tag, keyword, vr, level, terms)


def _includes(values: list[str]) -> tuple[bool, list[str]]:
    include_all = False
    tags: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "all":
                include_all = True
            else:
                tags.append(_path(item, "includefield")[0])
    return include_all, tags


def parse(
    level: Level,
    args: Any,
    study_uid: str | None = None,
    series_uid: str | None = None,
    max_results: int = MAX_RESULTS,
) -> Query:
    """Parse percent-decoded parameters (a MultiDict or mapping) for a search at `level`.

    Raises:
        InvalidParameter: an unknown parameter name, or a value its attribute cannot take; `parameter`
        names it.
    """
    pairs = list(_pairs(args))
    controls = {name.lower(): values for name, values in pairs if name.lower() in _CONTROL}
    fuzzy = _boolean("fuzzymatching", controls["fuzzymatching"]) if "fuzzymatching" in controls else False
    warnings: list[str] = []
    limit = max_results
    if "limit" in controls:
        limit = _integer("limit", controls["limit"]) or max_results  # limit=0: no client limit
        if limit > max_results:
            warnings.append(f"limit={limit} exceeds the maximum; at most {max_results} results are returned")
            limit = max_results
    offset = _integer("offset", controls["offset"]) if "offset" in controls else 0
    include_all, include = _includes(controls.get("includefield", []))

    criteria: dict[str, Criterion] = {}
    grouped: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    for name, values in pairs:
        if name.lower() in _CONTROL or name.lower() in _TRANSPORT:
            continue
        path = _path(name, name)
        grouped.setdefault(path, (name, []))[1].extend(values)

    ignored: list[str] = []
    for path, (name, values) in grouped.items():
        tag = path[0]
        include.append(tag)
        attribute_level = MATCHABLE.get(tag)
        # Validated even when it cannot be matched: a malformed value is the client's error either way.
        criterion = _criterion(path[-1], keyword_of(tag), attribute_level or level, values, name, fuzzy)
        if len(path) > 1 or attribute_level is None or attribute_level.depth > level.depth:
            if criterion is not None:
                ignored.append(name)
        elif criterion is not None:
            criteria[tag] = criterion
    if ignored:
        warnings.append(
            f"The following attributes are not supported for matching at the {level} level and were "
            f"ignored: {', '.join(ignored)}"
        )
    return Query(
        level=level,
        study_uid=study_uid,
        series_uid=series_uid,
        criteria=tuple(criteria.values()),
        fuzzy=fuzzy,
        limit=limit,
        offset=offset,
        include_all=include_all,
        include=tuple(dict.fromkeys(include)),
        warnings=tuple(warnings),
    )
