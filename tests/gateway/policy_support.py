"""Shared by the policy tests (diagnosis, decide, api): a gateway in AUTH_MODE=local with real tokens
from `gateway.auth.mint_local_token` (what `gateway token` prints), STOW, and derive jobs run for real."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from rq import Queue, SimpleWorker

from gateway.auth import mint_local_token
from gateway.connections import Connections
from gateway.jobs import DERIVE_QUEUE
from gateway.settings import Settings
from gateway.uids import new_uid
from tests.factories import multipart_body, to_bytes
from workers import context

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@dataclass
class Gateway:
    client: Any
    settings: Settings
    conn: Connections

    def auth(self, role: str, subject: str | None = None, groups: tuple[str, ...] = ()) -> dict[str, str]:
        token = mint_local_token(self.settings, [role], subject or f"{role}-1", groups)
        return {"Authorization": f"Bearer {token}"}

    def stow(self, *items: Path | bytes | pydicom.Dataset, role: str = "uploader") -> dict[str, Any]:
        return stow(self.client, *items, headers=self.auth(role))


def as_bytes(item: Path | bytes | pydicom.Dataset) -> bytes:
    if isinstance(item, Path):
        return item.read_bytes()
    if isinstance(item, pydicom.Dataset):
        return to_bytes(item)
    return item


def stow(client: Any, *items: Path | bytes | pydicom.Dataset, headers: dict[str, str] | None = None) -> Any:
    body, content_type = multipart_body([as_bytes(item) for item in items])
    response = client.post(
        "/dicomweb/studies",
        data=body,
        content_type=content_type,
        headers={"Accept": "application/dicom+json", **(headers or {})},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def derive_all(conn: Connections) -> None:
    context.configure(conn.settings, conn)
    SimpleWorker([Queue(DERIVE_QUEUE, connection=conn.redis)], connection=conn.redis).work(burst=True)


def moved_into(path: Path, study_uid: str) -> bytes:
    """A real file's content under new UIDs in another study (for several diagnosis objects per study)."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = new_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(name="gateway")
def gateway_fixture(make_settings: Any) -> Iterator[Gateway]:
    """A gateway in AUTH_MODE=local (import `gateway_fixture` into a test module to use `gateway`)."""
    from gateway.app import create_app

    settings = make_settings(AUTH_MODE="local")
    conn = Connections(settings)
    app = create_app(settings, conn)
    app.config["TESTING"] = True
    try:
        yield Gateway(app.test_client(), settings, conn)
    finally:
        conn.close()
