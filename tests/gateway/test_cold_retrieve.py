"""WADO-RS of an original in the archive: the lossless version (pixel-identical) meanwhile, with the
reason; the original itself once its restore is ready. Both storage backends."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.connections import Connections
from tests.factories import make_ct
from tests.tiers_support import (
    ARCHIVE_AT_ONCE,
    connections_with,
    derive_all,
    full_client,
    hot_version,
    stow,
    where,
)
from tests.tiers_support import original as original_key
from workers import lifecycle

STAR = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture
def conn(make_settings, storage_kind: str, tmp_path: Path) -> Iterator[Connections]:  # type: ignore[no-untyped-def]
    with connections_with(make_settings, storage_kind, tmp_path, ARCHIVE_AT_ONCE) as connections:
        yield connections


def _body(response) -> bytes:  # type: ignore[no-untyped-def]
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.get_data().split(f"--{boundary}".encode())[1]
    return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


def test_an_archived_original_is_served_as_lossless_until_restored(conn: Connections) -> None:
    ds = make_ct(rows=128, columns=128)
    [data] = stow(conn, [ds])
    derive_all(conn)
    assert lifecycle.run(conn).counts == {"moved": 1}
    assert where(conn, original_key(ds).key) == {"cold": ("GLACIER", "ok")}
    client = full_client(conn)
    url = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )
    meanwhile = client.get(url + "?version=original", headers={"Accept": STAR})
    assert meanwhile.status_code == 200, meanwhile.get_data(as_text=True)
    assert meanwhile.headers["X-Served-Version"] == "lossless"
    assert "archive" in meanwhile.headers["X-Policy-Reason"]
    lossless = hot_version(conn, ds, "lossless")
    assert hashlib.sha256(_body(meanwhile)).hexdigest() == hashlib.sha256(lossless).hexdigest()
    if conn.settings.storage == "local":
        time.sleep(1.2)  # the local backend's restore delay in these rules (moto restores at once)
    conn.redis.flushdb()  # a new decision, not the one kept for this viewer a few minutes
    from gateway import tiers

    tiers._forget_locations()
    later = client.get(url + "?version=original", headers={"Accept": STAR})
    assert later.status_code == 200
    assert later.headers["X-Served-Version"] == "original"
    assert _body(later) == data
