"""WADO-RS frames and bulk data (PS3.18 10.4.1.1.3, 10.4.1.1.5): one range read per frame from the
object the selected version names (the original, or a version in the hot bucket): the stored codestream
with `transfer-syntax=*`, uncompressed on request, any other syntax encoded frame by frame.

Resolution (DESIGN.md): frames keep their geometry; with `resolution=` an HTJ2K frame is cut to the
RPCL prefix that decodes to the level covering the display, and an HTTP Range is honoured on a
single-frame answer, single part or multipart (Cornerstone3D streams HTJ2K with `Range: bytes=0-N` and
`multipart/related; type=application/octet-stream; transfer-syntax=*`, then asks for the rest). A
single-frame multipart body gets a boundary derived from what it holds, so every range of it is a
range of the same bytes. X-Served-Resolution says what the bytes sent decode to."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator

from flask import Blueprint, Response, current_app, json, request
from flask.typing import ResponseReturnValue
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway import accept, logs, pixels, resolution, retrieve, selection, transcode
from gateway.accept import OCTET_STREAM, Choice, MediaRange, Offer, Resource
from gateway.auth import Identity
from gateway.connections import Connections
from gateway.errors import InvalidParameter, NotAcceptable, NotFound, RangeNotSatisfiable
from gateway.http import authorize, client_profile, metered, parse_frame_list, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.pixels import UndecodablePixelData
from gateway.retrieve import FrameReader, StoredInstance
from gateway.selection import Selection
from policies.permissions import Action

blueprint = Blueprint("frames", __name__)

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_CODESTREAMS = frozenset(resolution.HTJ2K_SYNTAXES | {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


def _reader(conn: Connections, instance: StoredInstance) -> FrameReader:
    """Originals take their pixel module from the index; versions from their own header."""
    loader = (lambda: retrieve.pixel_module(conn, instance.ref)) if instance.is_original else None
    return FrameReader(retrieve.bucket_for(conn, instance), instance, loader)


def _offers(instance: StoredInstance, single_part: bool) -> list[Offer]:
    """Stored codestream first for `transfer-syntax=*`; the uncompressed form is the default; then
    the same codestream under another valid name, then every syntax encoded on the fly."""
    syntax = instance.transfer_syntax
    layout = instance.layout
    assert layout is not None
    if layout.encapsulated:
        found = [Offer(syntax, True, (accept.media_type_for(syntax), OCTET_STREAM), single_part, "stored")]
        found += [
            Offer(target, False, (accept.media_type_for(target), OCTET_STREAM), single_part, "relabel")
            for target in transcode.SAME_BYTES.get(syntax, ())
        ]
        if not pixels.is_decodable(syntax):
            return found
        found.append(Offer(ExplicitVRLittleEndian, False, (OCTET_STREAM,), single_part, "decoded"))
    else:
        # Native pixel data: its uncompressed little-endian form is what "as stored" means on the web.
        found = [Offer(ExplicitVRLittleEndian, True, (OCTET_STREAM,), single_part, "decoded")]
    offered = {offer.transfer_syntax for offer in found}
    found += [
        Offer(target, False, (accept.media_type_for(target), OCTET_STREAM), single_part, "encode")
        for target in transcode.ENCODABLE
        if target not in offered
    ]
    return found


def _choose(reader: FrameReader, ranges: list[MediaRange], candidates: list[Offer], what: str) -> Choice:
    """The client's first acceptable offer; an encoding the image cannot take is struck off (406 with
    its reason when nothing else is acceptable)."""
    instance = reader.instance
    refused: list[str] = []
    while True:
        choice = accept.select(ranges, candidates)
        if choice is None or choice.offer.label != "encode":
            break
        why = transcode.refusal(reader.pixel_module(), choice.offer.transfer_syntax)
        if why is None:
            return choice
        refused.append(why)
        candidates = [offer for offer in candidates if offer is not choice.offer]
    if choice is None:
        available = ", ".join(
            f"{offer.media_types[0]}; transfer-syntax={offer.transfer_syntax}" for offer in candidates
        )
        single = all(offer.single_part for offer in candidates)
        raise NotAcceptable(
            f"{what} of {instance.ref.sop_uid} (stored as {instance.transfer_syntax}) cannot be sent as "
            f"{accept.describe(ranges)!r}"
            + (f" ({'; '.join(refused)})" if refused else "")
            + f"; available: {available}"
            + ("" if single else " in multipart/related")
        )
    return choice


def _read_function(reader: FrameReader, choice: Choice) -> Callable[[int], bytes]:
    label = choice.offer.label
    if label in ("stored", "relabel"):
        return reader.stored
    if label == "decoded":
        return reader.decoded
    target = choice.offer.transfer_syntax

    def encode(index: int) -> bytes:
        array, properties = reader.array(index)
        return transcode.encode_frame(array, properties, reader.pixel_module(), target, reader.header).data

    return encode


def _image(study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
    instance = retrieve.one(services(), study_uid, series_uid, sop_uid)
    if instance.layout is None:
        raise NotFound(f"instance {sop_uid} has no pixel data, so no frames")
    return instance


def _selected(instance: StoredInstance, ranges: list[MediaRange], who: Identity) -> Selection:
    conn = services()
    facts = selection.request_facts(request.args, conn.rules.versions, accept.accepted_syntaxes(ranges))
    return selection.select_version(conn, [instance], facts, who, client_profile())


def served(response: Response, chosen: Selection) -> Response:
    response.headers.update(chosen.headers())
    response.headers.add("Vary", "Accept")
    return metered(response)


def _multipart(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], part_type: str) -> Response:
    boundary = new_boundary()
    return Response(
        write_parts(parts, boundary),
        content_type=related_content_type(boundary, part_type),
        direct_passthrough=True,
    )


def _requested_range(total: int) -> tuple[int, int] | Response | None:
    """(start, stop) of the one byte range asked for, None without one, or the 416 answer."""
    wanted = request.range
    if wanted is None or wanted.units != "bytes" or len(wanted.ranges) != 1:
        return None
    bounds = wanted.range_for_length(total)
    if bounds is None:
        error = RangeNotSatisfiable(f"range {request.headers.get('Range')!r} is outside 0-{total - 1}")
        body = {"title": error.title, "status": error.status, "detail": error.detail}
        response = current_app.response_class(
            json.dumps(body), status=416, mimetype="application/problem+json"
        )
        response.headers["Content-Range"] = f"bytes */{total}"
        return response
    return bounds


def _single(
    content_type: str, total: int, read: Callable[[int, int], Iterable[bytes]]
) -> tuple[Response, int | None]:
    """A single-part answer honouring one HTTP byte range (RFC 9110 14; 206 with Content-Range), and
    the end of the bytes sent when a range was asked for."""
    start, length, status, end = 0, total, 200, None
    bounds = _requested_range(total)
    if isinstance(bounds, Response):
        return bounds, None
    if bounds is not None:
        start, stop = bounds
        length, status, end = stop - start, 206, stop
    response = Response(
        read(start, length), status=status, content_type=content_type, direct_passthrough=True
    )
    response.headers["Content-Length"] = str(length)
    response.headers["Accept-Ranges"] = "bytes"
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{total}"
    return response, end


def _from_bytes(data: bytes) -> Callable[[int, int], Iterable[bytes]]:
    return lambda start, length: [data[start : start + length]]


def _fixed_boundary(*facts: object) -> str:
    """A boundary that depends only on what the body holds: ranges of repeated requests line up."""
    return "gw-" + hashlib.sha256(repr(facts).encode()).hexdigest()[:40]


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>")
def retrieve_frames(study_uid: str, series_uid: str, sop_uid: str, frame_list: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    numbers = parse_frame_list(frame_list)
    original = _image(study_uid, series_uid, sop_uid)
    count = original.number_of_frames
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise NotFound(
            f"frame {beyond[0]} is out of range: instance {sop_uid} has {count} frame(s)", parameter="frames"
        )
    ranges = accept.parse(request.headers.get("Accept"), Resource.FRAMES)
    chosen = _selected(original, ranges, who)
    display = chosen.display
    instance = chosen.source(original).instance
    if instance.layout is None:
        raise NotFound(f"the {chosen.served} version of {sop_uid} has no pixel data")
    reader = _reader(services(), instance)
    single = len(numbers) == 1
    choice = _choose(reader, ranges, _offers(instance, single), "frames")
    read = _read_function(reader, choice)
    codestream = choice.offer.transfer_syntax in _CODESTREAMS
    logs.audit(
        "frames",
        who.subject,
        who.role,
        study=study_uid,
        instance=sop_uid,
        frames=len(numbers),
        version=chosen.served,
    )

    def frame(index: int) -> tuple[bytes, str | None]:
        data = _read(read, index, instance)
        if display is not None and codestream:
            prefix = resolution.frame_prefix(data, display)
            if prefix is not None:
                return prefix.data, resolution.label(prefix.columns, prefix.rows)
        return data, None

    first, size = frame(numbers[0] - 1)  # the first frame is read before a status is sent
    if display is not None and size is None:
        pm = reader.pixel_module()
        size = resolution.label(pm.columns, pm.rows)
    if single:
        identity = (sop_uid, chosen.served, instance.sha256, numbers[0], str(display))
        response = _one_frame(choice, first, codestream, identity)
    else:

        def parts() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
            for position, number in enumerate(numbers):
                data = first if position == 0 else frame(number - 1)[0]
                yield {"Content-Type": choice.content_type, "Content-Length": str(len(data))}, [data]

        response = _multipart(parts(), choice.media_type)
    if size is not None and "X-Served-Resolution" not in response.headers:
        response.headers["X-Served-Resolution"] = size
    return served(response, chosen)


def _one_frame(choice: Choice, data: bytes, codestream: bool, identity: tuple[object, ...]) -> Response:
    """One frame, single part or multipart, with HTTP Range over the representation sent."""
    if not choice.multipart:
        response, end = _single(choice.content_type, len(data), _from_bytes(data))
        offset = 0
    else:
        boundary = _fixed_boundary(*identity, choice.content_type, len(data))
        headers = {"Content-Type": choice.content_type, "Content-Length": str(len(data))}
        body = b"".join(write_parts([(headers, [data])], boundary))
        offset = body.index(b"\r\n\r\n") + 4
        response, end = _single(
            related_content_type(boundary, choice.media_type), len(body), _from_bytes(body)
        )
    if end is not None and codestream and response.status_code == 206:
        size = resolution.prefix_resolution(data, end - offset)
        if size is not None:
            response.headers["X-Served-Resolution"] = resolution.label(*size)
    return response


def _read(read: Callable[[int], bytes], index: int, instance: StoredInstance) -> bytes:
    try:
        return read(index)
    except UndecodablePixelData as error:
        raise UndecodablePixelData(
            f"frame {index + 1} of {instance.ref.sop_uid}: {error.detail}; "
            "transfer-syntax=* sends it as stored"
        ) from error


# --- bulk data ---


def _parse_tag_path(path: str) -> list[int | str]:
    """'7FE00010' or '00880200/0/7FE00010' -> [tag, item, tag] (tags as 8 hex digits, items from 0).

    Raises:
        InvalidParameter: anything else.
    """
    parts = path.strip("/").split("/")
    if len(parts) % 2 == 0:
        raise InvalidParameter(f"bulk data path {path[:100]!r} must end with a tag", parameter="tagpath")
    parsed: list[int | str] = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            if not _TAG.match(part):
                raise InvalidParameter(
                    f"{part[:20]!r} in the bulk data path is not a tag", parameter="tagpath"
                )
            parsed.append(part.upper())
        else:
            if not part.isdigit():
                raise InvalidParameter(
                    f"{part[:20]!r} in the bulk data path is not an item number", parameter="tagpath"
                )
            parsed.append(int(part))
    return parsed


def _element_bytes(header: Dataset, path: list[int | str], syntax: str) -> bytes:
    """The raw little-endian value of the element the path names in the header."""
    dataset: Dataset = header
    for position in range(0, len(path) - 1, 2):
        tag, item = int(str(path[position]), 16), int(path[position + 1])
        element = dataset.get(tag)
        if element is None or element.VR != "SQ" or item >= len(element.value or []):
            raise NotFound(f"no item {item} of ({str(path[position])[:4]},{str(path[position])[4:]})")
        dataset = element.value[item]
    tag_text = str(path[-1])
    element = dataset.get(int(tag_text, 16))
    if element is None or not isinstance(element.value, bytes | bytearray):
        raise NotFound(f"no bulk data at ({tag_text[:4]},{tag_text[4:]})")
    value = bytes(element.value)
    if not UID(syntax).is_little_endian and element.VR in _WORD:
        value = retrieve.swap_words(value, _WORD[element.VR])
    return value


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/bulkdata/<path:tag_path>")
def retrieve_bulkdata(study_uid: str, series_uid: str, sop_uid: str, tag_path: str) -> ResponseReturnValue:
    """Bulk data of the object the selected version names: its Pixel Data, or another element."""
    who = authorize(Action.RETRIEVE)
    path = _parse_tag_path(tag_path)
    original = retrieve.one(services(), study_uid, series_uid, sop_uid)
    ranges = accept.parse(request.headers.get("Accept"), Resource.BULKDATA)
    chosen = _selected(original, ranges, who)
    instance = chosen.source(original).instance
    reader = _reader(services(), instance)
    logs.audit("bulkdata", who.subject, who.role, study=study_uid, instance=sop_uid, version=chosen.served)
    if path == ["7FE00010"]:
        if instance.layout is None:
            raise NotFound(f"instance {sop_uid} has no Pixel Data")
        return served(_pixel_bulkdata(reader, ranges), chosen)
    offer = Offer(ExplicitVRLittleEndian, True, (OCTET_STREAM,), True, "value")
    choice = accept.select(ranges, [offer])
    if choice is None:
        raise NotAcceptable(
            f"bulk data is sent as {OCTET_STREAM}; Accept {accept.describe(ranges)!r} refuses it"
        )
    header = retrieve.read_header(reader.bucket, instance)
    value = _element_bytes(header, path, instance.transfer_syntax)
    content_type = f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}"
    if not choice.multipart:
        return served(_single(content_type, len(value), _from_bytes(value))[0], chosen)
    return served(
        _multipart(
            [({"Content-Type": content_type, "Content-Length": str(len(value))}, [value])], OCTET_STREAM
        ),
        chosen,
    )


def _pixel_bulkdata(reader: FrameReader, ranges: list[MediaRange]) -> Response:
    """All frames: one part per (stored or encoded) frame, or the whole native value as one part."""
    instance = reader.instance
    layout = reader.layout
    count = instance.number_of_frames
    candidates = _offers(instance, single_part=True)
    if count > 1:  # many codestreams cannot be one single part
        candidates = [
            offer if offer.label == "decoded" else dataclasses.replace(offer, single_part=False)
            for offer in candidates
        ]
    choice = _choose(reader, ranges, candidates, "Pixel Data")
    if choice.offer.label != "decoded":
        read = _read_function(reader, choice)
        first = _read(read, 0, instance)
        if not choice.multipart:
            return _single(choice.content_type, len(first), _from_bytes(first))[0]

        def frames() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
            for index in range(count):
                data = first if index == 0 else _read(read, index, instance)
                yield {"Content-Type": choice.content_type, "Content-Length": str(len(data))}, [data]

        return _multipart(frames(), choice.media_type)
    raw = (
        not layout.encapsulated
        and reader.indexed
        and UID(instance.transfer_syntax).is_little_endian
        and layout.length >= 0
    )
    if raw:
        total = layout.length

        def read_range(start: int, length: int) -> Iterable[bytes]:
            return retrieve.stream_range(reader.bucket, instance.key, layout.offset + start, length)
    else:
        data = b"".join(_read(reader.decoded, index, instance) for index in range(count))
        if reader.pixel_module().bits_allocated == 1 and count > 1:
            arr, _ = pixels.decode_dataset(reader.whole())
            data = pixels.native_bytes(arr, 1)  # 1-bit frames are packed end to end, not per frame
        total, read_range = len(data), _from_bytes(data)
    if not choice.multipart:
        return _single(choice.content_type, total, read_range)[0]
    headers = {"Content-Type": choice.content_type, "Content-Length": str(total)}
    return _multipart([(headers, read_range(0, total))], choice.media_type)
