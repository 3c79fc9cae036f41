"""Helpers shared by the tiers, lifecycle, prefetch, rebuild, delete and storage API tests: store through
STOW, derive with a real RQ worker, look at copies and rows, and check the never-lost invariant."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from pydicom.dataset import Dataset
from rq import Queue, SimpleWorker
from sqlalchemy import select

from gateway import keys, tiers
from gateway.connections import Connections
from gateway.errors import StorageUnavailable
from gateway.index.models import Location
from gateway.storage.local import LocalBucket
from gateway.storage.s3 import S3Bucket
from gateway.tiers import ObjectKey
from gateway.uids import InstanceRef
from tests.factories import multipart_body, to_bytes
from workers import context


def client_for(conn: Connections) -> Any:
    from gateway.app import create_app

    app = create_app(conn.settings, conn)
    app.config["TESTING"] = True
    return app.test_client()


def stow(conn: Connections, items: Iterable[Dataset | bytes]) -> list[bytes]:
    """Store through STOW-RS (the real path: ingest, index, derive queued); returns the bytes stored."""
    data = [item if isinstance(item, bytes) else to_bytes(item) for item in items]
    body, content_type = multipart_body(data)
    response = client_for(conn).post("/dicomweb/studies", data=body, content_type=content_type)
    assert response.status_code == 200, response.get_data(as_text=True)
    return data


def derive_all(conn: Connections) -> None:
    context.configure(conn.settings, conn)
    SimpleWorker([Queue("derive", connection=conn.redis)], connection=conn.redis).work(burst=True)


def ref_of(ds: Dataset) -> InstanceRef:
    return InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def original(ds: Dataset) -> ObjectKey:
    return ObjectKey(ref_of(ds), None)


def later(days: float) -> datetime:
    return tiers.now() + timedelta(days=days)


def locations(conn: Connections, key: str | None = None) -> list[Location]:
    with conn.sessions() as session:
        query = select(Location).order_by(Location.tier)
        if key is not None:
            query = query.where(Location.key == key)
        return list(session.execute(query).scalars())


def where(conn: Connections, key: str) -> dict[str, tuple[str, str]]:
    """tier -> (storage class, state) of each recorded copy of a key."""
    return {row.tier: (row.storage_class, row.state) for row in locations(conn, key)}


def stored_class(conn: Connections, key: str, tier: str) -> str | None:
    return tiers.storage_class_of(conn, key, tier)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_never_lost(conn: Connections, obj: ObjectKey, data: bytes) -> None:
    """At least one verified copy exists, and the index points at a readable one: a read through the
    tiers gives the exact bytes (or, for an archived copy, says so, while that copy checks out)."""
    expected = sha(data)
    good = []
    for row in locations(conn, obj.key):
        if row.state == "corrupt":
            continue
        size, digest = (
            tiers.checksum(conn, obj.key, row.tier, row.storage_class)
            if tiers.exists(conn, obj.key, row.tier, row.storage_class)
            else (0, None)
        )
        if digest == expected and size == len(data):
            good.append(row)
    rows = locations(conn, obj.key)
    if not rows:  # no rows: the home bucket holds it
        assert tiers.tier_bucket(conn, obj.home).get_bytes(obj.key) == data
        return
    assert good, f"no verified copy of {obj.key}: {[(r.tier, r.storage_class, r.state) for r in rows]}"
    assert any(r.state == "ok" for r in good), "the index points at no usable verified copy"
    reader = tiers.originals(conn) if obj.version_id is None else tiers.versions(conn)
    try:
        assert reader.get_bytes(obj.key) == data
    except tiers.ObjectArchived:
        assert all(r.storage_class in ("GLACIER", "DEEP_ARCHIVE") for r in good if r.state == "ok")


def hot_version(conn: Connections, ds: Dataset, version_id: str) -> bytes:
    return conn.hot.get_bytes(keys.version(ref_of(ds), version_id))


POLICIES = Path(__file__).resolve().parents[1] / "policies"


def policies_with(folder: Path, lifecycle_text: str | None = None, preset: str | None = None) -> Path:
    """A copy of policies/ whose lifecycle.yaml is `lifecycle_text` (or a preset), for settings'
    policies_dir; restores of the local backend are made quick (1 s) unless the text says otherwise."""
    target = folder / "policies"
    shutil.copytree(
        POLICIES, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.py", "__pycache__")
    )
    if preset is not None:
        lifecycle_text = (POLICIES / "presets" / f"{preset}.yaml").read_text()
    if lifecycle_text is not None:
        if "restore:" not in lifecycle_text:
            lifecycle_text += "\nrestore:\n  local_delay_seconds: {GLACIER: 1, DEEP_ARCHIVE: 1}\n"
        (target / "lifecycle.yaml").write_text(lifecycle_text)
    return target


def full_client(conn: Connections) -> Any:
    """The app with this work's blueprints registered as the lead will: storage API under /api and
    DELETE under /dicomweb (a no-op once create_app registers them itself)."""
    from gateway import delete, storage_api
    from gateway.app import create_app

    app = create_app(conn.settings, conn)
    app.config["TESTING"] = True
    if "storage_api" not in app.blueprints:
        app.register_blueprint(storage_api.blueprint, url_prefix="/api")
    if "delete" not in app.blueprints:
        app.register_blueprint(delete.blueprint, url_prefix="/dicomweb")
    return app.test_client()


def work_default(conn: Connections) -> None:
    """Run the jobs of the default queue (prefetch, mover runs) with a real RQ worker, in-process."""
    context.configure(conn.settings, conn)
    SimpleWorker([Queue("default", connection=conn.redis)], connection=conn.redis).work(burst=True)


@contextlib.contextmanager
def refusing(conn: Connections, tier: str, operation: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The store of `tier` refuses `operation` (CopyObject: writes into it; DeleteObject: deletes)."""
    bucket = tiers.tier_bucket(conn, tier)
    if isinstance(bucket, S3Bucket):

        def refuse(**_kwargs: object) -> None:
            raise EndpointConnectionError(endpoint_url="http://refused.invalid")

        bucket.client.meta.events.register(f"before-call.s3.{operation}", refuse)
        try:
            yield
        finally:
            bucket.client.meta.events.unregister(f"before-call.s3.{operation}", refuse)
        return
    assert isinstance(bucket, LocalBucket)
    root = bucket.root
    method = "put_file" if operation == "CopyObject" else "delete"
    real = getattr(LocalBucket, method)

    def refused(self: LocalBucket, key: str, *args: object, **kwargs: object) -> None:
        if self.root == root or root in self.root.parents:
            raise StorageUnavailable(f"local bucket {self.name}: refused (test)")
        return real(self, key, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(LocalBucket, method, refused)
        yield


def cli_env(settings: Any) -> dict[str, str]:
    env = {
        "DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "STORAGE": settings.storage,
        "ORIGINALS_BUCKET": settings.originals_bucket,
        "HOT_BUCKET": settings.hot_bucket,
        "COLD_BUCKET": settings.cold_bucket,
    }
    if settings.s3_endpoint_url:
        env["S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


ARCHIVE_AT_ONCE = """\
moves:
  - id: archive
    objects: [original]
    storage_class: GLACIER
    after: {ingest_days: 0}
"""


@contextlib.contextmanager
def connections_with(
    make_settings: Any, storage: str, folder: Path, lifecycle_text: str
) -> Iterator[Connections]:
    """Connections on `storage` whose lifecycle.yaml is `lifecycle_text` (closed after)."""
    connections = Connections(
        make_settings(storage=storage, policies_dir=policies_with(folder, lifecycle_text))
    )
    try:
        yield connections
    finally:
        connections.close()
