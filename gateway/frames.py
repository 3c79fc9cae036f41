"""WADO-RS frames and bulk data (PS3.18 10.4.1.1.3, 10.4.1.1.5): one range read per frame from the
original, uncompressed on request, the stored codestream with `transfer-syntax=*`; HTTP Range on
single-part answers. Resolution levels and versions arrive with issue 4."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, json, request
from flask.typing import ResponseReturnValue
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from gateway import accept, logs, pixels, retrieve
from gateway.accept import OCTET_STREAM, Choice, Offer, Resource
from gateway.connections import Connections
from gateway.errors import InvalidParameter, NotAcceptable, NotFound, RangeNotSatisfiable
from gateway.http import authorize, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.pixels import PixelModule, UndecodablePixelData
from gateway.retrieve import Layout, StoredInstance
from gateway.storage import Bucket
from policies.permissions import Action

blueprint = Blueprint("frames", __name__)

VERSION = "original"
REASON = "the original is the only version available"
MAX_FRAMES_PER_REQUEST = 10000
_FRAME_LIST = re.compile(r"^\s*[0-9]+\s*(,\s*[0-9]+\s*)*$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def parse_frame_list(text: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5] in the order asked (PS3.18 8.3.4: frame numbers start at 1).

    Raises:
        InvalidParameter: not a comma-separated list of positive integers.
    """
    if not _FRAME_LIST.match(text or ""):
        raise InvalidParameter(
            f"frame list {text[:100]!r} is not comma-separated frame numbers", parameter="frames"
        )
    numbers = [int(item) for item in text.split(",")]
    if any(number < 1 for number in numbers):
        raise InvalidParameter("frame numbers start at 1", parameter="frames")
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise InvalidParameter(f"at most {MAX_FRAMES_PER_REQUEST} frames per request", parameter="frames")
    return numbers


@dataclass
class FrameSource:
    """Reads the frames of one instance: one range read per frame, or the whole object (once per
    request) when the index does not know where its frames lie (deflated data, unknown fragments)."""

    conn: Connections
    bucket: Bucket
    instance: StoredInstance
    _pixel_module: PixelModule | None = None
    _whole: Dataset | None = None
    _decoded: Any = None
    _stored: list[bytes] | None = None

    @property
    def layout(self) -> Layout:
        assert self.instance.layout is not None
        return self.instance.layout

    @property
    def indexed(self) -> bool:
        """Frame offsets known and the stored syntax not deflated: range reads work."""
        layout = self.layout
        return (
            layout.frames is not None
            and layout.seekable
            and self.instance.transfer_syntax != DeflatedExplicitVRLittleEndian
        )

    def pixel_module(self) -> PixelModule:
        if self._pixel_module is None:
            self._pixel_module = retrieve.pixel_module(self.conn, self.instance.ref)
        return self._pixel_module

    def whole(self) -> Dataset:
        if self._whole is None:
            self._whole = retrieve.read_whole(self.bucket, self.instance)
        return self._whole

    def stored(self, index: int) -> bytes:
        """The frame as stored: a codestream (encapsulated) or native bytes."""
        if self.indexed:
            return retrieve.read_frame(self.bucket, self.instance.key, self.layout, index)
        if self._stored is None:
            ds = self.whole()
            if not self.layout.encapsulated:
                return self.decoded(index)
            self._stored = list(
                generate_frames(ds.PixelData, number_of_frames=self.instance.number_of_frames)
            )
        return self._stored[index]

    def decoded(self, index: int) -> bytes:
        """The frame as Explicit VR Little Endian native bytes."""
        syntax = self.instance.transfer_syntax
        if self.indexed:
            data = retrieve.read_frame(self.bucket, self.instance.key, self.layout, index)
            if not self.layout.encapsulated and UID(syntax).is_little_endian:
                return data
            return pixels.native_frame_bytes(self.pixel_module(), data, syntax, self.layout.vr)[0]
        if self._decoded is None:
            arr, _ = pixels.decode_dataset(self.whole())
            self._decoded = arr if self.instance.number_of_frames > 1 else arr[None, ...]
        return pixels.native_bytes(self._decoded[index], self.pixel_module().bits_allocated)


def _offers(instance: StoredInstance, single_part: bool) -> list[Offer]:
    """Stored codestream first for `transfer-syntax=*`; the uncompressed form is the default."""
    syntax = instance.transfer_syntax
    layout = instance.layout
    assert layout is not None
    if layout.encapsulated:
        found = [Offer(syntax, True, (accept.media_type_for(syntax), OCTET_STREAM), single_part, "stored")]
        if pixels.is_decodable(syntax):
            found.append(Offer(ExplicitVRLittleEndian, False, (OCTET_STREAM,), single_part, "decoded"))
        return found
    # Native pixel data: its uncompressed little-endian form is what "as stored" means on the web.
    return [Offer(ExplicitVRLittleEndian, True, (OCTET_STREAM,), single_part, "decoded")]


def _choose(instance: StoredInstance, single_part: bool, what: str) -> Choice:
    ranges = accept.parse(request.headers.get("Accept"), Resource.FRAMES)
    candidates = _offers(instance, single_part)
    choice = accept.select(ranges, candidates)
    if choice is None:
        available = ", ".join(
            f"{offer.media_types[0]}; transfer-syntax={offer.transfer_syntax}" for offer in candidates
        )
        raise NotAcceptable(
            f"{what} of {instance.ref.sop_uid} (stored as {instance.transfer_syntax}) cannot be sent as "
            f"{accept.describe(ranges)!r}; available: {available}"
            + ("" if single_part else " in multipart/related")
        )
    return choice


def _image(study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
    instance = retrieve.one(services(), study_uid, series_uid, sop_uid)
    if instance.layout is None:
        raise NotFound(f"instance {sop_uid} has no pixel data, so no frames")
    return instance


def served(response: Response) -> Response:
    response.headers["X-Served-Version"] = VERSION
    response.headers["X-Policy-Reason"] = REASON
    response.headers.add("Vary", "Accept")
    return response


def _multipart(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], part_type: str) -> Response:
    boundary = new_boundary()
    return Response(
        write_parts(parts, boundary),
        content_type=related_content_type(boundary, part_type),
        direct_passthrough=True,
    )


def _single(content_type: str, total: int, read: Callable[[int, int], Iterable[bytes]]) -> Response:
    """A single-part answer honouring one HTTP byte range (RFC 9110 14; 206 with Content-Range)."""
    start, length, status = 0, total, 200
    wanted = request.range
    if wanted is not None and wanted.units == "bytes" and len(wanted.ranges) == 1:
        bounds = wanted.range_for_length(total)
        if bounds is None:
            error = RangeNotSatisfiable(f"range {request.headers.get('Range')!r} is outside 0-{total - 1}")
            body = {"title": error.title, "status": error.status, "detail": error.detail}
            response = current_app.response_class(
                json.dumps(body), status=416, mimetype="application/problem+json"
            )
            response.headers["Content-Range"] = f"bytes */{total}"
            return response
        start, stop = bounds
        length, status = stop - start, 206
    response = Response(
        read(start, length), status=status, content_type=content_type, direct_passthrough=True
    )
    response.headers["Content-Length"] = str(length)
    response.headers["Accept-Ranges"] = "bytes"
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{total}"
    return response


def _from_bytes(data: bytes) -> Callable[[int, int], Iterable[bytes]]:
    return lambda start, length: [data[start : start + length]]


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>")
def retrieve_frames(study_uid: str, series_uid: str, sop_uid: str, frame_list: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    numbers = parse_frame_list(frame_list)
    instance = _image(study_uid, series_uid, sop_uid)
    count = instance.number_of_frames
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise NotFound(
            f"frame {beyond[0]} is out of range: instance {sop_uid} has {count} frame(s)", parameter="frames"
        )
    choice = _choose(instance, single_part=len(numbers) == 1, what="frames")
    source = FrameSource(services(), retrieve.originals(services()), instance)
    read = source.stored if choice.offer.label == "stored" else source.decoded
    logs.audit(
        "frames",
        who.subject,
        who.role,
        study=study_uid,
        instance=sop_uid,
        frames=len(numbers),
        version=VERSION,
    )
    first = _read(read, numbers[0] - 1, instance)  # the first frame is read before a status is sent
    if not choice.multipart:
        return served(_single(choice.content_type, len(first), _from_bytes(first)))

    def parts() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
        for position, number in enumerate(numbers):
            data = first if position == 0 else _read(read, number - 1, instance)
            yield {"Content-Type": choice.content_type, "Content-Length": str(len(data))}, [data]

    return served(_multipart(parts(), choice.media_type))


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
    who = authorize(Action.RETRIEVE)
    path = _parse_tag_path(tag_path)
    instance = retrieve.one(services(), study_uid, series_uid, sop_uid)
    bucket = retrieve.originals(services())
    logs.audit("bulkdata", who.subject, who.role, study=study_uid, instance=sop_uid, version=VERSION)
    if path == ["7FE00010"]:
        if instance.layout is None:
            raise NotFound(f"instance {sop_uid} has no Pixel Data")
        return served(_pixel_bulkdata(bucket, instance))
    ranges = accept.parse(request.headers.get("Accept"), Resource.BULKDATA)
    offer = Offer(ExplicitVRLittleEndian, True, (OCTET_STREAM,), True, "value")
    choice = accept.select(ranges, [offer])
    if choice is None:
        raise NotAcceptable(
            f"bulk data is sent as {OCTET_STREAM}; Accept {accept.describe(ranges)!r} refuses it"
        )
    value = _element_bytes(retrieve.read_header(bucket, instance), path, instance.transfer_syntax)
    content_type = f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}"
    if not choice.multipart:
        return served(_single(content_type, len(value), _from_bytes(value)))
    return served(
        _multipart(
            [({"Content-Type": content_type, "Content-Length": str(len(value))}, [value])], OCTET_STREAM
        )
    )


def _pixel_bulkdata(bucket: Bucket, instance: StoredInstance) -> Response:
    """All frames: one part per stored frame, or the whole native value as one part."""
    layout = instance.layout
    assert layout is not None
    count = instance.number_of_frames
    ranges = accept.parse(request.headers.get("Accept"), Resource.BULKDATA)
    candidates = _offers(instance, single_part=True)
    if layout.encapsulated:
        stored = candidates[0]
        candidates[0] = Offer(stored.transfer_syntax, True, stored.media_types, count == 1, "stored")
    choice = accept.select(ranges, candidates)
    if choice is None:
        raise NotAcceptable(
            f"Pixel Data of {instance.ref.sop_uid} (stored as {instance.transfer_syntax}) "
            f"cannot be sent as {accept.describe(ranges)!r}"
        )
    source = FrameSource(services(), bucket, instance)
    if choice.offer.label == "stored":
        first = source.stored(0)
        if not choice.multipart:
            return _single(choice.content_type, len(first), _from_bytes(first))

        def frames() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
            for index in range(count):
                data = first if index == 0 else source.stored(index)
                yield {"Content-Type": choice.content_type, "Content-Length": str(len(data))}, [data]

        return _multipart(frames(), choice.media_type)
    raw = (
        not layout.encapsulated
        and source.indexed
        and UID(instance.transfer_syntax).is_little_endian
        and layout.length >= 0
    )
    if raw:
        total = layout.length

        def read(start: int, length: int) -> Iterable[bytes]:
            return retrieve.stream_range(bucket, instance.key, layout.offset + start, length)
    else:
        data = b"".join(_read(source.decoded, index, instance) for index in range(count))
        if source.pixel_module().bits_allocated == 1 and count > 1:
            arr, _ = pixels.decode_dataset(source.whole())
            data = pixels.native_bytes(arr, 1)  # 1-bit frames are packed end to end, not per frame
        total, read = len(data), _from_bytes(data)
    if not choice.multipart:
        return _single(choice.content_type, total, read)
    headers = {"Content-Type": choice.content_type, "Content-Length": str(total)}
    return _multipart([(headers, read(0, total))], choice.media_type)
