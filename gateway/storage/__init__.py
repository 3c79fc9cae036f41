"""The Bucket protocol: what the gateway needs of an object store, whatever backs it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None
    storage_class: str = "STANDARD"
    metadata: dict[str, str] = field(default_factory=dict)


class Bucket(Protocol):
    name: str

    def put_file(self, key: str, path: str, sha256: str, metadata: dict[str, str] | None = None) -> None:
        """Store a whole local file; the object appears whole or not at all."""

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO:
        """A streaming reader; the caller closes it. Raises ObjectNotFound."""

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None:
        """Idempotent: deleting a missing key is not an error."""

    def list(self, prefix: str) -> Iterator[str]: ...


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of a local file, read in 1 MiB chunks: what every object's checksum is."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def make_bucket(settings: object, name: str) -> Bucket:
    """Build the bucket named `name` for the configured backend."""
    from gateway.settings import Settings

    assert isinstance(settings, Settings)
    if settings.storage == "s3":
        from gateway.storage.s3 import S3Bucket

        return S3Bucket(name, endpoint_url=settings.s3_endpoint_url)
    from gateway.storage.local import LocalBucket

    return LocalBucket(name, settings.data_dir / "buckets" / name)
