"""Local-directory bucket: one folder per bucket, atomic writes by rename, metadata in a sidecar tree."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from gateway.errors import ObjectNotFound, StorageUnavailable
from gateway.storage import ObjectInfo

_META = ".meta"
_TMP = ".tmp"


class LocalBucket:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = Path(root)
        for sub in ("", _META, _TMP):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/") or key.split("/")[0] in (_META, _TMP):
            raise ObjectNotFound(f"invalid object key {key!r}")
        return self.root / key

    def _meta_path(self, key: str) -> Path:
        return self.root / _META / (key + ".json")

    def _write_meta(self, key: str, info: dict[str, object]) -> None:
        meta = self._meta_path(key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / _TMP)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        os.replace(tmp, meta)

    def put_file(self, key: str, path: str, sha256: str, metadata: dict[str, str] | None = None) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / _TMP)
            os.close(fd)
            shutil.copyfile(path, tmp)
            self._write_meta(key, {"sha256": sha256, "metadata": metadata or {}})
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageUnavailable(f"local bucket {self.name}: {exc.strerror}") from exc

    def put_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        import hashlib

        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / _TMP)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            self._write_meta(key, {"sha256": hashlib.sha256(data).hexdigest(), "metadata": metadata or {}})
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageUnavailable(f"local bucket {self.name}: {exc.strerror}") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # noqa: SIM115 - the caller closes the stream
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key} in bucket {self.name}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"local bucket {self.name}: {exc.strerror}") from exc

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self.open(key) as handle:
            handle.seek(start)
            return handle.read(length)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        try:
            info = json.loads(self._meta_path(key).read_text())
        except (FileNotFoundError, ValueError):
            info = {}
        return ObjectInfo(key, size, info.get("sha256"), "STANDARD", dict(info.get("metadata") or {}))

    def delete(self, key: str) -> None:
        for path in (self._path(key), self._meta_path(key)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageUnavailable(f"local bucket {self.name}: {exc.strerror}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root
        # S3 semantics: a string prefix, not a folder ("studies/1" also matches "studies/10/...").
        folder = prefix.rpartition("/")[0]
        search = base / folder if folder else base
        if not search.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(search):
            if Path(dirpath) == base:
                dirnames[:] = [d for d in dirnames if d not in (_META, _TMP)]
            for filename in filenames:
                key = os.path.relpath(os.path.join(dirpath, filename), base).replace(os.sep, "/")
                if key.startswith(prefix):
                    yield key
