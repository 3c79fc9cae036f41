"""S3 bucket through boto3 (AWS, MinIO, Ceph, moto via endpoint_url); botocore errors become ours here."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from gateway.errors import GatewayError, ObjectNotFound, StorageUnavailable
from gateway.storage import ObjectInfo

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)


def _translate(exc: Exception, bucket: str, key: str) -> GatewayError:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            return ObjectNotFound(f"no object {key} in bucket {bucket}")
        return StorageUnavailable(f"S3 {bucket}: {code or 'error'} on {key}")
    return StorageUnavailable(f"S3 {bucket}: {type(exc).__name__} on {key}")


class S3Bucket:
    def __init__(self, name: str, endpoint_url: str | None = None, client: object | None = None) -> None:
        self.name = name
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def put_file(self, key: str, path: str, sha256: str, metadata: dict[str, str] | None = None) -> None:
        meta = {"sha256": sha256, **(metadata or {})}
        try:
            self.client.upload_file(
                path,
                self.name,
                key,
                ExtraArgs={"Metadata": meta, "ChecksumAlgorithm": "SHA256"},
                Config=_TRANSFER,
            )
        except (BotoCoreError, ClientError) as exc:
            raise _translate(exc, self.name, key) from exc
        except Exception as exc:  # boto3's S3UploadFailedError wraps ClientError
            raise StorageUnavailable(f"S3 {self.name}: upload of {key} failed: {exc}") from exc

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        import hashlib

        digest = hashlib.sha256(data).digest()
        meta = {"sha256": digest.hex(), **(metadata or {})}
        try:
            self.client.put_object(
                Bucket=self.name,
                Key=key,
                Body=data,
                Metadata=meta,
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )
        except (BotoCoreError, ClientError) as exc:
            raise _translate(exc, self.name, key) from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.name, Key=key)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise _translate(exc, self.name, key) from exc

    def get_bytes(self, key: str) -> bytes:
        body = self.open(key)
        try:
            return body.read()
        except (BotoCoreError, ClientError) as exc:
            raise _translate(exc, self.name, key) from exc
        finally:
            body.close()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            body = self.client.get_object(
                Bucket=self.name, Key=key, Range=f"bytes={start}-{start + length - 1}"
            )
            return body["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise _translate(exc, self.name, key) from exc

    def head(self, key: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.name, Key=key)
        except ClientError as exc:
            translated = _translate(exc, self.name, key)
            if isinstance(translated, ObjectNotFound):
                return None
            raise translated from exc
        except BotoCoreError as exc:
            raise _translate(exc, self.name, key) from exc
        meta = dict(head.get("Metadata") or {})
        return ObjectInfo(
            key, int(head["ContentLength"]), meta.get("sha256"), head.get("StorageClass") or "STANDARD", meta
        )

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.name, Key=key)
        except (BotoCoreError, ClientError) as exc:
            translated = _translate(exc, self.name, key)
            if not isinstance(translated, ObjectNotFound):
                raise translated from exc

    def list(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]
        except (BotoCoreError, ClientError) as exc:
            raise _translate(exc, self.name, prefix) from exc
