"""DICOM JSON (PS3.18 F.2): instance metadata with bulk data as BulkDataURI, and the STOW store response.

BulkDataURI values are stored relative, as BULK_TOKEN + "/studies/...", and rendered per request by
render(), so one precomputed document serves every external URL (PUBLIC_URL, proxies, prefixes)."""

from __future__ import annotations

import gzip
import json
import logging
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from gateway.dicomfile import PixelLayout
from gateway.uids import InstanceRef

log = logging.getLogger(__name__)

BULK_TOKEN = "@@DICOMWEB@@"
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_THRESHOLD = 1024


def instance_url(ref: InstanceRef, root: str = BULK_TOKEN) -> str:
    return f"{root}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"


def _element_json(element: DataElement) -> dict[str, Any]:
    try:
        return element.to_json_dict(None, BULK_THRESHOLD * 1024 * 1024)
    except Exception:  # a malformed value: keep what we can, as received, never fail the store
        value = element.value
        if isinstance(value, bytes):
            import base64

            return {"vr": element.VR, "InlineBinary": base64.b64encode(value).decode()}
        text = str(value) if value not in (None, "") else None
        return {"vr": element.VR, **({"Value": [text]} if text else {})}


def _walk(ds: Dataset, base: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for element in ds:
        tag = element.tag
        if tag.group == 0x0002 or tag.element == 0x0000:
            continue
        key = f"{tag:08X}"
        if element.VR == "SQ":
            items = [
                _walk(item, base, f"{path}{key}/{index}/") for index, item in enumerate(element.value or [])
            ]
            out[key] = {"vr": "SQ", **({"Value": items} if items else {})}
        elif element.VR in BULK_VRS and element.value is not None and len(element.value) > BULK_THRESHOLD:
            out[key] = {"vr": element.VR, "BulkDataURI": f"{base}/bulkdata/{path}{key}"}
        else:
            out[key] = _element_json(element)
    return out


def instance_json(header: Dataset, ref: InstanceRef, pixels: PixelLayout | None) -> dict[str, Any]:
    """The instance's DICOM JSON with tokenised BulkDataURIs; pixel data is never inline."""
    base = instance_url(ref)
    out = _walk(header, base, "")
    if pixels is not None:
        out["7FE00010"] = {"vr": pixels.vr, "BulkDataURI": f"{base}/bulkdata/7FE00010"}
    return dict(sorted(out.items()))


def compress(document: Any) -> bytes:
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


def render(raw: bytes, dicomweb_root: str) -> bytes:
    """Make every tokenised BulkDataURI absolute under the external DICOMweb root."""
    return raw.replace(BULK_TOKEN.encode(), dicomweb_root.encode())


def _ul(value: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [value]}


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _ur(value: str) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]}


def store_response(
    stored: list[tuple[InstanceRef, str]],
    failed: list[tuple[str, str, int, str]],
    dicomweb_root: str,
    study_uid: str | None,
) -> dict[str, Any]:
    """PS3.18 10.5.3 Store Instances Response Module.

    stored: (ref, sop_class_uid); failed: (sop_class_uid, sop_uid, FailureReason, detail)."""
    response: dict[str, Any] = {}
    studies = {ref.study_uid for ref, _ in stored}
    target = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    if target:
        response["00081190"] = _ur(f"{dicomweb_root}/studies/{target}")
    if failed:
        response["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(sop_class),
                    "00081155": _ui(sop_uid),
                    "00081197": _ul(reason),
                    # Error Comment: the reason in words for people; FailureReason is the code.
                    "00000902": {"vr": "LO", "Value": [detail[:1024]]},
                }
                for sop_class, sop_uid, reason, detail in failed
            ],
        }
    if stored:
        response["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(sop_class),
                    "00081155": _ui(ref.sop_uid),
                    "00081190": _ur(instance_url(ref, dicomweb_root)),
                }
                for ref, sop_class in stored
            ],
        }
    return response
