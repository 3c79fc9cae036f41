"""UID validation (PS3.5 9.1) and the InstanceRef value passed between modules."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from gateway.errors import InvalidUID

# PS3.5 9.1: digits and dots, components without leading zeros (a lone 0 is fine), at most 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


def check_uid(value: str, what: str = "UID") -> str:
    """Return the UID unchanged, or raise InvalidUID saying which one and why."""
    if not isinstance(value, str) or not value:
        raise InvalidUID(f"{what} is empty", parameter=what)
    if len(value) > 64:
        raise InvalidUID(f"{what} {value[:80]!r} is longer than 64 characters", parameter=what)
    if _UID.match(value) is None:
        raise InvalidUID(
            f"{what} {value[:80]!r} is not a DICOM UID (digits and dots, no empty or zero-led component)",
            parameter=what,
        )
    return value


def new_uid(root: str = "2.25.") -> str:
    """A fresh UID under `root`; the default 2.25. form is UUID-derived (PS3.5 B.2)."""
    if root == "2.25.":
        return f"2.25.{uuid.uuid4().int}"
    suffix = str(uuid.uuid4().int)
    return (root + suffix)[:64].rstrip(".")


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str

    def checked(self) -> InstanceRef:
        check_uid(self.study_uid, "StudyInstanceUID")
        check_uid(self.series_uid, "SeriesInstanceUID")
        check_uid(self.sop_uid, "SOPInstanceUID")
        return self
