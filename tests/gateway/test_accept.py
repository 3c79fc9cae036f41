"""Accept header parsing and representation choice (PS3.18 8.7.3-8.7.5), including what OHIF,
dicomweb-client, Orthanc's and dcm4chee's clients send; property tests for the parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import accept
from gateway.accept import ANY_SYNTAX, DICOM, OCTET_STREAM, MediaRange, Offer, Resource
from gateway.errors import NotAcceptable

EVRLE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _frames_offers(stored: str) -> list[Offer]:
    return [
        Offer(stored, True, (accept.media_type_for(stored), OCTET_STREAM), True, "stored"),
        Offer(EVRLE, False, (OCTET_STREAM,), True, "decoded"),
    ]


def _instance_offers(stored: str) -> list[Offer]:
    return [Offer(stored, True, (DICOM,), True, "original"), Offer(EVRLE, False, (DICOM,), True, "transcode")]


def _choose(header: str | None, resource: Resource, offers: list[Offer]) -> accept.Choice | None:
    return accept.select(accept.parse(header, resource), offers)


# --- headers real clients send ---


@pytest.mark.parametrize(
    ("header", "syntax", "media"),
    [
        # OHIF / Cornerstone dicom-image-loader, frames
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", HTJ2K_RPCL, "image/jphc"),
        # OHIF with a configured uncompressed request
        ("multipart/related; type=application/octet-stream", EVRLE, OCTET_STREAM),
        # dicomweb-client retrieve_instance_frames() default
        ('multipart/related; type="*/*"', EVRLE, OCTET_STREAM),
        # dicomweb-client with media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),)
        (f'multipart/related; type="application/octet-stream"; transfer-syntax={EVRLE}', EVRLE, OCTET_STREAM),
        # dicomweb-client asking for the HTJ2K codestream by its media type
        (f'multipart/related; type="image/jphc"; transfer-syntax={HTJ2K_RPCL}', HTJ2K_RPCL, "image/jphc"),
        # the x-/short spellings some clients use
        ("multipart/related; type=image/jhc", HTJ2K_RPCL, "image/jphc"),
        # Orthanc's and dcm4chee's web viewers: several types with q-values
        (
            'multipart/related; type="image/jphc"; q=0.9, '
            'multipart/related; type="application/octet-stream"; q=0.5',
            HTJ2K_RPCL,
            "image/jphc",
        ),
        ("*/*", EVRLE, OCTET_STREAM),
        (None, EVRLE, OCTET_STREAM),
    ],
)
def test_frame_headers_of_real_clients(header: str | None, syntax: str, media: str) -> None:
    choice = _choose(header, Resource.FRAMES, _frames_offers(HTJ2K_RPCL))
    assert choice is not None
    assert (choice.offer.transfer_syntax, choice.media_type, choice.multipart) == (syntax, media, True)
    assert choice.content_type == f"{media}; transfer-syntax={syntax}"


@pytest.mark.parametrize(
    ("header", "syntax"),
    [
        ('multipart/related; type="application/dicom"; transfer-syntax=*', JPEG_LS),  # dicomweb-client
        ("multipart/related; type=application/dicom; transfer-syntax=*", JPEG_LS),  # OHIF
        ('multipart/related;type="application/dicom";transfer-syntax=*', JPEG_LS),  # dcm4chee
        ('multipart/related; type="application/dicom"', EVRLE),  # Orthanc's default
        (f'multipart/related; type="application/dicom"; transfer-syntax="{EVRLE}"', EVRLE),  # quoted UID
        ("*/*", EVRLE),
        ("multipart/related", EVRLE),
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_LS}', JPEG_LS),
        (
            f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}; q=0.2, '
            f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_LS}; q=0.8',
            JPEG_LS,
        ),
    ],
)
def test_instance_headers_of_real_clients(header: str, syntax: str) -> None:
    choice = _choose(header, Resource.INSTANCES, _instance_offers(JPEG_LS))
    assert choice is not None and choice.offer.transfer_syntax == syntax and choice.media_type == DICOM


def test_defaults_of_table_8_7_3_2_and_5() -> None:
    assert accept.DEFAULT_SYNTAX[DICOM] == EVRLE
    assert accept.DEFAULT_SYNTAX[OCTET_STREAM] == EVRLE
    assert accept.DEFAULT_SYNTAX["image/jls"] == JPEG_LS
    assert accept.DEFAULT_SYNTAX["image/jp2"] == "1.2.840.10008.1.2.4.90"
    assert accept.media_type_for(JPEG_BASELINE) == "image/jpeg"
    assert accept.media_type_for(HTJ2K_RPCL) == "image/jphc"
    assert accept.media_type_for("1.2.840.10008.1.2.5") == "image/dicom-rle"


def test_image_type_without_syntax_takes_any_of_its_syntaxes() -> None:
    choice = _choose('multipart/related; type="image/jpeg"', Resource.FRAMES, _frames_offers(JPEG_BASELINE))
    assert choice is not None and choice.offer.transfer_syntax == JPEG_BASELINE


def test_wrong_codec_or_single_part_is_refused() -> None:
    assert _choose('multipart/related; type="image/jp2"', Resource.FRAMES, _frames_offers(JPEG_LS)) is None
    assert (
        _choose(
            f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}',
            Resource.INSTANCES,
            _instance_offers(JPEG_LS),
        )
        is None
    )
    multi_only = [Offer(EVRLE, True, (OCTET_STREAM,), False, "x")]
    assert _choose(OCTET_STREAM, Resource.FRAMES, multi_only) is None
    single = _choose(OCTET_STREAM, Resource.FRAMES, [Offer(EVRLE, True, (OCTET_STREAM,), True, "x")])
    assert single is not None and not single.multipart


def test_q_zero_excludes_and_unrelated_types_are_406() -> None:
    with pytest.raises(NotAcceptable) as refused:
        accept.parse("text/html, application/xhtml+xml", Resource.INSTANCES)
    assert "application/dicom" in refused.value.detail
    with pytest.raises(NotAcceptable):
        accept.parse('multipart/related; type="application/dicom"; q=0', Resource.INSTANCES)


def test_metadata_formats() -> None:
    parse = accept.parse
    assert accept.metadata_format(parse(None, Resource.METADATA)) == accept.DICOM_JSON
    assert accept.metadata_format(parse("application/json", Resource.METADATA)) == accept.DICOM_JSON
    xml = 'multipart/related; type="application/dicom+xml"'
    assert accept.metadata_format(parse(xml, Resource.METADATA)) == accept.DICOM_XML
    both = f"{xml}; q=0.9, application/dicom+json; q=0.5"
    assert accept.metadata_format(parse(both, Resource.METADATA)) == accept.DICOM_XML


# --- properties ---

MEDIA = st.sampled_from([DICOM, OCTET_STREAM, "image/jpeg", "image/jls", "image/jp2", "image/jphc"])
SYNTAX = st.sampled_from([None, ANY_SYNTAX, EVRLE, JPEG_LS, HTJ2K_RPCL, JPEG_BASELINE])
Q = st.sampled_from([1.0, 0.9, 0.5, 0.25, 0.1, 0.001])


@st.composite
def media_ranges(draw: st.DrawFn) -> tuple[MediaRange, str]:
    """A range and one way a client could spell it (quoting, spacing, case, q placement)."""
    media, syntax, q = draw(MEDIA), draw(SYNTAX), draw(Q)
    multipart = draw(st.booleans())
    quote = draw(st.sampled_from(['"', ""]))
    sep = draw(st.sampled_from([";", "; ", " ; ", ";\t"]))
    upper = draw(st.booleans())
    pieces = [f"multipart/related{sep}type={quote}{media}{quote}"] if multipart else [media]
    if syntax:
        pieces.append(
            f"transfer-syntax={quote if syntax != '*' else ''}{syntax}{quote if syntax != '*' else ''}"
        )
    if q != 1.0:
        pieces.insert(draw(st.integers(1, len(pieces))), f"q={q}")
    text = sep.join(pieces)
    if upper:
        text = text.replace("multipart/related", "Multipart/Related").replace("type=", "Type=")
    return MediaRange(media, syntax, multipart, q), text


@given(st.lists(media_ranges(), min_size=1, max_size=6), st.sampled_from([", ", ",", " ,  "]))
def test_parse_recovers_every_range_in_preference_order(
    items: list[tuple[MediaRange, str]], comma: str
) -> None:
    header = comma.join(text for _, text in items)
    wanted = [item for item, _ in items]
    parsed = accept.parse(
        header, Resource.FRAMES if all(r.media_type != DICOM for r in wanted) else Resource.INSTANCES
    )
    kept = (
        [r for r in wanted if r.media_type != DICOM]
        if all(r.media_type != DICOM for r in wanted)
        else [r for r in wanted if r.media_type == DICOM]
    )
    expected = sorted(kept, key=lambda r: -r.q)
    assert [(r.media_type, r.transfer_syntax, r.multipart, r.q) for r in parsed] == [
        (r.media_type, r.transfer_syntax, r.multipart, r.q) for r in expected
    ]


@given(st.text(max_size=200))
def test_parse_never_fails_but_with_406(header: str) -> None:
    for resource in Resource:
        try:
            ranges = accept.parse(header, resource)
        except NotAcceptable:
            continue
        assert ranges and all(0 < r.q <= 1 for r in ranges)


@given(st.lists(media_ranges(), min_size=1, max_size=5), st.sampled_from([JPEG_LS, HTJ2K_RPCL, EVRLE]))
def test_a_choice_is_always_one_the_client_accepted(items: list[tuple[MediaRange, str]], stored: str) -> None:
    header = ", ".join(text for _, text in items)
    try:
        ranges = accept.parse(header, Resource.FRAMES)
    except NotAcceptable:
        return
    choice = accept.select(ranges, _frames_offers(stored))
    if choice is None:
        return
    wanted = choice.range
    assert wanted in ranges
    assert wanted.accepts_media(choice.media_type) or wanted.transfer_syntax == ANY_SYNTAX
    if wanted.transfer_syntax == ANY_SYNTAX:
        assert choice.offer.stored
    elif wanted.transfer_syntax:
        assert choice.offer.transfer_syntax == wanted.transfer_syntax
    better = [r for r in ranges if r.q > wanted.q]
    assert all(accept.select([r], _frames_offers(stored)) is None for r in better)


@pytest.mark.parametrize(
    ("header", "resource", "expected"),
    [
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            Resource.FRAMES,
            (ANY_SYNTAX,),
        ),
        (None, Resource.FRAMES, (EVRLE,)),
        ("*/*", Resource.INSTANCES, (EVRLE,)),
        ("image/*", Resource.FRAMES, (ANY_SYNTAX,)),
        (
            f'multipart/related; type="application/dicom"; transfer-syntax={HTJ2K_RPCL}, '
            'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5',
            Resource.INSTANCES,
            (HTJ2K_RPCL, ANY_SYNTAX),
        ),
        ("multipart/related; type=image/jls", Resource.FRAMES, (JPEG_LS, "1.2.840.10008.1.2.4.81")),
    ],
)
def test_accepted_syntaxes_in_the_clients_order(
    header: str | None, resource: Resource, expected: tuple[str, ...]
) -> None:
    assert accept.accepted_syntaxes(accept.parse(header, resource)) == expected
