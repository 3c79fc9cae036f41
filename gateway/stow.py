"""STOW-RS (PS3.18 10.5): read parts, ingest each one, answer with the store response.

A part fails alone (FailedSOPSequence); the status is chosen once at the end: 200 all stored,
202 some failed, 409 all failed by their own fault, 503 when a fault of S3, Redis or the index
failed them all."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from flask import Blueprint, Response, request

from gateway import logs
from gateway.errors import (
    CANNOT_UNDERSTAND,
    PROCESSING_FAILURE,
    GatewayError,
    InstanceRejected,
    NotAcceptable,
    Unavailable,
    UnsupportedMediaType,
)
from gateway.http import authorize, dicomweb_root, services, settings
from gateway.ingest import Stored, ingest
from gateway.metrics import STORED_BYTES, STORED_INSTANCES
from gateway.multipart import Part, content_type_params, read_parts, read_single
from gateway.uids import check_uid
from policies.permissions import Action

log = logging.getLogger(__name__)
blueprint = Blueprint("stow", __name__)

DICOM = "application/dicom"
JSON = "application/dicom+json"
XML = "application/dicom+xml"


def _response_type() -> str:
    """dicom+json unless the client prefers XML (PS3.18 10.5.2: both are required of an origin server)."""
    accept = request.accept_mimetypes
    if not accept or accept.provided is False:
        return JSON
    best = accept.best_match([JSON, XML, "application/json"], default=None)
    if best is None:
        raise NotAcceptable(
            f"the store response is {JSON} or {XML}; Accept {request.headers['Accept']!r} allows neither"
        )
    return XML if best == XML else JSON


def _spool_dir() -> str:
    path = Path(settings().data_dir) / "spool"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _read_body(directory: str) -> list[Part]:
    media, params = content_type_params(request.headers.get("Content-Type", ""))
    limit = settings().max_stow_bytes
    if media == "multipart/related":
        part_type = params.get("type", DICOM).lower()
        if part_type != DICOM:
            raise UnsupportedMediaType(
                f'multipart/related type={part_type!r} is not supported; send type="{DICOM}" '
                "(the metadata-and-bulk-data form of STOW-RS is not implemented)"
            )
        boundary = params.get("boundary")
        if not boundary:
            from gateway.errors import MalformedRequest

            raise MalformedRequest("multipart/related Content-Type has no boundary parameter")
        return read_parts(request.stream, boundary, directory, limit)
    if media == DICOM:
        return [read_single(request.stream, directory, DICOM, limit)]
    raise UnsupportedMediaType(
        f'Content-Type {media or "(none)"!r} is not accepted; send multipart/related; type="{DICOM}" '
        f"or a single {DICOM} body"
    )


def _store(study_uid: str | None) -> Response:
    who = authorize(Action.STORE)
    if study_uid is not None:
        check_uid(study_uid, "StudyInstanceUID")
    response_type = _response_type()
    conn = services()
    stored: list[Stored] = []
    failed: list[tuple[str, str, int, str]] = []
    infrastructure_fault = False
    with tempfile.TemporaryDirectory(dir=_spool_dir()) as directory:
        parts = _read_body(directory)
        for part in parts:
            part_media, _ = content_type_params(part.content_type or DICOM)
            if part_media != DICOM:
                failed.append(("", "", CANNOT_UNDERSTAND, f"part Content-Type {part_media!r} is not {DICOM}"))
                continue
            try:
                stored.append(ingest(conn, part.path, part.sha256, part.size, study_uid))
                STORED_BYTES.inc(part.size)
            except InstanceRejected as rejected:
                failed.append((rejected.sop_class_uid, rejected.sop_uid, rejected.reason, rejected.detail))
            except Unavailable as fault:
                infrastructure_fault = True
                failed.append(("", "", PROCESSING_FAILURE, fault.detail))
            except GatewayError as error:
                failed.append(("", "", PROCESSING_FAILURE, error.detail))
            except Exception:  # one part must never fail the others
                log.exception("storing a part failed unexpectedly")
                failed.append(("", "", PROCESSING_FAILURE, "unexpected error while storing; see the log"))
            finally:
                part.discard()
    STORED_INSTANCES.labels("stored").inc(len(stored))
    STORED_INSTANCES.labels("failed").inc(len(failed))
    _refresh_series(conn, {(s.ref.study_uid, s.ref.series_uid) for s in stored if not s.duplicate})
    for item in stored:
        logs.audit(
            "store",
            who.subject,
            who.role,
            study=item.ref.study_uid,
            series=item.ref.series_uid,
            instance=item.ref.sop_uid,
            duplicate=item.duplicate,
        )
    return _render(stored, failed, infrastructure_fault, study_uid, response_type)


def _refresh_series(conn: object, touched: set[tuple[str, str]]) -> None:
    """Keep the per-series metadata documents current: one queued rebuild per series, shared by every
    request storing into it (rebuilding here made a series of N instances cost O(N^2)); a reader finds
    the document current or has it rebuilt (seriesdoc.load compares it with the index)."""
    from gateway.jobs import enqueue_series_refresh

    for study_uid, series_uid in sorted(touched):
        try:
            enqueue_series_refresh(conn.redis, study_uid, series_uid)  # type: ignore[attr-defined]
        except GatewayError as error:
            log.warning("series metadata of %s not queued for refresh: %s", series_uid, error.detail)


def _render(
    stored: list[Stored],
    failed: list[tuple[str, str, int, str]],
    infrastructure_fault: bool,
    study_uid: str | None,
    response_type: str,
) -> Response:
    from gateway.dicomjson import store_response

    document = store_response([(s.ref, s.sop_class_uid) for s in stored], failed, dicomweb_root(), study_uid)
    if not failed:
        status = 200
    elif stored:
        status = 202
    elif infrastructure_fault:
        status = 503
    else:
        status = 409
    if response_type == XML:
        from gateway.dicomxml import to_xml

        response = Response(to_xml(document), status=status, mimetype=XML)
    else:
        import json

        response = Response(json.dumps(document), status=status, mimetype=JSON)
    if infrastructure_fault:
        response.headers["Retry-After"] = "5"
    return response


@blueprint.post("/studies")
def store_instances() -> Response:
    return _store(None)


@blueprint.post("/studies/<study_uid>")
def store_study_instances(study_uid: str) -> Response:
    return _store(study_uid)
