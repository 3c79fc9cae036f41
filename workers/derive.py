"""Job: one instance -> its lossless and lossy HTJ2K versions in the hot bucket, recorded in the index.

Idempotent (only versions not yet ready are made), retried by RQ on faults, and never leaves a partial
object under a version key: each version is written whole to a local file and put in one atomic put."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from rq import get_current_job
from sqlalchemy import select

from gateway import codecs, keys, tiers
from gateway.connections import Connections
from gateway.dicomfile import PixelLayout, read_frame, read_header
from gateway.errors import GatewayError
from gateway.index.db import session_scope
from gateway.index.models import Instance, Version
from gateway.metrics import DERIVE_JOBS, DERIVE_SECONDS
from gateway.pixels import ALWAYS_LOSSY, LOSSY_METHOD, UndecodablePixelData, decode_dataset, decode_frame
from gateway.storage import file_sha256
from gateway.uids import InstanceRef
from gateway.versions import LossyFacts, version_dataset
from policies.rules import Kind, VersionRules, VersionSpec
from workers import context, thumbnails

log = logging.getLogger(__name__)


class DeriveFailed(Exception):
    """The instance's pixels cannot be coded: retrying cannot help, the job goes to RQ's failed registry."""


def _no_more_retries() -> None:
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
        job.save()


@dataclass
class Encoded:
    """The frames of one version as they are encoded, with running totals for ratio and PSNR."""

    spec: VersionSpec
    target: float | None = None
    frames: list[bytes] = field(default_factory=list)
    squared_error: float = 0.0
    samples: int = 0

    @property
    def size(self) -> int:
        return sum(len(f) for f in self.frames)


def derive_instance(study_uid: str, series_uid: str, sop_uid: str) -> dict[str, str]:
    """RQ entry point; returns each version's state (kept as the job result for an hour)."""
    conn = context.connections()
    return derive(conn, InstanceRef(study_uid, series_uid, sop_uid).checked())


def derive(conn: Connections, ref: InstanceRef) -> dict[str, str]:
    rules = conn.rules.versions
    owed = _owed(conn, ref)
    if not owed:
        return {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="derive-") as work:
        source = os.path.join(work, "original.dcm")
        # Through the tiers: a re-derive works when the original is cold; archived, the job retries later.
        with tiers.originals(conn).open(keys.original(ref)) as body, open(source, "wb") as out:
            shutil.copyfileobj(body, out, 1 << 20)
        try:
            header, layout = read_header(source)
            results = _encode_all(source, header, layout, rules, [rules.by_id(v) for v in owed])
        except (UndecodablePixelData, GatewayError, ValueError) as exc:
            reason = getattr(exc, "detail", None) or str(exc)
            _finish_failed(conn, ref, owed, f"pixel data cannot be coded: {reason}", final=True)
            log.warning("derive of %s failed for good: %s", ref.sop_uid, reason)
            DERIVE_JOBS.labels("failed").inc()
            _no_more_retries()
            raise DeriveFailed(f"{ref.sop_uid}: {reason}") from exc
        except Exception as exc:
            _finish_failed(conn, ref, owed, f"{type(exc).__name__}: {exc}", final=False)
            DERIVE_JOBS.labels("retry").inc()
            raise
        try:
            states = _store_all(conn, ref, header, work, results, _pixel_bytes(layout, source))
        except Exception as exc:  # S3 or index fault: RQ retries the job
            _finish_failed(
                conn, ref, [v for v in owed if _state(conn, ref, v) != "ready"], str(exc), final=False
            )
            raise
    try:
        thumbnails.make_thumbnail(conn, ref)
    except GatewayError as exc:  # a convenience: /thumbnail renders and keeps one on demand
        log.warning("thumbnail of %s not made: %s", ref.sop_uid, exc.detail)
    elapsed = time.perf_counter() - started
    DERIVE_SECONDS.observe(elapsed)
    DERIVE_JOBS.labels("done").inc()
    log.info("derived %s in %.2fs: %s", ref.sop_uid, elapsed, states)
    return states


def _owed(conn: Connections, ref: InstanceRef) -> list[str]:
    with session_scope(conn.sessions) as session:
        if session.get(Instance, ref.sop_uid) is None:
            return []
        rows = session.execute(
            select(Version.version_id).where(
                Version.sop_uid == ref.sop_uid, Version.state.in_(("pending", "failed"))
            )
        ).scalars()
        return list(rows)


def _frames(source: str, header: Dataset, layout: PixelLayout | None) -> Iterator[tuple[np.ndarray, dict]]:
    """Decoded frames, one at a time where the layout allows: a multi-frame never sits whole in memory."""
    syntax = str(header.file_meta.TransferSyntaxUID)
    if layout is not None and layout.frames is not None:
        with open(source, "rb") as fp:
            for index in range(len(layout.frames)):
                yield decode_frame(header, read_frame(fp, layout, index), syntax, layout.vr)
        return
    whole = pydicom.dcmread(source)
    array, properties = decode_dataset(whole)
    frames = int(whole.get("NumberOfFrames", 1) or 1)
    for index in range(frames):
        yield (array[index] if frames > 1 else array), properties


def _encode_all(
    source: str,
    header: Dataset,
    layout: PixelLayout | None,
    rules: VersionRules,
    specs: list[VersionSpec | None],
) -> dict[str, Encoded]:
    modality = str(header.get("Modality", "") or "")
    body_part = str(header.get("BodyPartExamined", "") or "")
    results: dict[str, Encoded] = {}
    for spec in specs:
        if spec is None:
            continue
        target = None
        if spec.kind is Kind.LOSSY:
            target = rules.target_ratio(
                spec.id,
                modality,
                body_part,
                str(header.get("StudyDescription", "") or ""),
                str(header.get("SeriesDescription", "") or ""),
            )
        results[spec.id] = Encoded(spec, target)
    bits_stored = int(header.get("BitsStored", header.get("BitsAllocated", 8)))
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    for array, properties in _frames(source, header, layout):
        photometric = str(
            properties.get("photometric_interpretation", header.get("PhotometricInterpretation"))
        )
        for encoded in results.values():
            if encoded.spec.kind is Kind.LOSSLESS:
                encoded.frames.append(
                    codecs.encode_lossless(
                        array, bits_stored=bits_stored, signed=signed, photometric=photometric
                    )
                )
                continue
            pixels, lossy_bits, lossy_photometric = _for_lossy(array, header, photometric, bits_stored)
            result = codecs.encode_lossy(
                pixels,
                bits_stored=lossy_bits,
                signed=signed and pixels.dtype.kind == "i",
                photometric=lossy_photometric,
                target_ratio=encoded.target or 10.0,
            )
            encoded.frames.append(result.data)
            peak = float((1 << lossy_bits) - 1)
            mse = 0.0 if math.isinf(result.psnr) else peak * peak / (10 ** (result.psnr / 10))
            encoded.squared_error += mse * pixels.size
            encoded.samples += pixels.size
    return results


def _for_lossy(
    array: np.ndarray, header: Dataset, photometric: str, bits_stored: int
) -> tuple[np.ndarray, int, str]:
    """Palette colour becomes RGB for lossy coding (DESIGN.md "Details settled"); others go as decoded."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(array, header)
        bits = 8 if rgb.max() <= 255 else 16
        return rgb.astype(np.uint8 if bits == 8 else np.uint16), bits, "RGB"
    return array, bits_stored, photometric


def _uncompressed_size(header: Dataset, frames: int) -> int:
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    return int(header.Rows) * int(header.Columns) * samples * frames * int(header.BitsAllocated) // 8


def _pixel_bytes(layout: PixelLayout | None, source: str) -> int:
    """Size of the original's pixel stream (the file size when the frames cannot be told apart)."""
    if layout is None or layout.frames is None:
        return os.path.getsize(source)
    if not layout.encapsulated:
        return sum(length for _offset, length in layout.frames)
    return sum(length for frame in layout.frames for _offset, length in frame)


def _store_all(
    conn: Connections,
    ref: InstanceRef,
    header: Dataset,
    work: str,
    results: dict[str, Encoded],
    original_size: int,
) -> dict[str, str]:
    frames = max((len(e.frames) for e in results.values()), default=0)
    uncompressed = _uncompressed_size(header, frames)
    lossless_ratio = uncompressed / max(1, results["lossless"].size) if "lossless" in results else None
    if lossless_ratio is None:
        lossless_ratio = _stored_lossless_ratio(conn, ref)
    original_lossy = str(header.get("LossyImageCompression", "")) == "01"
    states: dict[str, str] = {}
    for version_id, encoded in results.items():
        ratio = uncompressed / max(1, encoded.size)
        if (
            encoded.spec.kind is Kind.LOSSY
            and lossless_ratio
            and encoded.target
            and lossless_ratio >= encoded.target
        ):
            reason = f"lossless already reaches 1/{lossless_ratio:.1f}, target 1/{encoded.target:g}"
            _record(conn, ref, version_id, state="skipped", reason=reason, target_ratio=encoded.target)
            states[version_id] = "skipped"
            continue
        if encoded.spec.kind is Kind.LOSSY and original_lossy and encoded.size >= original_size:
            _record(
                conn,
                ref,
                version_id,
                state="skipped",
                target_ratio=encoded.target,
                reason="the original is already lossy and smaller than this version",
            )
            states[version_id] = "skipped"
            continue
        psnr = _psnr(encoded, header) if encoded.spec.kind is Kind.LOSSY else math.inf
        dataset = _dataset(header, encoded, ratio, uncompressed / max(1, original_size))
        path = os.path.join(work, f"{version_id}.dcm")
        dataset.save_as(path, enforce_file_format=True)
        digest = file_sha256(path)
        _, layout = read_header(path)
        metadata = {
            "transfer-syntax": str(encoded.spec.transfer_syntax),
            "ratio": f"{ratio:.3f}",
            "psnr": "inf" if math.isinf(psnr) else f"{psnr:.2f}",
        }
        conn.hot.put_file(keys.version(ref, version_id), path, digest, metadata)
        _record(
            conn,
            ref,
            version_id,
            state="ready",
            reason=None,
            transfer_syntax_uid=encoded.spec.transfer_syntax,
            size=os.path.getsize(path),
            sha256=digest,
            target_ratio=encoded.target,
            ratio=ratio,
            psnr=None if math.isinf(psnr) else psnr,
            frames=layout.to_json() if layout else None,
        )
        states[version_id] = "ready"
    return states


def _state(conn: Connections, ref: InstanceRef, version_id: str) -> str | None:
    with session_scope(conn.sessions) as session:
        row = session.get(Version, (ref.sop_uid, version_id))
        return row.state if row is not None else None


def _stored_lossless_ratio(conn: Connections, ref: InstanceRef) -> float | None:
    with session_scope(conn.sessions) as session:
        row = session.get(Version, (ref.sop_uid, "lossless"))
        return row.ratio if row is not None and row.state == "ready" else None


def _psnr(encoded: Encoded, header: Dataset) -> float:
    if not encoded.samples or encoded.squared_error == 0:
        return math.inf
    bits = int(header.get("BitsStored", 8))
    if str(header.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        bits = 8
    peak = float((1 << bits) - 1)
    return 10 * math.log10(peak * peak / (encoded.squared_error / encoded.samples))


def _dataset(header: Dataset, encoded: Encoded, ratio: float, original_ratio: float) -> Dataset:
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    bits_allocated = int(header.BitsAllocated)
    bits_stored = int(header.get("BitsStored", bits_allocated))
    palette = photometric == "PALETTE COLOR"
    lossy = encoded.spec.kind is Kind.LOSSY
    if palette and lossy:
        samples, bits_allocated, bits_stored = 3, 8, 8
    colour = samples == 3
    # PS3.5 8.2.14: colour HTJ2K carries YBR_RCT (reversible) or YBR_ICT (irreversible) colour transforms.
    new_photometric = ("YBR_ICT" if lossy else "YBR_RCT") if colour else photometric
    return version_dataset(
        header,
        str(encoded.spec.transfer_syntax),
        encoded.frames,
        photometric=new_photometric,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=0 if (palette and lossy) else int(header.get("PixelRepresentation", 0) or 0),
        lossy=LossyFacts(ratio) if lossy else None,
        earlier=_earlier_lossy(header, original_ratio),
        earlier_method=LOSSY_METHOD.get(str(header.file_meta.TransferSyntaxUID)),
        drop_palette=palette and lossy,
    )


def _earlier_lossy(header: Dataset, original_ratio: float) -> LossyFacts | None:
    """A JPEG baseline/extended original is lossy even when its header forgot to say so (PS3.5 8.2.1)."""
    syntax = str(header.file_meta.TransferSyntaxUID)
    if syntax in ALWAYS_LOSSY and str(header.get("LossyImageCompression", "")) != "01":
        return LossyFacts(original_ratio, LOSSY_METHOD[syntax])
    return None


def _record(conn: Connections, ref: InstanceRef, version_id: str, **values: object) -> None:
    with session_scope(conn.sessions) as session:
        row = session.get(Version, (ref.sop_uid, version_id))
        if row is None:
            return  # the instance was deleted meanwhile
        for name, value in values.items():
            setattr(row, name, value)


def _finish_failed(conn: Connections, ref: InstanceRef, owed: list[str], reason: str, final: bool) -> None:
    with session_scope(conn.sessions) as session:
        for version_id in owed:
            row = session.get(Version, (ref.sop_uid, version_id))
            if row is not None:
                row.attempts = (row.attempts or 0) + 1
                row.state = "failed"
                row.reason = reason if final else f"attempt {row.attempts} failed ({reason}); retrying"
