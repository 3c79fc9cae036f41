"""A version's Part 10 object: the original's header, new pixel data (one fragment per frame, with a
Basic or Extended Offset Table) and the attributes the new encoding requires. Shared by the derive
worker and on-the-fly transcoding. No Flask; writes only the local file it is given."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import UID

# PS3.3 C.7.6.3.1.2 / C.7.6.1.1.5: colour palette attributes dropped once pixels are converted to RGB.
_PALETTE_TAGS = (
    0x00281101,
    0x00281102,
    0x00281103,
    0x00281199,
    0x00281201,
    0x00281202,
    0x00281203,
    0x00281221,
    0x00281222,
    0x00281223,
)
# Offsets above 4 GiB need the Extended Offset Table (PS3.5 A.4).
_BOT_LIMIT = (1 << 32) - 1


@dataclass(frozen=True)
class LossyFacts:
    ratio: float
    method: str = "ISO_15444_15"


def version_dataset(
    header: Dataset,
    transfer_syntax: str,
    frames: Sequence[bytes],
    *,
    photometric: str,
    samples_per_pixel: int,
    bits_allocated: int,
    bits_stored: int,
    pixel_representation: int,
    lossy: LossyFacts | None = None,
    earlier: LossyFacts | None = None,
    earlier_method: str | None = None,
    drop_palette: bool = False,
) -> Dataset:
    """The header of `header` around the encoded frames; lossy history is appended, never replaced."""
    ds = copy.deepcopy(header)
    for tag in [t for t in ds.keys() if t.group == 0x7FE0]:
        del ds[tag]
    ds.file_meta = FileMetaDataset(copy.deepcopy(header.file_meta))
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples_per_pixel
    if samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    if drop_palette:
        for tag in _PALETTE_TAGS:
            if tag in ds:
                del ds[tag]
    if earlier is not None:  # a lossy step of the original that its header does not record
        _add_lossy_history(ds, earlier)
    if lossy is not None:
        _add_lossy_history(ds, lossy, earlier_method)
    total = sum(len(f) + (len(f) & 1) + 8 for f in frames)
    if total > _BOT_LIMIT:
        data, offsets, lengths = encapsulate_extended(list(frames))
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        ds.PixelData = encapsulate(list(frames), has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if len(frames) > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = len(frames)
    return ds


def _values(ds: Dataset, keyword: str) -> list[object]:
    if keyword not in ds or ds[keyword].VM == 0:
        return []
    value = ds[keyword].value
    return list(value) if ds[keyword].VM > 1 else [value]


def _add_lossy_history(ds: Dataset, lossy: LossyFacts, earlier_method: str | None = None) -> None:
    """PS3.3 C.7.6.1.1.5: each lossy step adds a ratio and a method, in order; a header that gave
    ratios without methods gets the method of the original's transfer syntax, when that is known."""
    earlier = ds.get("LossyImageCompression") == "01"
    ratios = _values(ds, "LossyImageCompressionRatio") if earlier else []
    methods = _values(ds, "LossyImageCompressionMethod") if earlier else []
    if len(methods) < len(ratios):
        if earlier_method is None:
            ratios = ratios[: len(methods)]
        else:
            methods = methods + [earlier_method] * (len(ratios) - len(methods))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, round(lossy.ratio, 2)]
    ds.LossyImageCompressionMethod = [*methods, lossy.method]
