"""Accept headers of DICOMweb retrieve requests -> ordered acceptable representations, and the
choice among what the server can offer (PS3.18 8.7.3-8.7.5). Pure: no I/O, no Flask.

Media-type parameters are parsed here, not by werkzeug: clients send `type=application/dicom`
unquoted (OHIF), and a `/` ends a token in werkzeug's option parser."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    MPEG2MPHL,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    MPEG4HP42STEREO,
    MPEG4HP422D,
    MPEG4HP423D,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from werkzeug.http import parse_list_header

from gateway.errors import NotAcceptable

ANY_SYNTAX = "*"
MULTIPART = "multipart/related"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"


class Resource(StrEnum):
    """Resource categories of PS3.18 8.7.3 (Table 8.7.3-1)."""

    INSTANCES = "instances"  # study, series, instance retrieve: DICOM Part 10 objects
    FRAMES = "frames"
    BULKDATA = "bulkdata"
    METADATA = "metadata"


# PS3.18 Table 8.7.3-5: media types for compressed pixel data, with their transfer syntaxes; the
# first is the media type's default transfer syntax. image/jphc is HTJ2K (Sup 235); image/jhc and
# the x- forms are spellings seen in clients, accepted as aliases.
IMAGE_TYPES: dict[str, tuple[str, ...]] = {
    "image/jpeg": (JPEGLosslessSV1, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless),
    "image/jls": (JPEGLSLossless, JPEGLSNearLossless),
    "image/jp2": (JPEG2000Lossless, JPEG2000),
    "image/jpx": (JPEG2000MCLossless, JPEG2000MC),
    "image/jphc": (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K),
    "image/dicom-rle": (RLELossless,),
    "video/mpeg2": (MPEG2MPML, MPEG2MPHL),
    "video/mp4": (MPEG4HP41, MPEG4HP41BD, MPEG4HP422D, MPEG4HP423D, MPEG4HP42STEREO),
}
ALIASES = {"image/jhc": "image/jphc", "image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}
_MEDIA_FOR_SYNTAX = {syntax: media for media, syntaxes in IMAGE_TYPES.items() for syntax in syntaxes}

# Table 8.7.3-2 / 8.7.3-5: the transfer syntax a media type means when none is given.
DEFAULT_SYNTAX: dict[str, str] = {
    DICOM: ExplicitVRLittleEndian,
    OCTET_STREAM: ExplicitVRLittleEndian,
    **{media: syntaxes[0] for media, syntaxes in IMAGE_TYPES.items()},
}

# What each resource can be represented as, the first being its default (PS3.18 8.7.4, 8.7.5).
_RESOURCE_TYPES: dict[Resource, tuple[str, ...]] = {
    Resource.INSTANCES: (DICOM,),
    Resource.FRAMES: (OCTET_STREAM, *IMAGE_TYPES),
    Resource.BULKDATA: (OCTET_STREAM, *IMAGE_TYPES),
    Resource.METADATA: (DICOM_JSON, DICOM_XML),
}


def media_type_for(transfer_syntax: str) -> str:
    """The media type PS3.18 Table 8.7.3-5 gives a transfer syntax's pixel data."""
    return _MEDIA_FOR_SYNTAX.get(transfer_syntax, OCTET_STREAM)


@dataclass(frozen=True)
class MediaRange:
    """One acceptable representation, in the client's terms.

    media_type is the single-part type, or the part type inside multipart/related; it may be a
    wildcard ("*/*", "image/*"). transfer_syntax is a UID, ANY_SYNTAX ("as stored") or None (the
    media type's default). multipart is None when the range does not say (*/*)."""

    media_type: str
    transfer_syntax: str | None
    multipart: bool | None
    q: float = 1.0
    params: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def is_wildcard(self) -> bool:
        return self.media_type.endswith("/*")

    def accepts_media(self, media_type: str) -> bool:
        if self.media_type == "*/*":
            return True
        if self.is_wildcard:
            return media_type.split("/")[0] == self.media_type.split("/")[0]
        return media_type == self.media_type

    def __str__(self) -> str:
        text = f"{MULTIPART}; type={self.media_type}" if self.multipart else self.media_type
        if self.transfer_syntax:
            text += f"; transfer-syntax={self.transfer_syntax}"
        return text


def _split_params(item: str) -> tuple[str, list[tuple[str, str]]]:
    """'a/b; x="1;2"; y=3' -> ('a/b', [('x', '1;2'), ('y', '3')]); quotes may hold ';' and ','."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in item:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    media = pieces[0].strip().lower()
    params: list[tuple[str, str]] = []
    for piece in pieces[1:]:
        name, sep, value = piece.partition("=")
        if sep:
            params.append((name.strip().lower(), value.strip()))
    return media, params


def _quality(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        return 1.0
    return min(1.0, max(0.0, value)) if value == value else 1.0  # NaN -> 1


def _normalise(media_type: str) -> str:
    return ALIASES.get(media_type, media_type)


def _ranges(header: str) -> Iterable[MediaRange]:
    for item in parse_list_header(header):
        media, params = _split_params(item)
        if "/" not in media:
            continue  # not a media range; a bad Accept item is ignored, as RFC 9110 12.5.1 allows
        values = dict(params)
        q = _quality(values.get("q", "1"))
        syntax = values.get("transfer-syntax") or None
        if media == MULTIPART:
            part = _normalise(values.get("type", "").strip().lower()) or None
            yield MediaRange(part or "", syntax, True, q, tuple(params))
        elif media == "multipart/*":
            yield MediaRange(values.get("type", "").strip().lower() or "", syntax, True, q, tuple(params))
        else:
            yield MediaRange(_normalise(media), syntax, None if media == "*/*" else False, q, tuple(params))


def parse(header: str | None, resource: Resource) -> list[MediaRange]:
    """The acceptable representations of `resource`, best first (q descending, then header order).

    A missing or empty Accept means the resource's default. multipart/related without `type`
    means the resource's default part type; `*/*` and wildcard types are kept for select().
    Ranges with q=0 and media types the resource can never have are dropped.

    Raises:
        NotAcceptable: the header names only media types this resource cannot be sent as.
    """
    if header is None or not header.strip():
        return [MediaRange(_RESOURCE_TYPES[resource][0], None, resource is not Resource.METADATA)]
    kinds = _RESOURCE_TYPES[resource]
    found: list[MediaRange] = []
    for item in _ranges(header):
        if item.q <= 0:
            continue
        if item.multipart and not item.media_type:
            if resource is Resource.METADATA:
                continue  # PS3.18: JSON metadata is never multipart; XML must name its type
            item = MediaRange(kinds[0], item.transfer_syntax, True, item.q, item.params)
        if item.media_type in ("*/*", "*") or any(item.accepts_media(kind) for kind in kinds):
            if item.media_type == "*":
                item = MediaRange("*/*", item.transfer_syntax, item.multipart, item.q, item.params)
            found.append(item)
        elif resource is Resource.METADATA and item.media_type in ("application/json", "text/json"):
            found.append(MediaRange(DICOM_JSON, None, False, item.q, item.params))
    if not found:
        wanted = ", ".join(_format_kinds(resource))
        raise NotAcceptable(
            f"Accept {header[:300]!r} names no representation of {resource.value}; available: {wanted}"
        )
    return sorted(found, key=lambda r: -r.q)  # sorted() is stable: header order among equals


def _format_kinds(resource: Resource) -> list[str]:
    if resource is Resource.METADATA:
        return [DICOM_JSON, f'{MULTIPART}; type="{DICOM_XML}"']
    return [f'{MULTIPART}; type="{kind}"' for kind in _RESOURCE_TYPES[resource][:2]]


@dataclass(frozen=True)
class Offer:
    """A representation the server can send of one object or frame.

    stored: these are the bytes as stored (what `transfer-syntax=*` asks for). media_types: the
    part types that may carry it, first preferred when the client names only a wildcard."""

    transfer_syntax: str
    stored: bool
    media_types: tuple[str, ...]
    single_part: bool = False
    label: str = ""


@dataclass(frozen=True)
class Choice:
    offer: Offer
    media_type: str  # the part (or single-part) media type to send
    multipart: bool
    range: MediaRange

    @property
    def content_type(self) -> str:
        """The part's Content-Type, with the transfer syntax so clients need not guess (PS3.18 8.7.3.5)."""
        return f"{self.media_type}; transfer-syntax={self.offer.transfer_syntax}"


def _syntax_matches(wanted: MediaRange, media_type: str, offer: Offer) -> bool:
    syntax = wanted.transfer_syntax
    if syntax == ANY_SYNTAX:
        return offer.stored
    if syntax is None:
        if wanted.is_wildcard:
            # "*/*" or "image/*" without a transfer syntax: the resource default (uncompressed), or
            # for image/* any compressed form we hold as stored.
            if wanted.media_type == "*/*":
                return offer.transfer_syntax == DEFAULT_SYNTAX.get(media_type, ExplicitVRLittleEndian)
            return offer.stored
        if media_type in IMAGE_TYPES:
            # Lenient: image/jpeg without a syntax takes any JPEG process as stored (Cornerstone and
            # dicomweb-client ask this way), not only Table 8.7.3-5's default.
            return offer.transfer_syntax in IMAGE_TYPES[media_type]
        return offer.transfer_syntax == DEFAULT_SYNTAX.get(media_type)
    return syntax == offer.transfer_syntax


def select(ranges: Sequence[MediaRange], offers: Sequence[Offer]) -> Choice | None:
    """The first offer, in the client's order of preference, that an acceptable range takes.

    Among offers a range accepts equally, the server's order wins (offers come best first)."""
    for wanted in ranges:
        for offer in offers:
            if wanted.multipart is False and not offer.single_part:
                continue
            for media_type in offer.media_types:
                if not wanted.accepts_media(media_type):
                    continue
                if _syntax_matches(wanted, media_type, offer):
                    if wanted.transfer_syntax == ANY_SYNTAX and wanted.multipart is not False:
                        # As stored: the part says what it is in Table 8.7.3-5's terms (image/jphc...),
                        # and its transfer-syntax parameter names the syntax (Cornerstone reads it).
                        media_type = offer.media_types[0]
                    return Choice(offer, media_type, wanted.multipart is not False, wanted)
    return None


def accepted_syntaxes(ranges: Sequence[MediaRange]) -> tuple[str, ...]:
    """The transfer syntaxes the ranges ask for, best first: ANY_SYNTAX ("as stored") where a range
    takes whatever is stored, a media type's syntaxes where it names no syntax (PS3.18 8.7.3.5)."""
    found: list[str] = []
    for wanted in ranges:
        if wanted.transfer_syntax:
            found.append(wanted.transfer_syntax)
        elif wanted.media_type == "*/*":
            found.append(ExplicitVRLittleEndian)
        elif wanted.is_wildcard:
            found.append(ANY_SYNTAX)
        elif wanted.media_type in IMAGE_TYPES:
            found.extend(IMAGE_TYPES[wanted.media_type])
        else:
            found.append(DEFAULT_SYNTAX.get(wanted.media_type, ExplicitVRLittleEndian))
    return tuple(dict.fromkeys(found))


def describe(ranges: Sequence[MediaRange]) -> str:
    return ", ".join(str(r) for r in ranges)


def metadata_format(ranges: Sequence[MediaRange]) -> str | None:
    """DICOM_JSON or DICOM_XML, whichever the client prefers, for metadata resources (PS3.18 8.7.6)."""
    for wanted in ranges:
        for media_type in (DICOM_JSON, DICOM_XML):
            if wanted.accepts_media(media_type):
                return media_type
    return None
