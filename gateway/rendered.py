"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3-4, 8.3.5): JPEG or PNG by Accept, with the
`viewport`, `window` and `quality` parameters, sized to the Viewport-Width/DPR hints when no viewport is
given; thumbnails from the precomputed thumbnail.jpg in the hot bucket, else rendered and kept there.

Encapsulated documents and video are never put through an image codec: /rendered returns the PDF (or
CDA, STL...) and the MPEG stream as stored, as their own media types (what OHIF shows and plays).
The version whose pixels are rendered comes from gateway.selection, as for every retrieve."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue
from pydicom.encaps import generate_fragments
from pydicom.uid import (
    MPEG2MPHL,
    MPEG2MPHLF,
    MPEG2MPML,
    MPEG2MPMLF,
    SegmentationStorage,
)
from werkzeug.http import parse_list_header

from gateway import clienthints, logs, rendering, retrieve, selection
from gateway.auth import Identity
from gateway.connections import Connections
from gateway.errors import (
    GatewayError,
    InvalidParameter,
    NotAcceptable,
    NotFound,
    RangeNotSatisfiable,
    StorageUnavailable,
)
from gateway.http import authorize, client_profile, metered, parse_frame_list, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.pixels import UndecodablePixelData
from gateway.rendering import JPEG, PNG, Options
from gateway.retrieve import FrameReader, StoredInstance
from gateway.selection import Selection
from gateway.storage import Bucket
from policies.permissions import Action

log = logging.getLogger(__name__)
blueprint = Blueprint("rendered", __name__)

PDF = rendering.PDF
MPEG2 = frozenset({MPEG2MPML, MPEG2MPMLF, MPEG2MPHL, MPEG2MPHLF})
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_CHUNK = 1 << 20


# --- what the client accepts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    media_type: str  # may be a wildcard
    multipart: bool
    q: float

    def takes(self, media_type: str) -> bool:
        if self.media_type == "*/*":
            return True
        if self.media_type.endswith("/*"):
            return media_type.split("/")[0] == self.media_type.split("/")[0]
        return media_type == self.media_type


def accepted() -> list[Wanted]:
    """Accept (or the `accept` query parameter, PS3.18 8.3.3.1, which wins) best first; none = */*."""
    raw = request.args.get("accept") or request.headers.get("Accept") or "*/*"
    found: list[Wanted] = []
    for item in parse_list_header(raw):
        media, *params = (part.strip() for part in item.split(";"))
        values = {}
        for param in params:
            name, _, value = param.partition("=")
            values[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(values.get("q", "1"))
        except ValueError:
            q = 1.0
        media = media.lower()
        if q <= 0 or not media:
            continue
        if media == "multipart/related":
            found.append(Wanted(values.get("type", JPEG).lower(), True, q))
        else:
            found.append(Wanted(media, False, q))
    found.sort(key=lambda wanted: -wanted.q)  # stable: equal q keeps the client's order
    return found


def image_type(wanted: Sequence[Wanted]) -> str:
    """JPEG or PNG, the client's first that fits; a wildcard gets JPEG.

    Raises:
        NotAcceptable: the client takes neither.
    """
    for item in wanted:
        for media in (JPEG, PNG):
            if item.takes(media):
                return media
    said = ", ".join(("multipart/related; type=" if w.multipart else "") + w.media_type for w in wanted)
    raise NotAcceptable(f"rendered images are {JPEG} or {PNG}; Accept asks for {said or 'nothing'}")


def _takes(wanted: Sequence[Wanted], media_type: str) -> bool:
    return any(item.takes(media_type) for item in wanted)


def options(wanted: Sequence[Wanted], thumbnail: bool) -> Options:
    """The rendering the request asks for (PS3.18 8.3.5.1); thumbnails take viewport and quality only."""
    args = request.args
    window = None
    if not thumbnail and args.get("window"):
        window = rendering.parse_window(args["window"])
    viewport = rendering.parse_viewport(args["viewport"]) if args.get("viewport") else None
    quality = rendering.parse_quality(args["quality"]) if args.get("quality") else None
    max_width = None
    if viewport is None:
        hints = clienthints.parse_hints(request.headers)
        if hints["viewport_width"]:
            max_width = max(1, round(hints["viewport_width"] * (hints["dpr"] or 1.0)))
    return Options(
        media_type=image_type(wanted),
        quality=quality,
        window=window,
        viewport=viewport,
        max_width=max_width,
        max_side=rendering.THUMBNAIL_SIZE if thumbnail else None,
    )


# --- what an instance is ------------------------------------------------------------------------------------


is_document, is_image, is_video = rendering.is_document, rendering.is_image, rendering.is_video


def representative(instances: Sequence[StoredInstance]) -> StoredInstance:
    """The image a study or series thumbnail shows: the middle image of the series with the most images
    (segmentations only when nothing else has pixels).

    Raises:
        NotFound: no instance has an image.
    """
    images = [i for i in instances if is_image(i) and i.sop_class_uid != SegmentationStorage]
    images = images or [i for i in instances if is_image(i)]
    if not images:
        kinds = "documents, video or objects without pixel data" if instances else "nothing"
        raise NotFound(f"nothing to show as a thumbnail: the resource holds {kinds}")
    by_series: dict[str, list[StoredInstance]] = {}
    for instance in images:
        by_series.setdefault(instance.ref.series_uid, []).append(instance)
    series = max(by_series.values(), key=len)
    return series[len(series) // 2]


# --- images -------------------------------------------------------------------------------------------------


def _select(who: Identity, instances: list[StoredInstance]) -> Selection:
    """The version whose pixels are rendered: the policy decides as for any retrieve; `version`,
    `purpose` and `resolution` keep their vendor meaning, `quality` its PS3.18 one (JPEG quality)."""
    conn = services()
    return selection.select_version(conn, instances, _facts(), who, client_profile())


def _facts() -> selection.RequestFacts:
    return selection.request_facts(request.args, services().rules.versions, (), vendor_quality=False)


def _reader(conn: Connections, instance: StoredInstance) -> FrameReader:
    loader = (lambda: retrieve.pixel_module(conn, instance.ref)) if instance.is_original else None
    return FrameReader(retrieve.bucket_for(conn, instance), instance, loader)


def render_frame(conn: Connections, source: StoredInstance, index: int, opts: Options) -> bytes:
    """Decode frame `index` (0-based) of the object `source` names and render it.

    Raises:
        NotFound: the object has no pixel data.
        UndecodablePixelData: its pixels cannot be decoded (406).
    """
    if source.layout is None:
        raise NotFound(f"instance {source.ref.sop_uid} has no pixel data to render")
    reader = _reader(conn, source)
    arr, properties = reader.array(index)
    return rendering.render(arr, properties, reader.header(), opts, index)


def _check_frames(instance: StoredInstance, numbers: list[int]) -> None:
    beyond = [n for n in numbers if n > instance.number_of_frames]
    if beyond:
        raise NotFound(
            f"frame {beyond[0]} is out of range: instance {instance.ref.sop_uid} has "
            f"{instance.number_of_frames} frame(s)",
            parameter="frames",
        )


def _served(response: Response, chosen: Selection, extra_reason: str | None = None) -> Response:
    headers = chosen.headers()
    if extra_reason:
        headers["X-Policy-Reason"] = selection.header_safe(f"{headers['X-Policy-Reason']}; {extra_reason}")
    response.headers.update(headers)
    response.headers.add("Vary", "Accept")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return metered(response)


def _image_response(data: bytes, media_type: str) -> Response:
    response = Response(data, content_type=media_type)
    response.headers["Content-Length"] = str(len(data))
    return response


def _multipart(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], media_type: str) -> Response:
    boundary = new_boundary()
    return Response(
        write_parts(parts, boundary),
        content_type=related_content_type(boundary, media_type),
        direct_passthrough=True,
    )


def _frame_parts(
    conn: Connections, items: list[tuple[StoredInstance, int]], opts: Options
) -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
    """One part per (object, frame index); the first is rendered before the status line is sent."""
    first = render_frame(conn, items[0][0], items[0][1], opts)
    for position, (source, index) in enumerate(items):
        try:
            data = first if position == 0 else render_frame(conn, source, index, opts)
        except GatewayError as error:
            # Headers are gone: the only honest signal left is a truncated multipart body.
            log.warning("rendering aborted at %s frame %d: %s", source.ref.sop_uid, index + 1, error.detail)
            raise
        yield {"Content-Type": opts.media_type, "Content-Length": str(len(data))}, [data]


def _eager(
    parts: Iterator[tuple[dict[str, str], Iterable[bytes]]],
) -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
    """Start the generator now, so a fault of the first part is an error response, not a cut body."""
    first = next(parts)

    def chained() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
        yield first
        yield from parts

    return chained()


def _render_many(who: Identity, instances: list[StoredInstance], what: str) -> Response:
    """Study or series: every frame of every image, one part each (documents and video left out)."""
    images = [instance for instance in instances if is_image(instance)]
    if not images:
        raise NotFound(f"{what} holds no image to render (documents and video are rendered per instance)")
    conn = services()
    wanted = accepted()
    opts = options(wanted, thumbnail=False)
    chosen = _select(who, images)
    items = [(chosen.source(i).instance, index) for i in images for index in range(i.number_of_frames)]
    _audit(who, images, chosen, "rendered")
    response = _multipart(_eager(_frame_parts(conn, items, opts)), opts.media_type)
    skipped = len(instances) - len(images)
    if skipped:
        response.headers["Warning"] = f'299 - "{skipped} instance(s) without an image left out"'
    return _served(response, chosen)


def _audit(who: Identity, instances: list[StoredInstance], chosen: Selection, kind: str) -> None:
    first = instances[0].ref
    logs.audit(
        kind,
        who.subject,
        who.role,
        study=first.study_uid,
        instances=len(instances),
        version=chosen.served,
    )


# --- documents and video ------------------------------------------------------------------------------------


def document_response(conn: Connections, instance: StoredInstance) -> Response:
    """The Encapsulated Document's bytes as its own media type (PS3.3 C.24.2), the pad byte left off."""
    ds = retrieve.read_whole(retrieve.bucket_for(conn, instance), instance)
    if "EncapsulatedDocument" not in ds:
        raise NotFound(f"instance {instance.ref.sop_uid} has no Encapsulated Document")
    data = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    if isinstance(length, int) and 0 <= length <= len(data):
        data = data[:length]
    media = str(ds.get("MIMETypeOfEncapsulatedDocument") or rendering.DOCUMENT_TYPES[instance.sop_class_uid])
    if not _takes(accepted(), media):
        raise NotAcceptable(
            f"instance {instance.ref.sop_uid} renders as {media} only; Accept does not take it"
        )
    response = _image_response(data, media)
    response.headers["Content-Disposition"] = f'inline; filename="{instance.ref.sop_uid}{_suffix(media)}"'
    return response


def _suffix(media: str) -> str:
    return {
        PDF: ".pdf",
        "text/xml": ".xml",
        "model/stl": ".stl",
        "model/obj": ".obj",
        "model/mtl": ".mtl",
    }.get(media, "")


def video_fragments(conn: Connections, instance: StoredInstance) -> list[tuple[int, int]] | None:
    """(file offset, length) of each fragment of the encapsulated video stream, in order, the Basic
    Offset Table left out: from the indexed layout, else by walking the item headers (PS3.5 A.4);
    None when the object cannot be read by offset (deflated)."""
    layout = instance.layout
    if layout is None or not layout.encapsulated:
        raise NotFound(f"instance {instance.ref.sop_uid} has no encapsulated video stream")
    if layout.frames:
        return sorted({(int(offset), int(length)) for frame in layout.frames for offset, length in frame})
    if not layout.seekable:
        return None
    bucket = retrieve.bucket_for(conn, instance)
    position, found, first = layout.offset, [], True
    while True:
        head = bucket.get_range(instance.key, position, 8)
        if len(head) < 8:
            raise StorageUnavailable(f"object {instance.key} ends inside its Pixel Data")
        group, element, length = struct.unpack("<HHI", head)
        if (group, element) == _SEQUENCE_END:
            return found
        if (group, element) != _ITEM or length == 0xFFFFFFFF:
            raise UndecodablePixelData(f"instance {instance.ref.sop_uid}: malformed item in the video stream")
        if not first:
            found.append((position + 8, length))
        first = False
        position += 8 + length


def video_response(conn: Connections, instance: StoredInstance) -> Response:
    """The MPEG stream, with Range (a <video> element seeks by Range requests)."""
    media = "video/mpeg" if instance.transfer_syntax in MPEG2 else "video/mp4"
    if not _takes(accepted(), media):
        raise NotAcceptable(f"instance {instance.ref.sop_uid} is {media} video; Accept does not take it")
    bucket = retrieve.bucket_for(conn, instance)
    fragments = video_fragments(conn, instance)
    whole = None
    if fragments is None:
        value = retrieve.read_whole(bucket, instance).PixelData
        whole = b"".join(list(generate_fragments(value))[1:])  # the first item is the Basic Offset Table
    total = len(whole) if whole is not None else sum(length for _offset, length in fragments or ())
    start, end, status = 0, total, 200
    wanted = request.range
    if wanted is not None and wanted.units == "bytes":
        bounds = wanted.range_for_length(total) if len(wanted.ranges) == 1 else None
        if bounds is None:
            raise RangeNotSatisfiable(f"the video stream is {total} bytes; ask for one range within it")
        (start, end), status = bounds, 206
    if whole is not None:
        body: Iterable[bytes] = [whole[start:end]]
    else:
        body = _stream_slices(bucket, instance.key, fragments or [], start, end)
    response = Response(body, status=status, content_type=media, direct_passthrough=True)
    response.headers["Content-Length"] = str(end - start)
    response.headers["Accept-Ranges"] = "bytes"
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    return response


def _stream_slices(
    bucket: Bucket, key: str, fragments: list[tuple[int, int]], start: int, end: int
) -> Iterator[bytes]:
    """Bytes [start, end) of the fragments joined end to end, by range reads."""
    position = 0
    for offset, length in fragments:
        lo, hi = max(start, position), min(end, position + length)
        if lo < hi:
            yield from retrieve.stream_range(bucket, key, offset + lo - position, hi - lo, _CHUNK)
        position += length
        if position >= end:
            return


# --- routes -------------------------------------------------------------------------------------------------


def _instance_rendered(who: Identity, instance: StoredInstance) -> Response:
    conn = services()
    if is_document(instance) or is_video(instance):
        chosen = _select(who, [instance])  # the policy still decides who may have it
        _audit(who, [instance], chosen, "rendered")
        response = (
            document_response(conn, instance) if is_document(instance) else video_response(conn, instance)
        )
        return _served(response, chosen)
    if instance.layout is None:
        raise NotAcceptable(
            f"instance {instance.ref.sop_uid} ({instance.sop_class_uid}) has no image, document or video "
            "to render"
        )
    wanted = accepted()
    opts = options(wanted, thumbnail=False)
    chosen = _select(who, [instance])
    source = chosen.source(instance).instance
    _audit(who, [instance], chosen, "rendered")
    count = instance.number_of_frames
    if count > 1 and any(item.multipart for item in wanted):
        parts = _frame_parts(conn, [(source, index) for index in range(count)], opts)
        return _served(_multipart(_eager(parts), opts.media_type), chosen)
    response = _image_response(render_frame(conn, source, 0, opts), opts.media_type)
    if count > 1:
        response.headers["Warning"] = (
            f'299 - "frame 1 of {count} rendered; ask for multipart/related or /frames/{{n}}/rendered"'
        )
    return _served(response, chosen)


@blueprint.get("/studies/<study_uid>/rendered")
def study_rendered(study_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _render_many(who, retrieve.find(services(), study_uid), f"study {study_uid}")


@blueprint.get("/studies/<study_uid>/series/<series_uid>/rendered")
def series_rendered(study_uid: str, series_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _render_many(who, retrieve.find(services(), study_uid, series_uid), f"series {series_uid}")


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/rendered")
def instance_rendered(study_uid: str, series_uid: str, sop_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _instance_rendered(who, retrieve.one(services(), study_uid, series_uid, sop_uid))


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>/rendered")
def frames_rendered(study_uid: str, series_uid: str, sop_uid: str, frame_list: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    numbers = parse_frame_list(frame_list)
    instance = retrieve.one(services(), study_uid, series_uid, sop_uid)
    if not is_image(instance):
        raise NotAcceptable(f"instance {sop_uid} has no image frames to render; ask for /rendered")
    _check_frames(instance, numbers)
    conn = services()
    wanted = accepted()
    opts = options(wanted, thumbnail=False)
    chosen = _select(who, [instance])
    source = chosen.source(instance).instance
    _audit(who, [instance], chosen, "rendered")
    if len(numbers) == 1:
        return _served(
            _image_response(render_frame(conn, source, numbers[0] - 1, opts), opts.media_type), chosen
        )
    parts = _frame_parts(conn, [(source, number - 1) for number in numbers], opts)
    return _served(_multipart(_eager(parts), opts.media_type), chosen)


# --- thumbnails ---------------------------------------------------------------------------------------------


def _thumbnail(who: Identity, instance: StoredInstance, index: int = 0) -> Response:
    """A thumbnail of one frame: the precomputed one (frame 1, no explicit version) reshaped to the
    request, else rendered now; a rendered frame-1 thumbnail is kept for the next request."""
    if not is_image(instance):
        raise NotFound(f"instance {instance.ref.sop_uid} has no image to show as a thumbnail")
    conn = services()
    opts = options(accepted(), thumbnail=True)
    chosen = _select(who, [instance])
    _audit(who, [instance], chosen, "thumbnail")
    plain = index == 0 and not selection.explicit(_facts())
    if plain:
        cached = rendering.cached_thumbnail(conn.hot, instance.ref)
        if cached is not None:
            data = rendering.reshape_encoded(cached, opts)
            response = _image_response(data, opts.media_type)
            return _served(response, chosen, "thumbnail precomputed from the original")
    source = chosen.source(instance).instance
    if plain and chosen.source(instance).version_id == retrieve.ORIGINAL:
        made = render_frame(conn, source, 0, rendering.thumbnail_options())
        _keep(conn, instance, made)
        data = rendering.reshape_encoded(made, opts)
    else:
        data = render_frame(conn, source, index, opts)
    return _served(_image_response(data, opts.media_type), chosen)


def _keep(conn: Connections, instance: StoredInstance, data: bytes) -> None:
    """Cache a thumbnail made on demand; a failed put costs the next request a render, nothing more."""
    try:
        rendering.store_thumbnail(conn.hot, instance.ref, data)
    except GatewayError as error:
        log.warning("thumbnail of %s not kept: %s", instance.ref.sop_uid, error.detail)


@blueprint.get("/studies/<study_uid>/thumbnail")
def study_thumbnail(study_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _thumbnail(who, representative(retrieve.find(services(), study_uid)))


@blueprint.get("/studies/<study_uid>/series/<series_uid>/thumbnail")
def series_thumbnail(study_uid: str, series_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _thumbnail(who, representative(retrieve.find(services(), study_uid, series_uid)))


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/thumbnail")
def instance_thumbnail(study_uid: str, series_uid: str, sop_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    return _thumbnail(who, retrieve.one(services(), study_uid, series_uid, sop_uid))


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>/thumbnail")
def frame_thumbnail(study_uid: str, series_uid: str, sop_uid: str, frame_list: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    numbers = parse_frame_list(frame_list)
    if len(numbers) != 1:
        raise InvalidParameter("a thumbnail shows one frame; name one frame number", parameter="frames")
    instance = retrieve.one(services(), study_uid, series_uid, sop_uid)
    _check_frames(instance, numbers)
    return _thumbnail(who, instance, numbers[0] - 1)
