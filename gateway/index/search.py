"""Run a parsed QIDO query against the index and return DICOM JSON datasets (PS3.18 10.6.3).

Matching is identical on SQLite and PostgreSQL: case-sensitive, except person names, which are compared
upper-cased against the *_norm / *_words columns. One statement finds the page (limit + 1 rows, to know
whether results were cut); counts and modalities are one grouped query per page, never one per row."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select, true
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session

from gateway.dicomjson import BULK_TOKEN
from gateway.errors import IndexUnavailable
from gateway.index.models import Instance, Series, Study
from gateway.query import Criterion, Kind, Level, Query, Term, glob_pattern, like_pattern, name_tokens, vr_of

# Query keys -> columns. Person names are matched on their upper-cased copies (norm, words).
COLUMNS: dict[str, InstrumentedAttribute[Any]] = {
    "0020000D": Study.study_uid,
    "00100020": Study.patient_id,
    "00100030": Study.patient_birth_date,
    "00100040": Study.patient_sex,
    "00080020": Study.study_date,
    "00080030": Study.study_time,
    "00080050": Study.accession_number,
    "00081030": Study.study_description,
    "00200010": Study.study_id,
    "0020000E": Series.series_uid,
    "00080060": Series.modality,
    "00200011": Series.series_number,
    "0008103E": Series.series_description,
    "00080021": Series.series_date,
    "00080031": Series.series_time,
    "00180015": Series.body_part_examined,
    "00400244": Series.pps_start_date,
    "00400245": Series.pps_start_time,
    "00080018": Instance.sop_uid,
    "00080016": Instance.sop_class_uid,
    "00200013": Instance.instance_number,
    "00280010": Instance.rows,
    "00280011": Instance.columns,
    "00280100": Instance.bits_allocated,
    "00280008": Instance.number_of_frames,
}
NAMES: dict[str, tuple[InstrumentedAttribute[Any], InstrumentedAttribute[Any]]] = {
    "00100010": (Study.patient_name_norm, Study.patient_name_words),
    "00080090": (Study.referring_physician_name_norm, Study.referring_physician_name_words),
}
MODALITIES_IN_STUDY = "00080061"
SOP_CLASSES_IN_STUDY = "00080062"
STUDY_SERIES = "00201206"
STUDY_INSTANCES = "00201208"
SERIES_INSTANCES = "00201209"
_STUDY_COMPUTED = {MODALITIES_IN_STUDY, SOP_CLASSES_IN_STUDY, STUDY_SERIES, STUDY_INSTANCES}

# PS3.18 Tables 10.6.3-3/-4/-5 (plus Study Description, which every viewer's study list shows),
# as (tag, column name or None when the value only comes from the stored attributes).
_STUDY_DEFAULTS = (
    ("00080005", None),
    ("00080020", "study_date"),
    ("00080030", "study_time"),
    ("00080050", "accession_number"),
    ("00080090", "referring_physician_name"),
    ("00080201", None),
    ("00081030", "study_description"),
    ("00100010", "patient_name"),
    ("00100020", "patient_id"),
    ("00100030", "patient_birth_date"),
    ("00100040", "patient_sex"),
    ("0020000D", "study_uid"),
    ("00200010", "study_id"),
)
_SERIES_DEFAULTS = (
    ("00080005", None),
    ("00080060", "modality"),
    ("00080201", None),
    ("0008103E", "series_description"),
    ("0020000D", "study_uid"),
    ("0020000E", "series_uid"),
    ("00200011", "series_number"),
    ("00400244", "pps_start_date"),
    ("00400245", "pps_start_time"),
    ("00400275", None),
)
_INSTANCE_DEFAULTS = (
    ("00080005", None),
    ("00080016", "sop_class_uid"),
    ("00080018", "sop_uid"),
    ("00080201", None),
    ("0020000D", "study_uid"),
    ("0020000E", "series_uid"),
    ("00200013", "instance_number"),
    ("00280010", "rows"),
    ("00280011", "columns"),
    ("00280100", "bits_allocated"),
    ("00280008", "number_of_frames"),
)
# Stored attributes only returned when present (no empty element when the instance had none).
_OPTIONAL = {"00080005", "00080201", "00400275"}


@dataclass(frozen=True)
class SearchResult:
    datasets: list[dict[str, Any]]
    cut: bool  # more results exist after this page


def search(session: Session, query: Query, dicomweb_root: str) -> SearchResult:
    """Run `query`; RetrieveURL and BulkDataURI values are made absolute under `dicomweb_root`.

    Raises:
        IndexUnavailable: the database failed.
    """
    try:
        return _Search(session, query, dicomweb_root).run()
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"index search failed: {type(exc).__name__}") from exc


# --- matching -----------------------------------------------------------------------------------------


def _pattern(column: Any, value: str, dialect: str) -> ColumnElement[bool]:
    """Case-sensitive wildcard match: SQLite's LIKE ignores ASCII case, so SQLite uses GLOB."""
    if dialect == "sqlite":
        return column.op("GLOB")(glob_pattern(value))
    return column.like(like_pattern(value), escape="\\")


def _binary(column: Any, dialect: str) -> Any:
    """Code-point order for range comparisons (PostgreSQL's default collation may skip punctuation)."""
    return column.collate("C") if dialect == "postgresql" else column


def _range(column: Any, vr: str, low: str | None, high: str | None, dialect: str) -> ColumnElement[bool]:
    column = _binary(column, dialect)
    conditions = [column.is_not(None)]
    if low:
        conditions.append(column >= low)
    if high:
        # A TM / DT bound covers its whole precision: -1200 includes 12:00:59 (PS3.4 C.2.2.2.5).
        conditions.append(column <= (high + "~" if vr in ("TM", "DT") else high))
    return and_(*conditions)


def _term(column: Any, vr: str, term: Term, dialect: str) -> ColumnElement[bool]:
    if term.kind is Kind.RANGE:
        return _range(column, vr, term.low, term.high, dialect)
    if term.kind is Kind.WILDCARD:
        return _pattern(column, term.value, dialect)
    if vr in ("TM", "DT"):
        return _range(column, vr, term.value, term.value, dialect)
    if column.type.python_type is int:
        return column == int(term.value)
    return column == term.value


def _name_term(tag: str, term: Term, dialect: str) -> ColumnElement[bool]:
    norm, words = NAMES[tag]
    if term.kind is Kind.FUZZY:
        # Each query token is the prefix of some name component; words look like ' SMITH JOHN '.
        tokens = name_tokens(term.value)
        return and_(true(), *(_pattern(words, f"* {token}*", dialect) for token in tokens))
    if term.kind is Kind.WILDCARD:
        return _pattern(norm, term.value, dialect)
    # PS3.5 6.2: trailing empty components are insignificant ('DOE^JOHN' == 'DOE^JOHN^^').
    return norm.in_([term.value + "^" * n for n in range(5)])


def _condition(criterion: Criterion, dialect: str) -> ColumnElement[bool]:
    tag, vr = criterion.tag, criterion.vr
    if tag == MODALITIES_IN_STUDY:
        other = Series.__table__.alias("modalities")
        terms = or_(*(_term(other.c.modality, vr, t, dialect) for t in criterion.terms))
        return exists().where(other.c.study_uid == Study.study_uid, terms)
    if tag == SOP_CLASSES_IN_STUDY:
        other = Instance.__table__.alias("sop_classes")
        terms = or_(*(_term(other.c.sop_class_uid, vr, t, dialect) for t in criterion.terms))
        return exists().where(other.c.study_uid == Study.study_uid, terms)
    if tag in NAMES:
        return or_(*(_name_term(tag, t, dialect) for t in criterion.terms))
    return or_(*(_term(COLUMNS[tag], vr, t, dialect) for t in criterion.terms))


# --- DICOM JSON ---------------------------------------------------------------------------------------


def _element(tag: str, value: Any) -> dict[str, Any]:
    vr = vr_of(tag)
    if value is None or value == "" or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        values = [{"Alphabetic": v} for v in values]
    return {"vr": vr, "Value": values}


def _loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _defaults(
    row: dict[str, Any], table: Sequence[tuple[str, str | None]], attributes: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The level's default attributes: as stored when the attributes have them, else from the columns."""
    out: dict[str, Any] = {}
    for tag, column in table:
        stored = next((a[tag] for a in attributes if tag in a), None)
        if stored is not None:
            out[tag] = stored
        elif column is not None:
            out[tag] = _element(tag, row[column])
        elif tag not in _OPTIONAL:
            out[tag] = {"vr": vr_of(tag)}
    return out


def _columns(table: Any, prefix: str, skip: Iterable[str] = ()) -> list[Any]:
    return [c.label(prefix + c.name) for c in table.columns if c.name not in skip]


def _part(row: Any, prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in row.items() if key.startswith(prefix)}


class _Search:
    def __init__(self, session: Session, query: Query, root: str) -> None:
        self.session = session
        self.query = query
        self.root = root
        self.dialect = session.get_bind().dialect.name

    def run(self) -> SearchResult:
        query = self.query
        statement = self._statement().limit(query.limit + 1).offset(query.offset)
        rows = [dict(row) for row in self.session.execute(statement).mappings()]
        cut = len(rows) > query.limit
        rows = rows[: query.limit]
        if not rows:
            return SearchResult([], cut)
        datasets = self._datasets(rows)
        return SearchResult([dict(sorted(d.items())) for d in datasets], cut)

    # statement

    def _statement(self) -> Select[Any]:
        query = self.query
        studies, series, instances = Study.__table__, Series.__table__, Instance.__table__
        if query.level is Level.STUDY:
            statement = select(*_columns(studies, "st_"))
            order: list[Any] = [
                Study.study_date.desc().nulls_last(),
                Study.study_time.desc().nulls_last(),
                Study.study_uid,
            ]
        elif query.level is Level.SERIES:
            statement = select(*_columns(series, "se_"), *_columns(studies, "st_")).select_from(
                series.join(studies, Series.study_uid == Study.study_uid)
            )
            order = [Series.series_number.asc().nulls_last(), Series.series_uid]
            if not query.study_uid:
                order = [Study.study_date.desc().nulls_last(), Study.study_uid, *order]
        else:
            statement = select(
                *_columns(instances, "in_", skip=("metadata_gz", "pixel_layout")),
                *_columns(series, "se_"),
                *_columns(studies, "st_"),
            ).select_from(
                instances.join(series, Instance.series_uid == Series.series_uid).join(
                    studies, Instance.study_uid == Study.study_uid
                )
            )
            order = [Instance.instance_number.asc().nulls_last(), Instance.sop_uid]
            if not query.series_uid:
                order = [Series.series_number.asc().nulls_last(), Series.series_uid, *order]
            if not query.study_uid:
                order = [Study.study_date.desc().nulls_last(), Study.study_uid, *order]
        scope = {Level.STUDY: Study, Level.SERIES: Series, Level.INSTANCE: Instance}[query.level]
        if query.study_uid:
            statement = statement.where(scope.study_uid == query.study_uid)
        if query.series_uid:
            statement = statement.where(Instance.series_uid == query.series_uid)
        for criterion in query.criteria:
            statement = statement.where(_condition(criterion, self.dialect))
        return statement.order_by(*order)

    # aggregates: one grouped query per page

    def _study_aggregates(self, study_uids: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"series": 0, "instances": 0, "modalities": [], "sop_classes": []}
        )
        series_rows = self.session.execute(
            select(Series.study_uid, Series.modality, func.count())
            .where(Series.study_uid.in_(study_uids))
            .group_by(Series.study_uid, Series.modality)
        )
        for study_uid, modality, count in series_rows:
            found[study_uid]["series"] += count
            if modality:
                found[study_uid]["modalities"].append(modality)
        instance_rows = self.session.execute(
            select(Instance.study_uid, Instance.sop_class_uid, func.count())
            .where(Instance.study_uid.in_(study_uids))
            .group_by(Instance.study_uid, Instance.sop_class_uid)
        )
        for study_uid, sop_class, count in instance_rows:
            found[study_uid]["instances"] += count
            found[study_uid]["sop_classes"].append(sop_class)
        return found

    def _series_counts(self, series_uids: list[str]) -> dict[str, int]:
        rows = self.session.execute(
            select(Instance.series_uid, func.count())
            .where(Instance.series_uid.in_(series_uids))
            .group_by(Instance.series_uid)
        )
        return {series_uid: count for series_uid, count in rows}

    def _metadata(self, sop_uids: list[str]) -> dict[str, dict[str, Any]]:
        rows = self.session.execute(
            select(Instance.sop_uid, Instance.metadata_gz).where(Instance.sop_uid.in_(sop_uids))
        )
        token = json.dumps(BULK_TOKEN)[1:-1].encode()
        root = json.dumps(self.root)[1:-1].encode()
        return {sop: json.loads(gzip.decompress(raw).replace(token, root)) for sop, raw in rows}

    # datasets

    def _wants(self, *tags: str) -> bool:
        return self.query.include_all or any(tag in self.query.include for tag in tags)

    def _datasets(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        query = self.query
        studies = [_part(row, "st_") for row in rows]
        series = [_part(row, "se_") for row in rows] if query.level is not Level.STUDY else []
        instances = [_part(row, "in_") for row in rows] if query.level is Level.INSTANCE else []
        study_attrs = [_loads(s["attributes"]) for s in studies]
        series_attrs = [_loads(s["attributes"]) for s in series]

        datasets: list[dict[str, Any]] = [{} for _ in rows]
        wide = query.level is Level.STUDY or not query.study_uid
        for i, study in enumerate(studies):
            if wide:
                datasets[i].update(_defaults(study, _STUDY_DEFAULTS, [study_attrs[i]]))
        if series and (query.level is Level.SERIES or not query.series_uid):
            for i, one in enumerate(series):
                datasets[i].update(_defaults(one, _SERIES_DEFAULTS, [series_attrs[i], study_attrs[i]]))
        for i, one in enumerate(instances):
            datasets[i].update(_defaults(one, _INSTANCE_DEFAULTS, [series_attrs[i], study_attrs[i]]))

        self._computed(datasets, studies, series)
        for i, dataset in enumerate(datasets):
            study_uid = studies[i]["study_uid"]
            url = f"{self.root}/studies/{study_uid}"
            if series:
                url += f"/series/{series[i]['series_uid']}"
            if instances:
                url += f"/instances/{instances[i]['sop_uid']}"
            dataset["00081190"] = {"vr": "UR", "Value": [url]}
            if query.level is not Level.SERIES:
                dataset["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        self._included(datasets, study_attrs, series_attrs, instances)
        return datasets

    def _computed(
        self, datasets: list[dict[str, Any]], studies: list[dict[str, Any]], series: list[dict[str, Any]]
    ) -> None:
        level = self.query.level
        if level is Level.STUDY or self._wants(*_STUDY_COMPUTED):
            aggregates = self._study_aggregates(sorted({s["study_uid"] for s in studies}))
            for dataset, study in zip(datasets, studies, strict=True):
                found = aggregates[study["study_uid"]]
                values = {
                    STUDY_SERIES: found["series"],
                    STUDY_INSTANCES: found["instances"],
                    MODALITIES_IN_STUDY: sorted(found["modalities"]),
                    SOP_CLASSES_IN_STUDY: sorted(found["sop_classes"]),
                }
                for tag, value in values.items():
                    default = level is Level.STUDY and tag != SOP_CLASSES_IN_STUDY
                    if default or self._wants(tag):
                        dataset[tag] = _element(tag, value)
        if level is Level.SERIES or (series and self._wants(SERIES_INSTANCES)):
            counts = self._series_counts(sorted({s["series_uid"] for s in series}))
            for dataset, one in zip(datasets, series, strict=True):
                dataset[SERIES_INSTANCES] = _element(SERIES_INSTANCES, counts.get(one["series_uid"], 0))

    def _included(
        self,
        datasets: list[dict[str, Any]],
        study_attrs: list[dict[str, Any]],
        series_attrs: list[dict[str, Any]],
        instances: list[dict[str, Any]],
    ) -> None:
        """includefield (and query keys): from the stored attributes, at instance level from the metadata."""
        query = self.query
        if not query.include and not query.include_all:
            return
        missing: list[int] = []
        for i, dataset in enumerate(datasets):
            sources = ([series_attrs[i]] if series_attrs else []) + [study_attrs[i]]
            if query.include_all and query.level is not Level.INSTANCE:
                for tag, value in sources[0].items():
                    dataset.setdefault(tag, value)
            for tag in query.include:
                if tag in dataset:
                    continue
                stored = next((a[tag] for a in sources if tag in a), None)
                if stored is not None:
                    dataset[tag] = stored
                elif instances:
                    missing.append(i)
        if instances and (missing or query.include_all):
            rows = sorted(set(missing)) if not query.include_all else range(len(datasets))
            metadata = self._metadata([instances[i]["sop_uid"] for i in rows])
            for i in rows:
                document = metadata.get(instances[i]["sop_uid"], {})
                tags = document.keys() if query.include_all else query.include
                for tag in tags:
                    if tag not in datasets[i] and tag in document:
                        datasets[i][tag] = document[tag]
