from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import MalformedRequest, PayloadTooLarge
from gateway.multipart import content_type_params, read_parts, read_single, write_parts


class Trickle(io.RawIOBase):
    """A stream that returns at most `step` bytes per read, to split the body at arbitrary places."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[self.pos : self.pos + min(self.step, size if size > 0 else self.step)]
        self.pos += len(chunk)
        return chunk


boundaries = st.from_regex(r"[A-Za-z0-9'()+_,\-./:=?]{1,69}[A-Za-z0-9]", fullmatch=True)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payloads=st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=4),
    boundary=boundaries,
    step=st.integers(min_value=1, max_value=4096),
)
def test_parts_round_trip_over_any_boundary_and_chunking(
    tmp_path: Path, payloads: list[bytes], boundary: str, step: int
) -> None:
    # RFC 2046 5.1.1: a sender picks a boundary that does not occur in the payloads.
    if any(f"\r\n--{boundary}".encode() in b"\r\n" + p for p in payloads):
        return
    body = b"".join(write_parts([({"Content-Type": "application/dicom"}, [p]) for p in payloads], boundary))
    parts = read_parts(Trickle(body, step), boundary, str(tmp_path))  # type: ignore[arg-type]
    assert [Path(p.path).read_bytes() for p in parts] == payloads
    assert all(p.content_type == "application/dicom" for p in parts)
    for part in parts:
        part.discard()


def test_garbage_body_is_malformed_and_leaves_no_spool_files(tmp_path: Path) -> None:
    with pytest.raises(MalformedRequest):
        read_parts(io.BytesIO(b"this is not multipart"), "abc", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_body_without_closing_boundary_is_malformed(tmp_path: Path) -> None:
    body = b"--abc\r\nContent-Type: application/dicom\r\n\r\nunfinished data"
    with pytest.raises(MalformedRequest):
        read_parts(io.BytesIO(body), "abc", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_size_limit_stops_the_upload(tmp_path: Path) -> None:
    body = b"".join(write_parts([({"Content-Type": "application/dicom"}, [b"x" * 5000])], "abc"))
    with pytest.raises(PayloadTooLarge):
        read_parts(io.BytesIO(body), "abc", str(tmp_path), limit=1000)
    with pytest.raises(PayloadTooLarge):
        read_single(io.BytesIO(b"y" * 5000), str(tmp_path), "application/dicom", limit=1000)
    assert list(tmp_path.iterdir()) == []


def test_content_type_parameters_quoted_and_unquoted() -> None:
    for header in (
        'multipart/related; type="application/dicom"; boundary=XYZ',
        'Multipart/Related; TYPE=application/dicom; boundary="XYZ"',
    ):
        media, params = content_type_params(header)
        assert media == "multipart/related"
        assert params == {"type": "application/dicom", "boundary": "XYZ"}
