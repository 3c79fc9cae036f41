"""Objects by tier and storage class on either backend: which bucket holds a class, server-side copies
with a SHA-256 checksum, reading that checksum back, listing every class, and archive restores.
Core: no Flask; botocore errors become ours here.

Local backend: STANDARD objects are the bucket folder itself; every other class is a folder of its own,
DATA_DIR/buckets/<bucket>/.class/<CLASS>/<key> (with the sidecar metadata of any local bucket). An
archive-class object there is read only after a restore, simulated honestly: a marker
DATA_DIR/buckets/<bucket>/.restore/<CLASS>/<key>.json says when it was asked for, when it is ready
(lifecycle.yaml restore.local_delay_seconds later) and when it expires (restore.days after that)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from gateway.connections import Connections
from gateway.errors import GatewayError, ObjectNotFound, StorageUnavailable
from gateway.storage import Bucket, ObjectInfo
from gateway.storage.local import LocalBucket
from gateway.storage.s3 import S3Bucket
from policies.lifecycle import ARCHIVE, CLASSES, LifecycleRules, RestoreSettings

TIERS = ("originals", "hot", "cold")
CLASS_DIR = ".class"
RESTORE_DIR = ".restore"
CHUNK = 1 << 20


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite gives timestamps back without their zone: they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


# --- buckets per tier and storage class ---------------------------------------------------------------------


def tier_bucket(conn: Connections, tier: str) -> Bucket:
    if tier == "originals":
        return conn.originals
    if tier == "hot":
        return conn.hot
    if tier == "cold":
        return conn.cold
    raise ValueError(f"no tier {tier!r}")


_class_stores: dict[Path, LocalBucket] = {}
_class_lock = threading.Lock()


def store(conn: Connections, tier: str, storage_class: str = "STANDARD") -> Bucket:
    """The bucket that holds a tier's objects of one storage class (on S3 the class is an attribute)."""
    bucket = tier_bucket(conn, tier)
    if storage_class == "STANDARD" or not isinstance(bucket, LocalBucket):
        return bucket
    if storage_class not in CLASSES:
        raise ValueError(f"no storage class {storage_class!r}")
    root = bucket.root / CLASS_DIR / storage_class
    with _class_lock:
        found = _class_stores.get(root)
        if found is None:
            found = _class_stores[root] = LocalBucket(bucket.name, root)
    return found


def local_classes(conn: Connections, tier: str) -> list[str]:
    """The storage classes a local tier holds objects in (STANDARD first); S3: just STANDARD."""
    bucket = tier_bucket(conn, tier)
    if not isinstance(bucket, LocalBucket):
        return ["STANDARD"]
    folder = bucket.root / CLASS_DIR
    found = [p.name for p in folder.iterdir() if p.name in CLASSES] if folder.is_dir() else []
    return ["STANDARD", *sorted(found, key=CLASSES.index)]


def _s3_error(exc: Exception, bucket: str, key: str) -> GatewayError:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"no object {key} in bucket {bucket}")
        return StorageUnavailable(f"S3 {bucket}: {code or 'error'} on {key}")
    return StorageUnavailable(f"S3 {bucket}: {type(exc).__name__} on {key}")


def copy_object(
    conn: Connections,
    key: str,
    source: tuple[str, str],
    target: tuple[str, str],
    object_tag: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """Copy one object between (tier, storage class) places, keeping its key and metadata (plus
    `metadata`, e.g. the time it was ingested, which a later index rebuild reads back).

    S3: one server-side CopyObject with the target class and a SHA-256 additional checksum, so the copy
    can be verified without reading it back (an archive copy needs no restore to be checked); the copy
    is tagged gw-object=<original|version id> for the cold bucket's native transitions. Local: a file
    copy into the class folder, whole or not at all.

    Raises:
        ObjectNotFound: the source is gone. StorageUnavailable: the store failed (nothing half-written).
    """
    src, dst = store(conn, *source), store(conn, *target)
    if isinstance(dst, S3Bucket):
        assert isinstance(src, S3Bucket)
        extra: dict[str, object] = {"MetadataDirective": "COPY"}
        try:
            if metadata:
                head_ = src.client.head_object(Bucket=src.name, Key=key)
                merged = {**(head_.get("Metadata") or {}), **metadata}
                extra = {"MetadataDirective": "REPLACE", "Metadata": merged}
                if head_.get("ContentType"):
                    extra["ContentType"] = head_["ContentType"]
            dst.client.copy_object(
                Bucket=dst.name,
                Key=key,
                CopySource={"Bucket": src.name, "Key": key},
                StorageClass=target[1],
                ChecksumAlgorithm="SHA256",
                TaggingDirective="REPLACE",
                Tagging=f"gw-object={object_tag}",
                **extra,
            )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, dst.name, key) from exc
        return
    assert isinstance(src, LocalBucket) and isinstance(dst, LocalBucket)
    info = src.head(key)
    if info is None:
        raise ObjectNotFound(f"no object {key} in {source[0]} ({source[1]})")
    merged = {**info.metadata, **(metadata or {}), "gw-object": object_tag}
    dst.put_file(key, str(src.root / key), info.sha256 or "", merged)


def ingested_at(conn: Connections, key: str, tier: str, storage_class: str = "STANDARD") -> datetime | None:
    """When the object was first stored: the `ingested-at` metadata the mover writes on its copies,
    else the copy's own modification time."""
    info = store(conn, tier, storage_class).head(key)
    if info is not None and info.metadata.get("ingested-at"):
        try:
            return aware(datetime.fromisoformat(info.metadata["ingested-at"]))
        except ValueError:
            pass
    return last_modified(conn, key, tier, storage_class)


def checksum(conn: Connections, key: str, tier: str, storage_class: str) -> tuple[int, str | None]:
    """(size, SHA-256 hex) of a stored copy, as the store computed it; sha None when it cannot tell.

    S3 reads the additional checksum with HeadObject (ChecksumMode=ENABLED), so archive copies are
    checked without a restore; a copy without one (made by a tool that set none) is hashed by reading it
    when it is readable. Local: the file is hashed.

    Raises:
        ObjectNotFound: no such copy.
    """
    bucket = store(conn, tier, storage_class)
    if isinstance(bucket, S3Bucket):
        try:
            head = bucket.client.head_object(Bucket=bucket.name, Key=key, ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, bucket.name, key) from exc
        size = int(head["ContentLength"])
        value = head.get("ChecksumSHA256")
        if value and "-" not in value:  # "...-N" is a multipart composite, not the object's digest
            return size, base64.b64decode(value).hex()
        if (head.get("StorageClass") or "STANDARD") in ARCHIVE:
            return size, None
        return size, _hash_stream(bucket.open(key))
    if not isinstance(bucket, LocalBucket):
        return 0, None
    path = bucket.root / key
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"no object {key} in {tier} ({storage_class})") from exc
    return size, _hash_stream(bucket.open(key))


def _hash_stream(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    try:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    finally:
        handle.close()
    return digest.hexdigest()


def exists(conn: Connections, key: str, tier: str, storage_class: str) -> bool:
    return store(conn, tier, storage_class).head(key) is not None


def delete_copy(conn: Connections, key: str, tier: str, storage_class: str) -> None:
    """Idempotent; on the local backend the copy's restore marker goes with it."""
    store(conn, tier, storage_class).delete(key)
    marker = _marker(conn, tier, storage_class, key)
    if marker is not None:
        marker.unlink(missing_ok=True)


def storage_class_of(conn: Connections, key: str, tier: str) -> str | None:
    """The class a tier holds the key in now (S3 may have changed it by a native transition)."""
    bucket = tier_bucket(conn, tier)
    if isinstance(bucket, S3Bucket):
        info = bucket.head(key)
        return info.storage_class if info is not None else None
    for storage_class in local_classes(conn, tier):
        if store(conn, tier, storage_class).head(key) is not None:
            return storage_class
    return None


def head(conn: Connections, key: str, tier: str, storage_class: str) -> ObjectInfo | None:
    return store(conn, tier, storage_class).head(key)


def last_modified(conn: Connections, key: str, tier: str, storage_class: str = "STANDARD") -> datetime | None:
    """When the copy was written (S3 LastModified, the file's mtime locally); None when unknown."""
    bucket = store(conn, tier, storage_class)
    if isinstance(bucket, S3Bucket):
        try:
            return aware(bucket.client.head_object(Bucket=bucket.name, Key=key)["LastModified"])
        except (BotoCoreError, ClientError):
            return None
    if isinstance(bucket, LocalBucket):
        try:
            return datetime.fromtimestamp((bucket.root / key).stat().st_mtime, UTC)
        except OSError:
            return None
    return None


def list_copies(conn: Connections, tier: str, prefix: str = "studies/") -> Iterator[tuple[str, str, int]]:
    """(key, storage class, size) of every object under a prefix in a tier, every class included."""
    bucket = tier_bucket(conn, tier)
    if isinstance(bucket, S3Bucket):
        paginator = bucket.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket.name, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"], item.get("StorageClass") or "STANDARD", int(item.get("Size", 0))
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, bucket.name, prefix) from exc
        return
    for storage_class in local_classes(conn, tier):
        local = store(conn, tier, storage_class)
        assert isinstance(local, LocalBucket)
        for key in local.list(prefix):
            if key.startswith("."):
                continue
            try:
                yield key, storage_class, (local.root / key).stat().st_size
            except FileNotFoundError:
                continue


# --- restores -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreStatus:
    state: str  # none, ongoing, ready
    expires_at: datetime | None = None
    ready_at: datetime | None = None


def _marker(conn: Connections, tier: str, storage_class: str, key: str) -> Path | None:
    bucket = tier_bucket(conn, tier)
    if not isinstance(bucket, LocalBucket) or storage_class not in ARCHIVE:
        return None
    return bucket.root / RESTORE_DIR / storage_class / (key + ".json")


def restore_status(conn: Connections, key: str, tier: str, storage_class: str) -> RestoreStatus:
    if storage_class not in ARCHIVE:
        return RestoreStatus("ready")
    bucket = store(conn, tier, storage_class)
    if isinstance(bucket, S3Bucket):
        try:
            head_ = bucket.client.head_object(Bucket=bucket.name, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, bucket.name, key) from exc
        return _parse_restore(head_.get("Restore"))
    marker = _marker(conn, tier, storage_class, key)
    if marker is None or not marker.is_file():
        return RestoreStatus("none")
    try:
        data = json.loads(marker.read_text())
        ready_at = datetime.fromisoformat(data["ready_at"])
        expires_at = datetime.fromisoformat(data["expires_at"])
    except (OSError, ValueError, KeyError):
        return RestoreStatus("none")
    current = now()
    if current >= expires_at:
        marker.unlink(missing_ok=True)
        return RestoreStatus("none")
    if current < ready_at:
        return RestoreStatus("ongoing", expires_at, ready_at)
    return RestoreStatus("ready", expires_at, ready_at)


def _parse_restore(header: str | None) -> RestoreStatus:
    """S3's x-amz-restore: ongoing-request="true", or ongoing-request="false", expiry-date="<HTTP date>"."""
    if not header:
        return RestoreStatus("none")
    if 'ongoing-request="true"' in header:
        return RestoreStatus("ongoing")
    match = re.search(r'expiry-date="([^"]+)"', header)
    expires = None
    if match:
        try:
            expires = parsedate_to_datetime(match.group(1))
        except (TypeError, ValueError):
            expires = None
    return RestoreStatus("ready", expires)


def request_restore(
    conn: Connections, key: str, tier: str, storage_class: str, settings: RestoreSettings
) -> RestoreStatus:
    """Start a restore of an archive copy (a restore under way or done is left as it is).

    Raises:
        StorageUnavailable: the store refused.
    """
    status = restore_status(conn, key, tier, storage_class)
    if status.state != "none":
        return status
    bucket = store(conn, tier, storage_class)
    if isinstance(bucket, S3Bucket):
        request = {"Days": settings.days, "GlacierJobParameters": {"Tier": settings.tier}}
        try:
            bucket.client.restore_object(Bucket=bucket.name, Key=key, RestoreRequest=request)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) != "RestoreAlreadyInProgress":
                raise _s3_error(exc, bucket.name, key) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, bucket.name, key) from exc
        return restore_status(conn, key, tier, storage_class)
    if bucket.head(key) is None:
        raise ObjectNotFound(f"no object {key} in {tier} ({storage_class})")
    marker = _marker(conn, tier, storage_class, key)
    assert marker is not None
    asked = now()
    ready = asked + timedelta(seconds=settings.local_delay_seconds.get(storage_class, 0.0))
    expires = ready + timedelta(days=settings.days)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + f".{os.getpid()}.tmp")
    payload = {
        "requested_at": asked.isoformat(),
        "ready_at": ready.isoformat(),
        "expires_at": expires.isoformat(),
    }
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, marker)
    return RestoreStatus("ongoing" if ready > asked else "ready", expires, ready)


# --- S3-native configurations -------------------------------------------------------------------------------


def apply_configurations(conn: Connections, rules: LifecycleRules) -> dict[str, str]:
    """Put each bucket's rendered LifecycleConfiguration (or remove it where none is rendered); returns
    what was done per bucket. The local backend has no native lifecycle: the mover does every move.

    Raises:
        StorageUnavailable: S3 refused (the message names the bucket and S3's error code).
    """
    buckets = {tier: tier_bucket(conn, tier) for tier in TIERS}
    rendered = rules.render({tier: bucket.name for tier, bucket in buckets.items()})
    done: dict[str, str] = {}
    for bucket in buckets.values():
        if not isinstance(bucket, S3Bucket):
            done[bucket.name] = "local backend: no native lifecycle (the mover does every move)"
            continue
        config = rendered[bucket.name]
        try:
            if config is None:
                bucket.client.delete_bucket_lifecycle(Bucket=bucket.name)
                done[bucket.name] = "configuration removed"
            else:
                bucket.client.put_bucket_lifecycle_configuration(
                    Bucket=bucket.name, LifecycleConfiguration=config
                )
                done[bucket.name] = f"{len(config['Rules'])} rules put"
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise StorageUnavailable(f"S3 {bucket.name}: {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {bucket.name}: {type(exc).__name__}") from exc
    return done
