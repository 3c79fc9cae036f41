"""WADO-RS study, series and instance retrieve (PS3.18 10.4) with transfer-syntax negotiation, and the
exact received bytes at /api/.../original. Parts stream from the bucket one by one: never a study in memory.

The version comes from gateway.selection (vendor parameters, Accept); each instance is then sent as
stored (its version's bytes), re-encoded on the fly into the syntax the client accepts, or, with
`resolution=`, as a derived reduced-resolution instance (gateway.resolution)."""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLosslessRPCL

from gateway import accept, logs, resolution, retrieve, selection, transcode
from gateway.accept import DICOM, Choice, MediaRange, Offer, Resource
from gateway.auth import Identity
from gateway.connections import Connections
from gateway.errors import Forbidden, GatewayError, NotAcceptable
from gateway.http import authorize, client_profile, metered, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.pixels import PixelModule
from gateway.retrieve import StoredInstance
from gateway.selection import Selection, Source
from policies.permissions import Action

log = logging.getLogger(__name__)
blueprint = Blueprint("wado", __name__)
api_blueprint = Blueprint("wado_api", __name__)

ORIGINAL_ROLES = frozenset({"radiologist", "admin"})


def offers(instance: StoredInstance) -> list[Offer]:
    """What can be sent of one stored object, best first (PS3.18 8.7.3.5.1): as stored, the same
    bytes under another valid name, Explicit VR LE, then every syntax made on the fly."""
    syntax = instance.transfer_syntax
    if syntax in transcode.OFF_THE_WEB:
        # Implicit VR LE / Big Endian never go on the web: re-encoded, and that is "as stored" here.
        found = [Offer(ExplicitVRLittleEndian, True, (DICOM,), True, "reencode")]
    else:
        found = [Offer(syntax, True, (DICOM,), True, "stored")]
    if instance.layout is None:  # no pixel data: any syntax is only a File Meta change
        found += [
            Offer(
                target, False, (DICOM,), True, "transcode" if target == ExplicitVRLittleEndian else "relabel"
            )
            for target in (ExplicitVRLittleEndian, *transcode.ENCODABLE)
            if target != found[0].transfer_syntax
        ]
        return found
    found += [
        Offer(target, False, (DICOM,), True, "relabel") for target in transcode.SAME_BYTES.get(syntax, ())
    ]
    if not transcode.can_transcode(instance):
        return found
    if found[0].transfer_syntax != ExplicitVRLittleEndian:
        found.append(Offer(ExplicitVRLittleEndian, False, (DICOM,), True, "transcode"))
    offered = {offer.transfer_syntax for offer in found}
    found += [Offer(t, False, (DICOM,), True, "encode") for t in transcode.ENCODABLE if t not in offered]
    return found


def _plan(
    objects: list[StoredInstance],
    ranges: list[MediaRange],
    single: bool,
    pixel_module: Callable[[StoredInstance], PixelModule | None],
) -> list[Choice]:
    """One choice per object, all made before the first byte is sent (a 406 cannot come later).
    An encoding the image cannot take (JPEG baseline for 16 bits) is struck off and the client's
    next preference tried; the 406 names each such reason."""
    choices: list[Choice] = []
    for instance in objects:
        candidates = offers(instance)
        refused: list[str] = []
        while True:
            choice = accept.select(ranges, candidates)
            if choice is not None and not single and not choice.multipart:
                choice = None  # a study or series is many objects: multipart/related only
            if choice is None or choice.offer.label != "encode":
                break
            why = transcode.refusal(pixel_module(instance), choice.offer.transfer_syntax)
            if why is None:
                break
            refused.append(why)
            candidates.remove(choice.offer)
        if choice is None:
            raise NotAcceptable(_unacceptable(instance, ranges, candidates, refused))
        choices.append(choice)
    return choices


def _unacceptable(
    instance: StoredInstance, ranges: list[MediaRange], candidates: list[Offer], refused: list[str]
) -> str:
    available = ", ".join(
        "transfer-syntax=*" if offer.stored else f"transfer-syntax={offer.transfer_syntax}"
        for offer in candidates
    )
    text = (
        f"instance {instance.ref.sop_uid} is stored as {instance.transfer_syntax}; "
        f"Accept {accept.describe(ranges)!r} names nothing it can be sent as"
    )
    if refused:
        text += " (" + "; ".join(refused) + ")"
    return text + f' (available as multipart/related; type="{DICOM}" with {available})'


def _body(conn: Connections, instance: StoredInstance, choice: Choice) -> Iterable[bytes]:
    """Opens the object (or reads and codes its first frame) now: faults surface before any byte."""
    bucket = retrieve.bucket_for(conn, instance)
    label, target = choice.offer.label, choice.offer.transfer_syntax
    if label == "stored":
        return retrieve.stream_object(bucket, instance.key)
    if label in ("reencode", "transcode"):
        return transcode.explicit_le(bucket, instance)
    if label == "relabel":
        return [transcode.relabelled(bucket, instance, target)]
    return [transcode.encoded(bucket, instance, target)]


def _lazy(body: Callable[[], Iterable[bytes]], sop_uid: str) -> Iterator[bytes]:
    """A body deferred until the stream reaches its part."""
    try:
        yield from body()
    except GatewayError as error:
        # Headers are gone: the only honest signal left is a truncated multipart body.
        log.warning("retrieve aborted at %s: %s", sop_uid, error.detail)
        raise


def multipart_length(parts: list[tuple[dict[str, str], int]], boundary: str) -> int:
    """Exact length of write_parts() output when every part's size is known."""
    total = len(f"--{boundary}--\r\n")
    for headers, size in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        total += len(f"--{boundary}\r\n") + len(head.encode("latin-1")) + 2 + size + 2
    return total


@dataclass(frozen=True)
class Item:
    """One instance of the retrieve: where its bytes come from, and its reduction when resolution= asks."""

    original: StoredInstance
    source: Source
    reduction: resolution.Plan | None

    @property
    def provisional(self) -> StoredInstance:
        """What will be sent, as far as planning needs (a reduced instance is HTJ2K lossless RPCL)."""
        if self.reduction is None:
            return self.source.instance
        return dataclasses.replace(
            self.source.instance,
            transfer_syntax=HTJ2KLosslessRPCL,
            rows=self.reduction.rows,
            columns=self.reduction.columns,
        )

    def prepare(self, conn: Connections) -> StoredInstance:
        if self.reduction is None:
            return self.source.instance
        return resolution.reduced_instance(
            conn, self.source.instance, self.source.version_id, self.reduction, self.original.ref
        )

    @property
    def served_size(self) -> str | None:
        if self.reduction is not None:
            return resolution.label(self.reduction.columns, self.reduction.rows)
        instance = self.original
        return (
            resolution.label(instance.columns, instance.rows) if instance.columns and instance.rows else None
        )


def _part_headers(item: Item, instance: StoredInstance, choice: Choice) -> dict[str, str]:
    headers = {"Content-Type": choice.content_type}
    if choice.offer.label == "stored":
        headers["Content-Length"] = str(instance.size)
    headers["X-Served-Version"] = item.source.version_id
    if item.source.reason:
        headers["X-Policy-Reason"] = selection.header_safe(item.source.reason)
    if item.reduction is not None:
        headers["X-Served-Resolution"] = resolution.label(item.reduction.columns, item.reduction.rows)
    return headers


def _served(response: Response, chosen: Selection, items: list[Item], display: object) -> Response:
    response.headers.update(chosen.headers())
    if display is not None:
        sizes = [size for size in dict.fromkeys(item.served_size for item in items) if size]
        if sizes:
            response.headers["X-Served-Resolution"] = ", ".join(sizes[:20])
    response.headers.add("Vary", "Accept")
    return metered(response)


def _pixel_modules(conn: Connections) -> Callable[[StoredInstance], PixelModule | None]:
    """The Image Pixel module of an instance (from the index, once per SOP Instance UID)."""
    cache: dict[str, PixelModule | None] = {}

    def load(instance: StoredInstance) -> PixelModule | None:
        key = instance.ref.sop_uid
        if key not in cache:
            cache[key] = retrieve.pixel_module(conn, instance.ref) if instance.layout is not None else None
        return cache[key]

    return load


def _respond(who: Identity, instances: list[StoredInstance], single_allowed: bool) -> Response:
    conn = services()
    ranges = accept.parse(request.headers.get("Accept"), Resource.INSTANCES)
    facts = selection.request_facts(request.args, conn.rules.versions, accept.accepted_syntaxes(ranges))
    chosen = selection.select_version(conn, instances, facts, who, client_profile())
    items = []
    for instance in instances:
        source = chosen.source(instance)
        reduction = resolution.plan(source.instance, facts.display) if facts.display else None
        items.append(Item(instance, source, reduction))
    # a reduced instance is planned as the original would be: same pixel module, its own syntax
    choices = _plan([item.provisional for item in items], ranges, single_allowed, _pixel_modules(conn))
    first = items[0]
    logs.audit(
        "retrieve",
        who.subject,
        who.role,
        study=first.original.ref.study_uid,
        series=first.original.ref.series_uid if len({i.ref.series_uid for i in instances}) == 1 else None,
        instances=len(instances),
        version=chosen.served,
    )
    prepared = first.prepare(conn)
    first_body = _body(conn, prepared, choices[0])
    if single_allowed and not choices[0].multipart:
        response = Response(first_body, content_type=choices[0].content_type, direct_passthrough=True)
        if choices[0].offer.label == "stored":
            response.headers["Content-Length"] = str(prepared.size)
        return _served(response, chosen, items, facts.display)
    boundary = new_boundary()

    def parts() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
        yield _part_headers(first, prepared, choices[0]), first_body
        for item, choice in zip(items[1:], choices[1:], strict=True):
            try:
                instance = item.prepare(conn)
            except GatewayError as error:
                log.warning("retrieve aborted at %s: %s", item.original.ref.sop_uid, error.detail)
                raise
            yield (
                _part_headers(item, instance, choice),
                _lazy(lambda i=instance, c=choice: _body(conn, i, c), item.original.ref.sop_uid),
            )

    response = Response(
        write_parts(parts(), boundary),
        content_type=related_content_type(boundary, choices[0].media_type),
        direct_passthrough=True,
    )
    if all(choice.offer.label == "stored" for choice in choices) and facts.display is None:
        sized = [
            (_part_headers(item, item.source.instance, choice), item.source.instance.size)
            for item, choice in zip(items, choices, strict=True)
        ]
        response.headers["Content-Length"] = str(multipart_length(sized, boundary))
    return _served(response, chosen, items, facts.display)


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
    logs.audit(
        "original", who.subject, who.role, study=study_uid, instance=sop_uid, version=retrieve.ORIGINAL
    )
    response.headers["X-Served-Version"] = retrieve.ORIGINAL
    response.headers["X-Policy-Reason"] = "the exact bytes received were asked for"
    return response
