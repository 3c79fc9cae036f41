"""QIDO-RS blueprint (PS3.18 10.6): query.py parses the parameters, index/search.py runs them.

A search scoped to a study or series that does not exist answers like any search without matches
(204): the UIDs in the path act as matching keys (PS3.18 10.6.1.2), so nothing is "not found"."""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, request

from gateway import accept
from gateway.dicomxml import to_xml
from gateway.errors import NotAcceptable
from gateway.http import authorize, dicomweb_root, services
from gateway.index.db import session_scope
from gateway.index.search import SearchResult, search
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.query import Level, parse
from gateway.uids import check_uid
from policies.permissions import Action

blueprint = Blueprint("qido", __name__)

JSON = accept.DICOM_JSON
XML = accept.DICOM_XML
_PLUS_DECODED = re.compile(r"(?<=[a-z]) (?=(json|xml)\b)")


@blueprint.get("/studies")
def search_studies() -> Response:
    return _search(Level.STUDY)


@blueprint.get("/series")
def search_series() -> Response:
    return _search(Level.SERIES)


@blueprint.get("/instances")
def search_instances() -> Response:
    return _search(Level.INSTANCE)


@blueprint.get("/studies/<study>/series")
def search_study_series(study: str) -> Response:
    return _search(Level.SERIES, study)


@blueprint.get("/studies/<study>/instances")
def search_study_instances(study: str) -> Response:
    return _search(Level.INSTANCE, study)


@blueprint.get("/studies/<study>/series/<series>/instances")
def search_series_instances(study: str, series: str) -> Response:
    return _search(Level.INSTANCE, study, series)


def _search(level: Level, study: str | None = None, series: str | None = None) -> Response:
    authorize(Action.SEARCH)
    if study is not None:
        check_uid(study, "StudyInstanceUID")
    if series is not None:
        check_uid(series, "SeriesInstanceUID")
    representation = _representation()
    query = parse(level, request.args, study_uid=study, series_uid=series)
    root = dicomweb_root()
    with session_scope(services().sessions) as session:
        result = search(session, query, root)
    response = _render(result, representation)
    warnings = list(query.warnings)
    if result.cut:
        warnings.append("There are additional results that can be requested")
    for text in warnings:  # PS3.18 8.3.4.x: Warning: 299 {+SERVICE}: <text>
        response.headers.add("Warning", f"299 {root}: {text}")
    return response


def _representation() -> str:
    """JSON or XML from Accept, or from the `accept` query parameter, which overrides it (PS3.18 8.3.3.1).

    Search results take the representations of metadata (PS3.18 10.6.3.1): application/dicom+json
    (also for application/json and */*), or XML as multipart/related, one part per result; a bare
    application/dicom+xml is taken to mean the same.

    Raises:
        NotAcceptable: nothing acceptable is one of those.
    """
    raw = request.args.get("accept")
    if raw is not None:
        raw = _PLUS_DECODED.sub("+", raw)  # an unencoded '+' in the query string arrives as a space
    else:
        raw = request.headers.get("Accept")
    try:
        chosen = accept.metadata_format(accept.parse(raw, accept.Resource.METADATA))
    except NotAcceptable:
        chosen = None
    if chosen is None:
        raise NotAcceptable(
            f'search results are {JSON} or multipart/related; type="{XML}"; Accept {(raw or "")[:200]!r} '
            "allows neither"
        )
    return chosen


def _render(result: SearchResult, representation: str) -> Response:
    if not result.datasets:
        return Response(status=204)  # PS3.18 8.3.4.4.1: no matches (CP-2473 may make this a 200)
    if representation == JSON:
        body = json.dumps(result.datasets, separators=(",", ":"), ensure_ascii=False).encode()
        return Response(body, status=200, content_type=JSON)
    boundary = new_boundary()
    parts = (({"Content-Type": XML}, [to_xml(dataset)]) for dataset in result.datasets)
    return Response(
        b"".join(write_parts(parts, boundary)), status=200, content_type=related_content_type(boundary, XML)
    )
