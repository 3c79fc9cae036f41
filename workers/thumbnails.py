"""Precomputed thumbnails: one instance -> thumbnail.jpg beside its versions in the hot bucket, so
/thumbnail answers without reading or decoding the image. The derive job calls make_thumbnail once
its versions are stored; /thumbnail renders (and keeps) one itself when none is there yet."""

from __future__ import annotations

import logging

from gateway import rendering, retrieve
from gateway.connections import Connections
from gateway.retrieve import FrameReader
from gateway.uids import InstanceRef

log = logging.getLogger(__name__)


def make_thumbnail(conn: Connections, ref: InstanceRef) -> None:
    """Render the first frame of the original (pixel-identical source) at THUMBNAIL_SIZE and store it.
    Objects that are not images (SR, documents, video) get none.

    Raises:
        ObjectNotFound: the instance is not indexed or its original is gone.
        UndecodablePixelData: its pixels cannot be decoded (the derive job fails the same way).
        StorageUnavailable: reading the original or writing the thumbnail failed.
    """
    instance = retrieve.one(conn, ref.study_uid, ref.series_uid, ref.sop_uid)
    if not rendering.is_image(instance):
        return
    reader = FrameReader(
        retrieve.bucket_for(conn, instance), instance, lambda: retrieve.pixel_module(conn, instance.ref)
    )
    arr, properties = reader.array(0)
    data = rendering.render(arr, properties, reader.header(), rendering.thumbnail_options())
    rendering.store_thumbnail(conn.hot, instance.ref, data)
    log.info("thumbnail of %s stored (%d bytes)", ref.sop_uid, len(data))
