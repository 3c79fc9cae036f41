"""WADO-RS metadata (PS3.18 10.4.1.1.2): study, series and instance, as application/dicom+json (gzip
when the client takes it) or multipart/related application/dicom+xml. Never reads instances from
the bucket: series come from the precomputed document (gateway.seriesdoc), instances from the index.

The document describes the instances as stored. A request that gets a version (gateway.selection)
has what differs patched in, taken from the version object's own header (one range read per
instance, remembered per process): Available Transfer Syntax UID (0008,3002), the Image Pixel
attributes the version changed (Photometric Interpretation...), the lossy attributes (0028,2110/2112/
2114), and `?version=` on the Pixel Data BulkDataURI, so metadata, frames and bulk data agree.

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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue
from pydicom.tag import Tag

from gateway import accept, dicomjson, retrieve, selection, seriesdoc
from gateway.accept import DICOM_JSON, DICOM_XML, Resource
from gateway.auth import Identity
from gateway.connections import Connections
from gateway.errors import NotAcceptable, ObjectNotFound
from gateway.http import authorize, client_profile, dicomweb_root, services
from gateway.multipart import new_boundary, related_content_type, write_parts
from gateway.selection import Selection, Source
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

# Image Pixel and lossy attributes a version may change (PS3.3 C.7.6.3, C.7.6.1.1.5), palette tables
# included (dropped when palette colour was converted for lossy coding).
_PATCHED = tuple(
    f"{int(Tag(keyword)):08X}"
    for keyword in (
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
    )
)
_PALETTE = ("00281101", "00281102", "00281103", "00281199", "00281201", "00281202", "00281203",
            "00281221", "00281222", "00281223")  # fmt: skip
_AVAILABLE_SYNTAX = "00083002"
_PIXEL_DATA = "7FE00010"
_PATCH_MEMO_LIMIT = 50_000
_PATCH_MEMO: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()
_PATCH_LOCK = threading.Lock()


def version_patch(conn: Connections, source: Source) -> dict[str, Any]:
    """What differs in the metadata of `source`'s version: {"set": {tag: json}, "drop": [tags]}, from
    its header (one range read; remembered per process by SOP Instance UID, version and SHA-256)."""
    instance = source.instance
    memo = (instance.ref.sop_uid, source.version_id, instance.sha256)
    with _PATCH_LOCK:
        found = _PATCH_MEMO.get(memo)
    if found is not None:
        return found
    header = retrieve.read_header(retrieve.bucket_for(conn, instance), instance)
    values: dict[str, Any] = {_AVAILABLE_SYNTAX: {"vr": "UI", "Value": [instance.transfer_syntax]}}
    for tag in _PATCHED:
        element = header.get(int(tag, 16))
        if element is not None:
            values[tag] = element.to_json_dict(None, 1 << 20)
    patch = {
        "set": values,
        "drop": [tag for tag in (*_PATCHED, *_PALETTE) if int(tag, 16) not in header],
        "version": source.version_id,
    }
    with _PATCH_LOCK:
        _PATCH_MEMO[memo] = patch
        while len(_PATCH_MEMO) > _PATCH_MEMO_LIMIT:
            _PATCH_MEMO.popitem(last=False)
    return patch


def version_patches(conn: Connections, chosen: Selection) -> dict[str, dict[str, Any]]:
    """A patch per instance that is sent a version (not its original), header reads in parallel."""
    wanted = [source for source in chosen.sources.values() if not source.instance.is_original]
    if not wanted:
        return {}
    if len(wanted) == 1:
        return {wanted[0].instance.ref.sop_uid: version_patch(conn, wanted[0])}
    with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
        patches = list(pool.map(lambda source: version_patch(conn, source), wanted))
    return {source.instance.ref.sop_uid: patch for source, patch in zip(wanted, patches, strict=True)}


def patch_document(document: bytes, patches: Mapping[str, dict[str, Any]]) -> bytes:
    """The JSON array with each patched instance's attributes replaced (DESIGN.md "Metadata")."""
    if not patches:
        return document
    instances = json.loads(document)
    for dataset in instances:
        sop = ((dataset.get("00080018") or {}).get("Value") or [None])[0]
        patch = patches.get(sop)
        if patch is None:
            continue
        for tag in patch["drop"]:
            dataset.pop(tag, None)
        dataset.update(patch["set"])
        pixel = dataset.get(_PIXEL_DATA)
        if pixel and "BulkDataURI" in pixel:
            uri = pixel["BulkDataURI"].split("?")[0]
            pixel["BulkDataURI"] = f"{uri}?version={patch['version']}"
        ordered = dict(sorted(dataset.items()))  # PS3.18 F.2: attributes in tag order
        dataset.clear()
        dataset.update(ordered)
    return json.dumps(instances, separators=(",", ":")).encode()


def _selection(
    conn: Connections,
    who: Identity,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> Selection:
    """The version this metadata request would get (no index look-up for a plain request)."""
    facts = selection.request_facts(request.args, conn.rules.versions)
    if not selection.may_choose_a_version(facts):
        return Selection(retrieve.ORIGINAL, "no version was asked for: the metadata of the originals")
    instances = retrieve.find(conn, study_uid, series_uid, sop_uid)
    return selection.select_version(conn, instances, facts, who, client_profile())


def _state_of(chosen: Selection) -> str:
    """What the patched document depends on beyond the series document itself."""
    if not chosen.sources:
        return ""
    said = sorted((sop, s.version_id, s.instance.sha256) for sop, s in chosen.sources.items())
    return "|v=" + hashlib.sha256(repr(said).encode()).hexdigest()[:24]


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


def _labelled(response: Response, chosen: Selection) -> Response:
    response.headers.update(chosen.headers())
    return response


@blueprint.get("/studies/<study_uid>/series/<series_uid>/metadata")
def series_metadata(study_uid: str, series_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    media = _format()
    conn = services()
    state = seriesdoc.state(conn, study_uid, series_uid)
    if state.count == 0:
        raise ObjectNotFound(f"no series {series_uid} in study {study_uid}")
    chosen = _selection(conn, who, study_uid, series_uid)

    def document() -> bytes:
        raw = seriesdoc.decompress(seriesdoc.load(conn, study_uid, series_uid, state))
        return patch_document(raw, version_patches(conn, chosen))

    if media == DICOM_XML:
        return _labelled(_xml_response(dicomjson.render(document(), dicomweb_root())), chosen)
    return _labelled(
        _json_response(
            f"series/{study_uid}/{series_uid}",
            state.tag + _state_of(chosen),
            lambda root: _gzip(dicomjson.render(document(), root)),
            _wants_gzip(),
        ),
        chosen,
    )


@blueprint.get("/studies/<study_uid>/metadata")
def study_metadata(study_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    media = _format()
    conn = services()
    states = seriesdoc.study_states(conn, study_uid)
    if not states:
        raise ObjectNotFound(f"no study {study_uid}")
    combined = ";".join(f"{series}:{state.tag}" for series, state in states.items())
    chosen = _selection(conn, who, study_uid)

    def document() -> bytes:
        members = [
            _members(seriesdoc.load(conn, study_uid, series, state)) for series, state in states.items()
        ]
        joined = b"[" + b",".join(member for member in members if member) + b"]"
        return patch_document(joined, version_patches(conn, chosen))

    if media == DICOM_XML:
        return _labelled(_xml_response(dicomjson.render(document(), dicomweb_root())), chosen)
    state_tag = hashlib.sha256(combined.encode()).hexdigest() + _state_of(chosen)
    return _labelled(
        _json_response(
            f"study/{study_uid}",
            state_tag,
            lambda root: _gzip(dicomjson.render(document(), root)),
            _wants_gzip(),
        ),
        chosen,
    )


@blueprint.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/metadata")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str) -> ResponseReturnValue:
    who = authorize(Action.RETRIEVE)
    media = _format()
    check_uid(study_uid, "StudyInstanceUID")
    ref = InstanceRef(study_uid, series_uid, sop_uid).checked()
    conn = services()
    stored = retrieve.instance_metadata(conn, ref)
    chosen = _selection(conn, who, study_uid, series_uid, sop_uid)

    def document() -> bytes:
        return patch_document(b"[" + gzip.decompress(stored) + b"]", version_patches(conn, chosen))

    root = dicomweb_root()
    if media == DICOM_XML:
        return _labelled(_xml_response(dicomjson.render(document(), root)), chosen)
    state = hashlib.sha256(stored).hexdigest() + _state_of(chosen)  # stored metadata never changes
    return _labelled(
        _json_response(
            f"instance/{sop_uid}", state, lambda r: _gzip(dicomjson.render(document(), r)), _wants_gzip()
        ),
        chosen,
    )
