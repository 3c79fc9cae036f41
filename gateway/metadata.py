"""WADO-RS metadata (PS3.18 10.4.1.1.2): study, series and instance, as application/dicom+json (gzip
when the client takes it) or multipart/related application/dicom+xml. Never reads instances from
the bucket: series come from the precomputed document (gateway.seriesdoc), instances from the index.

Rendering a document (BulkDataURIs made absolute, then gzip) costs ~15 ms for 300 instances, so the
rendered bytes are kept per process, keyed by the index state they were built from; a request then
costs one aggregate query, and If-None-Match can answer 304 before anything is read."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue

from gateway import accept, dicomjson, retrieve, seriesdoc
from gateway.accept import DICOM_JSON, DICOM_XML, Resource
from gateway.errors import NotAcceptable, ObjectNotFound
from gateway.http import authorize, dicomweb_root, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.uids import InstanceRef, check_uid
from policies.permissions import Action

blueprint = Blueprint("metadata", __name__)

LEVEL = 6  # rendered once per index state and root, then served many times: small beats fast
CACHE_BYTES = 64 << 20


class RenderedCache:
    """Least-recently-used rendered documents (gzip bytes), bounded by total size; thread-safe."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.limit // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.limit and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


CACHE = RenderedCache()


def _gzip(data: bytes) -> bytes:
    encoder = zlib.compressobj(LEVEL, zlib.DEFLATED, 31)  # wbits 31: a gzip member, mtime 0
    return encoder.compress(data) + encoder.flush()


def _format() -> str:
    chosen = accept.metadata_format(accept.parse(request.headers.get("Accept"), Resource.METADATA))
    if chosen is None:
        raise NotAcceptable(f'metadata is {DICOM_JSON} or multipart/related; type="{DICOM_XML}"')
    return chosen


def _wants_gzip() -> bool:
    return request.accept_encodings["gzip"] > 0


def _etag(scope: str, state: str, root: str, media: str, gz: bool) -> str:
    digest = hashlib.sha256(f"{scope}|{state}|{root}|{media}".encode()).hexdigest()[:32]
    return f'"{digest}{"-gz" if gz else ""}"'


def _not_modified(etag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    tags = {item.strip().removeprefix("W/") for item in header.split(",")}
    return "*" in tags or etag in tags


def _json_response(scope: str, state: str, render: Callable[[str], bytes], gz: bool) -> Response:
    """The rendered JSON (render(root) gives the gzip of it), with ETag, 304 and the cache."""
    root = dicomweb_root()
    etag = _etag(scope, state, root, DICOM_JSON, gz)
    headers = {"ETag": etag, "Vary": "Accept, Accept-Encoding", "Cache-Control": "no-cache"}
    if _not_modified(etag):
        return Response(status=304, headers=headers)
    key = f"{scope}|{state}|{root}"
    body = CACHE.get(key)
    if body is None:
        body = render(root)
        CACHE.put(key, body)
    if gz:
        headers["Content-Encoding"] = "gzip"
    else:
        body = gzip.decompress(body)
    response = Response(body, content_type=DICOM_JSON, headers=headers)
    response.headers["Content-Length"] = str(len(body))
    return response


def _xml_response(document: bytes) -> Response:
    """One application/dicom+xml part per instance (PS3.18 8.7.6: XML metadata is multipart)."""
    from gateway.dicomxml import to_xml

    datasets = json.loads(document)
    boundary = new_boundary()

    def parts() -> Iterator[tuple[dict[str, str], list[bytes]]]:
        for dataset in datasets:
            yield {"Content-Type": f"{DICOM_XML}; charset=utf-8"}, [to_xml(dataset)]

    return Response(
        write_parts(parts(), boundary),
        content_type=related_content_type(boundary, DICOM_XML),
        headers={"Vary": "Accept"},
    )


def _members(document_gz: bytes) -> bytes:
    """The comma-joined objects inside a gzip JSON array, brackets removed."""
    raw = seriesdoc.decompress(document_gz).strip()
    return raw[1:-1].strip()


@blueprint.get("/studies/<study_uid>/series/<series_uid>/metadata")
def series_metadata(study_uid: str, series_uid: str) -> ResponseReturnValue:
    authorize(Action.RETRIEVE)
    media = _format()
    conn = services()
    state = seriesdoc.state(conn, study_uid, series_uid)
    if state.count == 0:
        raise ObjectNotFound(f"no series {series_uid} in study {study_uid}")
    if media == DICOM_XML:
        document = seriesdoc.load(conn, study_uid, series_uid, state)
        return _xml_response(dicomjson.render(seriesdoc.decompress(document), dicomweb_root()))

    def render(root: str) -> bytes:
        document = seriesdoc.load(conn, study_uid, series_uid, state)
        return _gzip(dicomjson.render(seriesdoc.decompress(document), root))

    return _json_response(f"series/{study_uid}/{series_uid}", state.tag, render, _wants_gzip())


@blueprint.get("/studies/<study_uid>/metadata")
def study_metadata(study_uid: str) -> ResponseReturnValue:
    authorize(Action.RETRIEVE)
    media = _format()
    conn = services()
    states = seriesdoc.study_states(conn, study_uid)
    if not states:
        raise ObjectNotFound(f"no study {study_uid}")
    combined = ";".join(f"{series}:{state.tag}" for series, state in states.items())

    def document() -> bytes:
        members = [
            _members(seriesdoc.load(conn, study_uid, series, state)) for series, state in states.items()
        ]
        return b"[" + b",".join(member for member in members if member) + b"]"

    if media == DICOM_XML:
        return _xml_response(dicomjson.render(document(), dicomweb_root()))
    state_tag = hashlib.sha256(combined.encode()).hexdigest()
    return _json_response(
        f"study/{study_uid}", state_tag, lambda root: _gzip(dicomjson.render(document(), root)), _wants_gzip()
    )


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/metadata")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str) -> ResponseReturnValue:
    authorize(Action.RETRIEVE)
    media = _format()
    check_uid(study_uid, "StudyInstanceUID")
    ref = InstanceRef(study_uid, series_uid, sop_uid).checked()
    stored = retrieve.instance_metadata(services(), ref)
    document = b"[" + gzip.decompress(stored) + b"]"
    root = dicomweb_root()
    if media == DICOM_XML:
        return _xml_response(dicomjson.render(document, root))
    state = hashlib.sha256(stored).hexdigest()  # an instance's metadata never changes once stored
    return _json_response(
        f"instance/{sop_uid}", state, lambda r: _gzip(dicomjson.render(document, r)), _wants_gzip()
    )
