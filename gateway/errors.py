"""One error hierarchy: each class carries its HTTP status, each instance says what was wrong."""

from __future__ import annotations

from typing import ClassVar

# PS3.4 Table GG.4-1 / PS3.18 Table 10.5.3-1: FailureReason (0008,1197) codes used by STOW-RS.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_CLASS = 0x0112
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# A missing or invalid UID, or an instance of another study than the request names: the data set does not
# match what the store requires (PS3.4 Table B.2-1 "Data Set does not match SOP Class" family).
DATA_SET_MISMATCH = DATA_SET_DOES_NOT_MATCH_SOP_CLASS


class GatewayError(Exception):
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class BadRequest(GatewayError):
    status = 400
    title = "Bad request"


class InvalidUID(BadRequest):
    title = "Invalid UID"


class InvalidParameter(BadRequest):
    title = "Invalid parameter"


class MalformedRequest(BadRequest):
    title = "Malformed request"


class Unauthorized(GatewayError):
    status = 401
    title = "Unauthorized"


class Forbidden(GatewayError):
    status = 403
    title = "Forbidden"


class PolicyDenied(Forbidden):
    title = "Denied by policy"


class NotFound(GatewayError):
    status = 404
    title = "Not found"


class ObjectNotFound(NotFound):
    title = "Object not found"


class NotAcceptable(GatewayError):
    status = 406
    title = "Not acceptable"


class PolicyNotAcceptable(NotAcceptable):
    """The policy engine found versions the caller may have, but none deliverable as accepted."""

    title = "No allowed version in an accepted syntax"


class Conflict(GatewayError):
    status = 409
    title = "Conflict"


class InstanceConflict(Conflict):
    title = "Instance conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(GatewayError):
    status = 415
    title = "Unsupported media type"


class RangeNotSatisfiable(GatewayError):
    status = 416
    title = "Range not satisfiable"


class Unavailable(GatewayError):
    status = 503
    title = "Service unavailable"


class PolicyUnavailable(Unavailable):
    """The version the policy chose (or the caller named) is still being made, or being restored."""

    title = "Version not available yet"


class StorageUnavailable(Unavailable):
    title = "Object storage unavailable"


class IndexUnavailable(Unavailable):
    title = "Index unavailable"


class RedisUnavailable(Unavailable):
    title = "Redis unavailable"


class CodestreamError(GatewayError):
    """A stored codestream that cannot be parsed or decoded: a fault of ours, never of the client."""

    title = "Invalid codestream"


class InstanceRejected(Exception):
    """One STOW part refused; carries the PS3.18 FailureReason code, never an HTTP status."""

    def __init__(self, reason: int, detail: str, sop_class_uid: str = "", sop_uid: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.sop_class_uid = sop_class_uid
        self.sop_uid = sop_uid


class ConfigError(Exception):
    """Bad settings at start: the message names every bad variable."""


class RulesError(Exception):
    """A rules file refused at load: the message names the file, line and reason."""
