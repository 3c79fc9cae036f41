"""Resolution levels (DESIGN.md "Resolution"): the `resolution` parameter, the RPCL prefix of an
HTJ2K frame that decodes to the level covering a display, and derived reduced-resolution instances
(new SOP Instance UID, Image Type DERIVED, Source Image Sequence, spacing scaled) made by decoding
at the reduced level and cached in the hot bucket. Core: no Flask.

Level numbers are the codestream's: 0 is the lowest resolution, `levels` the full image."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL
from pydicom.valuerep import format_number_as_ds

from gateway import codecs, keys
from gateway.connections import Connections
from gateway.dicomfile import read_header as read_file_header
from gateway.errors import CodestreamError, InvalidParameter
from gateway.pixels import PixelModule
from gateway.retrieve import FrameReader, Layout, StoredInstance, bucket_for
from gateway.uids import InstanceRef, new_uid
from gateway.versions import version_dataset

log = logging.getLogger(__name__)

HTJ2K_SYNTAXES = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
# Spacing attributes a reduced image scales so measurements stay true (PS3.3 10.7.1.3, C.8.11.4).
_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
# PS3.16 CID 7202: why the derived image references its source.
_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


@dataclass(frozen=True)
class Display:
    """The display a client names with `resolution`: columns x rows, or only the long side."""

    columns: int | None = None
    rows: int | None = None
    long_side: int | None = None

    def __str__(self) -> str:
        return str(self.long_side) if self.long_side is not None else f"{self.columns}x{self.rows}"


def display_size(display: Any) -> tuple[int, int | None]:
    """(columns or long side, rows or None) of a Display, or of anything with the same three fields
    (policies.engine.Display), as codecs.level_for_display takes them."""
    long_side = getattr(display, "long_side", None)
    if long_side is not None:
        return int(long_side), None
    return int(getattr(display, "columns", 0) or 0), int(getattr(display, "rows", 0) or 0)


def parse_display(text: str) -> Display:
    """'2000' (the long side) or '2000x1500' (columns x rows).

    Raises:
        InvalidParameter: anything else.
    """
    parts = text.strip().lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and 0 < int(p) <= 1 << 16 for p in parts):
        raise InvalidParameter(
            f"resolution {text[:40]!r} must be N or NxM (positive pixel counts)", parameter="resolution"
        )
    if len(parts) == 1:
        return Display(long_side=int(parts[0]))
    return Display(columns=int(parts[0]), rows=int(parts[1]))


def size_at(columns: int, rows: int, shift: int) -> tuple[int, int]:
    """(columns, rows) after `shift` wavelet decompositions (ISO 15444-1 B.5, origin 0)."""
    return -(-columns // (1 << shift)), -(-rows // (1 << shift))


def label(columns: int, rows: int) -> str:
    return f"{columns}x{rows}"


# --- frames: codestream prefixes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Prefix:
    """A frame's bytes for a display: the codestream cut after `level`, or whole (full=True)."""

    data: bytes
    columns: int
    rows: int
    full: bool


def frame_prefix(codestream: bytes, display: Any) -> Prefix | None:
    """The RPCL prefix of an HTJ2K/J2K frame that decodes to the smallest level covering `display`;
    None when the bytes are not a codestream this can cut (then the frame goes whole)."""
    try:
        info = codecs.validate_codestream(codestream)
    except CodestreamError:
        return None
    level = codecs.level_for_display(info.width, info.height, info.levels, *display_size(display))
    columns, rows = info.size_at(level)
    if level >= info.levels:
        return Prefix(codestream, columns, rows, True)
    try:
        return Prefix(codecs.resolution_prefix(codestream, level), columns, rows, False)
    except CodestreamError:  # not one tile-part per resolution: only the whole frame decodes
        return Prefix(codestream, info.width, info.height, True)


def prefix_resolution(codestream: bytes, end: int) -> tuple[int, int] | None:
    """The largest resolution whose tile-parts all lie in codestream[:end] (what a client holding the
    bytes up to `end` can decode), or None when not even the lowest does or the bytes are no codestream."""
    try:
        info = codecs.validate_codestream(codestream)
    except CodestreamError:
        return None
    if info.tiles != 1 or len(info.tile_parts) != info.levels + 1:
        return (info.width, info.height) if end >= len(codestream) else None
    complete = [index for index, part in enumerate(info.tile_parts) if part.end <= end]
    if not complete:
        return None
    return info.size_at(min(len(complete) - 1, info.levels))


# --- instances: derived reduced-resolution objects -----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How far an image is reduced for a display: `shift` decompositions, to columns x rows."""

    shift: int
    columns: int
    rows: int

    @property
    def factor(self) -> int:
        return 1 << self.shift


def plan(instance: StoredInstance, display: Any) -> Plan | None:
    """The reduction the display allows, from the indexed size alone; None when full size is needed
    (or the object has no pixel data), so the instance is sent as it is."""
    if instance.layout is None or not instance.rows or not instance.columns:
        return None
    columns, rows = instance.columns, instance.rows
    levels = codecs.decomposition_levels(columns, rows)
    level = codecs.level_for_display(columns, rows, levels, *display_size(display))
    if level >= levels:
        return None
    shift = levels - level
    return Plan(shift, *size_at(columns, rows, shift))


def reduced_instance(
    conn: Connections, source: StoredInstance, version_id: str, reduction: Plan, original: InstanceRef
) -> StoredInstance:
    """The derived instance of `source` (the version `version_id` of `original`) at `reduction`: read
    from the hot bucket's cache, or made and put there first, so one request's UID stays the same.

    Raises:
        UndecodablePixelData, CodestreamError: the source cannot be decoded.
        ObjectNotFound, StorageUnavailable: the source cannot be read or the cache written.
    """
    key = keys.reduced(original, version_id, reduction.columns, reduction.rows)
    with tempfile.TemporaryDirectory(prefix="reduced-") as work:
        path = os.path.join(work, "reduced.dcm")
        if conn.hot.head(key) is not None:
            with open(path, "wb") as out:
                out.write(conn.hot.get_bytes(key))
            return _stored(path, key, version_id, original)
        ds = _derive(conn, source, version_id, reduction, original)
        dcmwrite(path, ds, enforce_file_format=True)
        stored = _stored(path, key, version_id, original)
        metadata = {"sop-instance-uid": stored.ref.sop_uid, "source-version": version_id}
        conn.hot.put_file(key, path, stored.sha256, metadata)
        log.info("made %s at %s from %s", stored.ref.sop_uid, key, version_id)
        return stored


def _stored(path: str, key: str, version_id: str, original: InstanceRef) -> StoredInstance:
    header, layout = read_file_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return StoredInstance(
        ref=InstanceRef(original.study_uid, original.series_uid, str(header.SOPInstanceUID)),
        sop_class_uid=str(header.SOPClassUID),
        transfer_syntax=str(header.file_meta.TransferSyntaxUID),
        size=os.path.getsize(path),
        sha256=digest.hexdigest(),
        number_of_frames=max(1, int(header.get("NumberOfFrames", 1) or 1)),
        instance_number=header.get("InstanceNumber"),
        layout=Layout.from_json(layout.to_json()) if layout else None,
        rows=int(header.Rows),
        columns=int(header.Columns),
        version=version_id,
        object_key=key,
    )


def _derive(
    conn: Connections, source: StoredInstance, version_id: str, reduction: Plan, original: InstanceRef
) -> Dataset:
    bucket = bucket_for(conn, source)
    reader = FrameReader(bucket, source)
    header = reader.header()
    pm = PixelModule.from_dataset(header)
    frames: list[bytes] = []
    photometric, converted, width, shape = pm.photometric_interpretation, False, 0, (0, 0)
    for index in range(source.number_of_frames):
        array, photometric, converted = _reduced_frame(reader, header, pm, index, reduction.shift)
        width, shape = 8 * array.dtype.itemsize, array.shape[:2]
        frames.append(
            codecs.encode_lossless(
                array,
                bits_stored=width if converted else pm.bits_stored,
                signed=pm.pixel_representation == 1 and not converted,
                photometric=photometric,
            )
        )
    ds = version_dataset(
        header,
        HTJ2KLosslessRPCL,
        frames,
        photometric=codecs.coded_photometric(photometric, lossy=False),
        samples_per_pixel=3 if photometric == "RGB" else 1,
        bits_allocated=width if converted else pm.bits_allocated,
        bits_stored=width if converted else pm.bits_stored,
        pixel_representation=0 if converted else pm.pixel_representation,
        drop_palette=converted,
    )
    _as_derived(ds, original, version_id, reduction, conn.settings.uid_root)
    ds.Rows, ds.Columns = shape  # what the decoder gave (equal to the plan's for our codestreams)
    return ds


def _reduced_frame(
    reader: FrameReader, header: Dataset, pm: PixelModule, index: int, shift: int
) -> tuple[np.ndarray, str, bool]:
    """One frame decoded at the reduced level: straight from a multi-resolution HTJ2K codestream,
    else from a lossless HTJ2K encoding of its pixels (the same wavelet low-pass, never a resample).
    Palette indices are mapped to RGB first: averaging indices would mix unrelated colours."""
    palette = pm.photometric_interpretation == "PALETTE COLOR"
    if reader.instance.transfer_syntax in HTJ2K_SYNTAXES and reader.indexed and not palette:
        codestream = reader.stored(index)
        try:
            info = codecs.validate_codestream(codestream)
            if info.levels >= shift and info.components in (1, 3):
                photometric = "RGB" if info.components == 3 else pm.photometric_interpretation
                return codecs.decode_reduced(codestream, info.levels - shift), photometric, False
        except CodestreamError as exc:
            log.info("frame %d of %s decoded whole: %s", index + 1, reader.instance.ref.sop_uid, exc.detail)
    array, properties = reader.array(index)
    photometric = str(properties.get("photometric_interpretation") or pm.photometric_interpretation)
    converted = False
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(array, header)
        array = (rgb >> 8 if rgb.max() > 255 else rgb).astype(np.uint8)  # 8 bits per channel shown
        photometric, converted = "RGB", True
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):
        array, photometric = convert_color_space(array, photometric, "RGB"), "RGB"
    bits = (8 if array.dtype.itemsize == 1 else 16) if converted else pm.bits_stored
    signed = pm.pixel_representation == 1 and not converted
    codestream = codecs.encode_lossless(
        np.ascontiguousarray(array), bits_stored=bits, signed=signed, photometric=photometric
    )
    levels = codecs.validate_codestream(codestream).levels
    return codecs.decode_reduced(codestream, max(0, levels - shift)), photometric, converted


def _scaled(value: Any, factor: int) -> list[str]:
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [format_number_as_ds(float(v) * factor) for v in items]


def _scale_spacing(ds: Dataset, factor: int) -> None:
    for keyword in _SPACINGS:
        if keyword in ds and ds[keyword].VM:
            setattr(ds, keyword, _scaled(ds[keyword].value, factor))
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(groups) or []:
            for measures in item.get("PixelMeasuresSequence") or []:
                if "PixelSpacing" in measures and measures["PixelSpacing"].VM:
                    measures.PixelSpacing = _scaled(measures.PixelSpacing, factor)


def _as_derived(ds: Dataset, original: InstanceRef, version_id: str, reduction: Plan, uid_root: str) -> None:
    """PS3.3 C.7.6.1.1.2-3, C.12.1.1.3: a new instance that says what it was derived from and how."""
    uid = new_uid(uid_root)
    source_class = str(ds.SOPClassUID)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source_class
    reference.ReferencedSOPInstanceUID = original.sop_uid
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _PURPOSE
    reference.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.SourceImageSequence = Sequence([reference])
    ds.DerivationDescription = (
        f"Reduced to {label(reduction.columns, reduction.rows)} (1/{reduction.factor} per side) by decoding "
        f"wavelet resolution level {reduction.shift} below full size of the {version_id} version"
    )
    ds.Rows, ds.Columns = reduction.rows, reduction.columns
    _scale_spacing(ds, reduction.factor)
    for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x601E and t.group % 2 == 0]:
        del ds[tag]  # overlays are drawn on the full-size pixel grid (PS3.3 C.9.2)
