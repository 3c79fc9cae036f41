"""What a retrieve covers: the stored instances of a study, series or instance (index look-ups) and
reads of their originals (headers, frames, byte ranges). Core: no Flask; bucket and index errors
arrive already translated (ObjectNotFound, StorageUnavailable, IndexUnavailable)."""

from __future__ import annotations

import copy
import gzip
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO

import numpy as np
from cachetools import TTLCache
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import case, select

from gateway import keys, pixels, tiers
from gateway.connections import Connections
from gateway.dicomfile import PixelLayout
from gateway.errors import ObjectNotFound
from gateway.index.db import session_scope
from gateway.index.models import Instance
from gateway.pixels import PixelModule
from gateway.storage import Bucket
from gateway.uids import InstanceRef, check_uid

CHUNK = 1 << 20


# Where the Pixel Data lies in a stored object (the index's pixel_layout / frames JSON).
Layout = PixelLayout


ORIGINAL = "original"


@dataclass(frozen=True)
class StoredInstance:
    """One stored object as a retrieve reads it: the original, or (version set) a version of it in the
    hot bucket, or (object_key set) a derived object such as a reduced-resolution instance."""

    ref: InstanceRef
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    number_of_frames: int
    instance_number: int | None
    layout: Layout | None
    rows: int | None = None
    columns: int | None = None
    version: str = ORIGINAL
    object_key: str | None = None

    @property
    def key(self) -> str:
        if self.object_key is not None:
            return self.object_key
        if self.version == ORIGINAL:
            return keys.original(self.ref)
        return keys.version(self.ref, self.version)

    @property
    def is_original(self) -> bool:
        return self.version == ORIGINAL and self.object_key is None


_COLUMNS = (
    Instance.study_uid,
    Instance.series_uid,
    Instance.sop_uid,
    Instance.sop_class_uid,
    Instance.transfer_syntax_uid,
    Instance.size,
    Instance.sha256,
    Instance.number_of_frames,
    Instance.instance_number,
    Instance.pixel_layout,
    Instance.rows,
    Instance.columns,
)


def _ordered(query: Any) -> Any:
    """Instance Number order, unnumbered instances last, SOP Instance UID breaking ties (stable)."""
    return query.order_by(
        case((Instance.instance_number.is_(None), 1), else_=0), Instance.instance_number, Instance.sop_uid
    )


def find(
    conn: Connections, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[StoredInstance]:
    """The stored instances a retrieve names, in series then instance order.

    Raises:
        InvalidUID: a UID is malformed (400).
        ObjectNotFound: nothing is stored under these UIDs (404).
    """
    check_uid(study_uid, "StudyInstanceUID")
    query = select(*_COLUMNS).where(Instance.study_uid == study_uid)
    if series_uid is not None:
        query = query.where(Instance.series_uid == check_uid(series_uid, "SeriesInstanceUID"))
    if sop_uid is not None:
        query = query.where(Instance.sop_uid == check_uid(sop_uid, "SOPInstanceUID"))
    query = _ordered(query.order_by(Instance.series_uid))
    with session_scope(conn.sessions) as session:
        rows = session.execute(query).all()
    if not rows:
        raise ObjectNotFound(_missing(study_uid, series_uid, sop_uid))
    return [
        StoredInstance(
            ref=InstanceRef(row.study_uid, row.series_uid, row.sop_uid),
            sop_class_uid=row.sop_class_uid,
            transfer_syntax=row.transfer_syntax_uid,
            size=int(row.size),
            sha256=row.sha256,
            number_of_frames=max(1, int(row.number_of_frames or 1)),
            instance_number=row.instance_number,
            layout=Layout.from_json(row.pixel_layout),
            rows=row.rows,
            columns=row.columns,
        )
        for row in rows
    ]


def _missing(study_uid: str, series_uid: str | None, sop_uid: str | None) -> str:
    if sop_uid is not None:
        return f"no instance {sop_uid} in series {series_uid} of study {study_uid}"
    if series_uid is not None:
        return f"no series {series_uid} in study {study_uid}"
    return f"no study {study_uid}"


# A viewer asks for an instance's frames one request at a time: its index row (immutable once stored)
# is kept a few seconds per process. A deleted instance then fails at the bucket read, with a 404.
_RECENT: TTLCache[tuple[int, str, str, str], StoredInstance] = TTLCache(maxsize=20000, ttl=10)
_RECENT_LOCK = threading.Lock()


def one(conn: Connections, study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
    key = (id(conn), study_uid, series_uid, sop_uid)
    with _RECENT_LOCK:
        found = _RECENT.get(key)
    if found is None:
        found = find(conn, study_uid, series_uid, sop_uid)[0]
        with _RECENT_LOCK:
            _RECENT[key] = found
    return found


def instance_metadata(conn: Connections, ref: InstanceRef) -> bytes:
    """The gzip of the instance's DICOM JSON (BulkDataURI tokenised), as indexed at STOW.

    Raises:
        ObjectNotFound: no such instance in that series and study.
    """
    query = select(Instance.metadata_gz).where(
        Instance.sop_uid == check_uid(ref.sop_uid, "SOPInstanceUID"),
        Instance.series_uid == check_uid(ref.series_uid, "SeriesInstanceUID"),
        Instance.study_uid == check_uid(ref.study_uid, "StudyInstanceUID"),
    )
    with session_scope(conn.sessions) as session:
        value = session.execute(query).scalar_one_or_none()
    if value is None:
        raise ObjectNotFound(_missing(ref.study_uid, ref.series_uid, ref.sop_uid))
    return bytes(value)


def pixel_module(conn: Connections, ref: InstanceRef) -> PixelModule:
    """The Image Pixel attributes, from the indexed metadata (no bucket read)."""
    document = json.loads(gzip.decompress(instance_metadata(conn, ref)))
    return pixel_module_from_json(document)


def pixel_module_from_json(document: dict[str, Any]) -> PixelModule:
    ds = Dataset()
    for tag, keyword in (
        ("00280010", "Rows"),
        ("00280011", "Columns"),
        ("00280002", "SamplesPerPixel"),
        ("00280100", "BitsAllocated"),
        ("00280101", "BitsStored"),
        ("00280103", "PixelRepresentation"),
        ("00280004", "PhotometricInterpretation"),
        ("00280006", "PlanarConfiguration"),
        ("00280008", "NumberOfFrames"),
    ):
        values = document.get(tag, {}).get("Value") or []
        if values and values[0] is not None:
            setattr(ds, keyword, values[0])
    return PixelModule.from_dataset(ds)


def originals(conn: Connections) -> Bucket:
    """Originals wherever their tier put them (originals bucket, or a cold class)."""
    return tiers.originals(conn)  # type: ignore[return-value]


def bucket_for(conn: Connections, instance: StoredInstance) -> Bucket:
    """Where `instance` is read from: originals for an original, the hot tier for anything derived."""
    return originals(conn) if instance.is_original else tiers.versions(conn)  # type: ignore[return-value]


def read_frame(bucket: Bucket, key: str, layout: Layout, index: int) -> bytes:
    """One frame's stored bytes (a codestream, or native pixels) with a single range read.

    The fragments of one frame lie in order with only 8-byte item headers between them, so one read
    spans them all and the headers are cut out here."""
    slices = layout.frame_slices(index)
    start = slices[0][0]
    end = slices[-1][0] + slices[-1][1]
    data = bucket.get_range(key, start, end - start)
    if len(slices) == 1:
        return data
    return b"".join(data[offset - start : offset - start + length] for offset, length in slices)


def read_header(bucket: Bucket, instance: StoredInstance) -> Dataset:
    """The data set up to (not including) its Pixel Data, read with one range request.

    Objects without locatable pixel data (no Pixel Data, or deflated) are read whole; they are small."""
    layout = instance.layout
    if layout is not None and layout.seekable:
        data = bucket.get_range(instance.key, 0, layout.element_start(instance.transfer_syntax))
    else:
        data = bucket.get_bytes(instance.key)
    return dcmread(BytesIO(data), force=True, stop_before_pixels=True)


def read_whole(bucket: Bucket, instance: StoredInstance) -> Dataset:
    return dcmread(BytesIO(bucket.get_bytes(instance.key)), force=True)


@dataclass
class FrameReader:
    """Reads the frames of one stored object: one range read per frame, or the whole object (once)
    when its frame boundaries are unknown (deflated data, fragments without an offset table).

    pixel_module_loader gives the Image Pixel attributes without a bucket read (the index has them
    for originals); without it they come from the object's header."""

    bucket: Bucket
    instance: StoredInstance
    pixel_module_loader: Callable[[], PixelModule] | None = None
    _pixel_module: PixelModule | None = None
    _header: Dataset | None = None
    _whole: Dataset | None = None
    _decoded: tuple[Any, dict[str, Any]] | None = None
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

    def header(self) -> Dataset:
        """The data set without its pixel data (one range read, or the whole object when unindexed)."""
        if self._header is None:
            if self.indexed:
                self._header = read_header(self.bucket, self.instance)
            else:
                whole = self.whole()
                header = Dataset({tag: element for tag, element in whole.items() if tag.group != 0x7FE0})
                header.file_meta = copy.deepcopy(whole.file_meta)
                self._header = header
        return self._header

    def use_header(self, header: Dataset) -> None:
        """Take a header the caller has read already; the pixel module follows from it."""
        self._header = header
        self._pixel_module = PixelModule.from_dataset(header)

    def pixel_module(self) -> PixelModule:
        if self._pixel_module is None:
            loader = self.pixel_module_loader
            self._pixel_module = loader() if loader else PixelModule.from_dataset(self.header())
        return self._pixel_module

    def whole(self) -> Dataset:
        if self._whole is None:
            self._whole = read_whole(self.bucket, self.instance)
        return self._whole

    def stored(self, index: int) -> bytes:
        """The frame as stored: a codestream (encapsulated) or native bytes."""
        if self.indexed:
            return read_frame(self.bucket, self.instance.key, self.layout, index)
        if not self.layout.encapsulated:
            return self.decoded(index)
        if self._stored is None:
            self._stored = list(
                generate_frames(self.whole().PixelData, number_of_frames=self.instance.number_of_frames)
            )
        return self._stored[index]

    def array(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The frame decoded, and the Image Pixel values describing the array (pixels.decode_frame)."""
        if self.indexed:
            return pixels.decode_frame(
                self.pixel_module(), self.stored(index), self.instance.transfer_syntax, self.layout.vr
            )
        if self._decoded is None:
            arr, properties = pixels.decode_dataset(self.whole())
            self._decoded = (arr if self.instance.number_of_frames > 1 else arr[None, ...], properties)
        return self._decoded[0][index], self._decoded[1]

    def decoded(self, index: int) -> bytes:
        """The frame as Explicit VR Little Endian native bytes."""
        syntax = self.instance.transfer_syntax
        if self.indexed:
            data = read_frame(self.bucket, self.instance.key, self.layout, index)
            if not self.layout.encapsulated and UID(syntax).is_little_endian:
                return data
            return pixels.native_frame_bytes(self.pixel_module(), data, syntax, self.layout.vr)[0]
        array, _ = self.array(index)
        return pixels.native_bytes(array, self.pixel_module().bits_allocated)


def stream_range(bucket: Bucket, key: str, start: int, length: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """Bytes [start, start+length) of an object, in range reads of at most `chunk` bytes."""
    end = start + length
    position = start
    while position < end:
        size = min(chunk, end - position)
        data = bucket.get_range(key, position, size)
        if not data:
            raise ObjectNotFound(f"object {key} ended at {position}, before {end}")
        yield data
        position += len(data)


class ObjectStream:
    """A whole object as chunks, opened at construction (so a missing object fails before a response
    starts) and closed when exhausted or when the server closes the response (WSGI close())."""

    def __init__(self, bucket: Bucket, key: str, chunk: int = CHUNK) -> None:
        self._handle: BinaryIO | None = bucket.open(key)
        self._chunk = chunk

    def __iter__(self) -> Iterator[bytes]:
        handle = self._handle
        if handle is None:
            return
        try:
            while True:
                data = handle.read(self._chunk)
                if not data:
                    break
                yield data
        finally:
            self.close()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


def stream_object(bucket: Bucket, key: str, chunk: int = CHUNK) -> ObjectStream:
    """A whole object as a stream of chunks; never held in memory."""
    return ObjectStream(bucket, key, chunk)


def swap_words(data: bytes, width: int) -> bytes:
    """Big-endian words of `width` bytes (2, 4 or 8) to little-endian (Explicit VR Big Endian values)."""
    if width <= 1 or len(data) < width:
        return data
    whole = len(data) - len(data) % width
    swapped = np.frombuffer(data, dtype=f">u{width}", count=whole // width).astype(f"<u{width}").tobytes()
    return swapped + data[whole:]
