"""Streaming multipart/related reader (request body -> parts spooled to disk) and writer (parts -> chunks).

The reader never holds a whole part in memory: python-multipart's low-level MultipartParser
hands us chunks, which go straight into temporary files (PS3.18 8.6.1.2, RFC 2387)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import MalformedRequest, PayloadTooLarge

CHUNK = 1 << 20


@dataclass
class Part:
    """One body part, spooled to `path`; its SHA-256 computed while it streamed in."""

    path: str
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    sha256: str = ""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'type': 'application/dicom', 'boundary': ...}), names lower-cased."""
    media, params = parse_options_header(value or "")
    return media.decode("latin-1").lower(), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()
    }


class _Spooler:
    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.parts: list[Part] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._headers: dict[str, str] = {}
        self._name = b""
        self._value = b""
        self.total = 0

    def on_part_begin(self) -> None:
        fd, path = tempfile.mkstemp(dir=self.directory, suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._headers = {}
        self.parts.append(Part(path))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self.total += len(chunk)
        if self.limit and self.total > self.limit:
            raise PayloadTooLarge(f"request body exceeds MAX_STOW_BYTES={self.limit}")
        assert self._file is not None
        self._file.write(chunk)
        self._hash.update(chunk)

    def on_part_end(self) -> None:
        assert self._file is not None
        part = self.parts[-1]
        part.size = self._file.tell()
        part.sha256 = self._hash.hexdigest()
        part.headers = self._headers
        self._file.close()
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._name = self._value = b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_parts(stream: BinaryIO, boundary: str, directory: str, limit: int = 0) -> list[Part]:
    """Spool every part of a multipart body to `directory`.

    Raises:
        MalformedRequest: the body is not parseable multipart (400 per DESIGN.md).
    """
    spool = _Spooler(directory, limit)
    callbacks: dict[str, Callable[..., None]] = {
        "on_part_begin": spool.on_part_begin,
        "on_part_data": spool.on_part_data,
        "on_part_end": spool.on_part_end,
        "on_header_field": spool.on_header_field,
        "on_header_value": spool.on_header_value,
        "on_header_end": spool.on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        while chunk := stream.read(CHUNK):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        spool.close()
        for part in spool.parts:
            part.discard()
        raise MalformedRequest(f"body is not valid multipart/related: {exc}") from exc
    except BaseException:
        spool.close()
        for part in spool.parts:
            part.discard()
        raise
    complete = [p for p in spool.parts if p.sha256]
    if len(complete) != len(spool.parts) or not complete:
        for part in spool.parts:
            part.discard()
        raise MalformedRequest("multipart body has no complete part (missing closing boundary?)")
    return complete


def read_single(stream: BinaryIO, directory: str, content_type: str, limit: int = 0) -> Part:
    """A non-multipart body (e.g. a single application/dicom instance) spooled as one part."""
    fd, path = tempfile.mkstemp(dir=directory, suffix=".part")
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as handle:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if limit and size > limit:
                handle.close()
                os.unlink(path)
                raise PayloadTooLarge(f"request body exceeds MAX_STOW_BYTES={limit}")
            handle.write(chunk)
            digest.update(chunk)
    return Part(path, {"content-type": content_type}, size, digest.hexdigest())


def new_boundary() -> str:
    return uuid.uuid4().hex


def related_content_type(boundary: str, part_type: str, **params: str) -> str:
    """The response Content-Type, e.g. multipart/related; type="application/dicom"; boundary=..."""
    extra = "".join(f"; {name}={value}" for name, value in params.items())
    return f'multipart/related; type="{part_type}"; boundary={boundary}{extra}'


def write_parts(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """Stream a multipart/related body: each part is (headers, byte chunks)."""
    dash = f"--{boundary}".encode()
    for headers, chunks in parts:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        yield dash + b"\r\n" + head.encode("latin-1") + b"\r\n"
        yield from chunks
        yield b"\r\n"
    yield dash + b"--\r\n"
