"""Shared by the WADO-RS tests: the app with every retrieve blueprint, storing shared files through
STOW, and a strict multipart/related reader for responses (RFC 2046 5.1.1)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.multipart import content_type_params
from tests.factories import multipart_body

STOW = "/dicomweb/studies"


def with_retrieve_blueprints(application: Any) -> Any:
    """Register frames and the /api original route if app.py does not (yet)."""
    from gateway import frames, wado

    if "frames" not in application.blueprints:
        application.register_blueprint(frames.blueprint, url_prefix="/dicomweb")
    if "wado_api" not in application.blueprints:
        application.register_blueprint(wado.api_blueprint, url_prefix="/api")
    return application


@pytest.fixture
def app(settings: Any, conn: Any) -> Any:
    from gateway.app import create_app

    application = create_app(settings, conn)
    application.config["TESTING"] = True
    return with_retrieve_blueprints(application)


def store(client: Any, *items: Path | bytes) -> dict[str, Any]:
    """STOW the files (or Part 10 bytes) in one request; asserts every one was stored."""
    parts = [item.read_bytes() if isinstance(item, Path) else item for item in items]
    body, content_type = multipart_body(parts)
    response = client.post(
        STOW, data=body, content_type=content_type, headers={"Accept": "application/dicom+json"}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def transfer_syntax(self) -> str:
        _media, params = content_type_params(self.content_type)
        return params.get("transfer-syntax", "")

    @property
    def media_type(self) -> str:
        return content_type_params(self.content_type)[0]


def parts(response: Any) -> list[Part]:
    """Every part of a multipart/related response; fails on a malformed body."""
    media, params = content_type_params(response.headers["Content-Type"])
    assert media == "multipart/related", response.headers["Content-Type"]
    boundary = params["boundary"].encode()
    body = response.get_data()
    assert body.startswith(b"--" + boundary + b"\r\n"), body[:80]
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n"), body[-80:]
    found: list[Part] = []
    for segment in (b"\r\n" + body).split(b"\r\n--" + boundary)[1:-1]:
        assert segment.startswith(b"\r\n")
        head, sep, content = segment[2:].partition(b"\r\n\r\n")
        assert sep, "part without a blank line after its headers"
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            assert int(headers["content-length"]) == len(content)
        found.append(Part(headers, content))
    return found
