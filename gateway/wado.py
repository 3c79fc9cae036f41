"""WADO-RS study, series and instance retrieve (PS3.18 10.4) with transfer-syntax negotiation, and the
exact received bytes at /api/.../original. Parts stream from the bucket one by one: never a study in memory.

Only the original is served until derived versions exist (issue 4 plugs them in as further offers)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Iterator

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue
from pydicom.uid import ExplicitVRLittleEndian

from gateway import accept, logs, retrieve, transcode
from gateway.accept import DICOM, Choice, MediaRange, Offer, Resource
from gateway.auth import Identity
from gateway.errors import Forbidden, GatewayError, NotAcceptable
from gateway.http import authorize, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.retrieve import StoredInstance
from gateway.storage import Bucket
from policies.permissions import Action

log = logging.getLogger(__name__)
blueprint = Blueprint("wado", __name__)
api_blueprint = Blueprint("wado_api", __name__)

VERSION = "original"
REASON = "the original is the only version available"
ORIGINAL_ROLES = frozenset({"radiologist", "admin"})


def offers(instance: StoredInstance) -> list[Offer]:
    """What can be sent of one instance, best first (PS3.18 8.7.3.5.1)."""
    syntax = instance.transfer_syntax
    if syntax in transcode.OFF_THE_WEB:
        # Implicit VR LE / Big Endian never go on the web: re-encoded, and that is "as stored" here.
        return [Offer(ExplicitVRLittleEndian, True, (DICOM,), True, "reencode")]
    found = [Offer(syntax, True, (DICOM,), True, "original")]
    if syntax != ExplicitVRLittleEndian and transcode.can_transcode(instance):
        found.append(Offer(ExplicitVRLittleEndian, False, (DICOM,), True, "transcode"))
    return found


def _plan(instances: list[StoredInstance], ranges: list[MediaRange], single: bool) -> list[Choice]:
    """One choice per instance, all made before the first byte is sent (a 406 cannot come later)."""
    choices: list[Choice] = []
    for instance in instances:
        candidates = offers(instance)
        choice = accept.select(ranges, candidates)
        if choice is not None and not single and not choice.multipart:
            choice = None  # a study or series is many objects: multipart/related only
        if choice is None:
            available = ", ".join(
                "transfer-syntax=*" if offer.stored else f"transfer-syntax={offer.transfer_syntax}"
                for offer in candidates
            )
            raise NotAcceptable(
                f"instance {instance.ref.sop_uid} is stored as {instance.transfer_syntax}; "
                f"Accept {accept.describe(ranges)!r} names nothing it can be sent as"
                f' (available as multipart/related; type="{DICOM}" with {available})'
            )
        choices.append(choice)
    return choices


def _check_version() -> None:
    wanted = request.args.get("version")
    if wanted and wanted != VERSION:
        raise NotAcceptable(
            f"version {wanted!r} is not available; only {VERSION!r} is served", parameter="version"
        )


def _body(bucket: Bucket, instance: StoredInstance, choice: Choice) -> Iterable[bytes]:
    """Opens the object (or reads and decodes its first frame) now: faults surface before any byte."""
    if choice.offer.label == "original":
        return retrieve.stream_object(bucket, instance.key)
    return transcode.explicit_le(bucket, instance)


def _lazy(bucket: Bucket, instance: StoredInstance, choice: Choice) -> Iterator[bytes]:
    """The same, deferred until the stream reaches this part."""
    try:
        yield from _body(bucket, instance, choice)
    except GatewayError as error:
        # Headers are gone: the only honest signal left is a truncated multipart body.
        log.warning("retrieve aborted at %s: %s", instance.ref.sop_uid, error.detail)
        raise


def _part_headers(instance: StoredInstance, choice: Choice) -> dict[str, str]:
    headers = {"Content-Type": choice.content_type}
    if choice.offer.label == "original":
        headers["Content-Length"] = str(instance.size)
    return headers


def multipart_length(parts: list[tuple[dict[str, str], int]], boundary: str) -> int:
    """Exact length of write_parts() output when every part's size is known."""
    total = len(f"--{boundary}--\r\n")
    for headers, size in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        total += len(f"--{boundary}\r\n") + len(head.encode("latin-1")) + 2 + size + 2
    return total


def served(response: Response) -> Response:
    response.headers["X-Served-Version"] = VERSION
    response.headers["X-Policy-Reason"] = REASON
    response.headers.add("Vary", "Accept")
    return response


def _respond(who: Identity, instances: list[StoredInstance], single_allowed: bool) -> Response:
    _check_version()
    ranges = accept.parse(request.headers.get("Accept"), Resource.INSTANCES)
    choices = _plan(instances, ranges, single_allowed)
    bucket = retrieve.originals(services())
    first = instances[0]
    logs.audit(
        "retrieve",
        who.subject,
        who.role,
        study=first.ref.study_uid,
        series=first.ref.series_uid if len({i.ref.series_uid for i in instances}) == 1 else None,
        instances=len(instances),
        version=VERSION,
    )
    if single_allowed and not choices[0].multipart:
        response = Response(
            _body(bucket, first, choices[0]), content_type=choices[0].content_type, direct_passthrough=True
        )
        if choices[0].offer.label == "original":
            response.headers["Content-Length"] = str(first.size)
        return served(response)
    boundary = new_boundary()
    parts: list[tuple[dict[str, str], Iterable[bytes]]] = [
        (_part_headers(first, choices[0]), _body(bucket, first, choices[0]))
    ]
    parts.extend(
        (_part_headers(instance, choice), _lazy(bucket, instance, choice))
        for instance, choice in zip(instances[1:], choices[1:], strict=True)
    )
    response = Response(
        write_parts(parts, boundary),
        content_type=related_content_type(boundary, choices[0].media_type),
        direct_passthrough=True,
    )
    if all(choice.offer.label == "original" for choice in choices):
        sized = [(_part_headers(i, c), i.size) for i, c in zip(instances, choices, strict=True)]
        response.headers["Content-Length"] = str(multipart_length(sized, boundary))
    return served(response)


@blueprint.get("/studies/<study_uid>")
def retrieve_study(study_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _respond(who, retrieve.find(services(), study_uid), single_allowed=False)


@blueprint.get("/studies/<study_uid>/series/<series_uid>")
def retrieve_series(study_uid: str, series_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _respond(who, retrieve.find(services(), study_uid, series_uid), single_allowed=False)


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>")
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _respond(who, [retrieve.one(services(), study_uid, series_uid, sop_uid)], single_allowed=True)


@api_blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/original")
def original(study_uid: str, series_uid: str, sop_uid: str) -> ResponseReturnValue:
    """The exact bytes received, whatever their transfer syntax (DESIGN.md: radiologist and admin)."""
    who = authorize(Action.RETRIEVE)
    if not who.roles & ORIGINAL_ROLES:
        raise Forbidden(f"role {who.role or 'none'} may not download originals; radiologist and admin may")
    instance = retrieve.one(services(), study_uid, series_uid, sop_uid)
    body = retrieve.stream_object(retrieve.originals(services()), instance.key)
    response = Response(
        body, content_type=f"{DICOM}; transfer-syntax={instance.transfer_syntax}", direct_passthrough=True
    )
    response.headers["Content-Length"] = str(instance.size)
    response.headers["Content-Disposition"] = f'attachment; filename="{instance.ref.sop_uid}.dcm"'
    response.headers["ETag"] = f'"{instance.sha256}"'
    digest = base64.b64encode(bytes.fromhex(instance.sha256)).decode()
    response.headers["Repr-Digest"] = f"sha-256=:{digest}:"
    logs.audit("original", who.subject, who.role, study=study_uid, instance=sop_uid, version=VERSION)
    return served(response)
