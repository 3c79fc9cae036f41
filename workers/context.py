"""The worker process's Settings and Connections, built once and shared by every job it runs.

Core only (never Flask): job functions call `connections()`; tests that run jobs in-process with
`SimpleWorker` hand their own with `configure(settings, connections)`."""

from __future__ import annotations

import os

from gateway.connections import Connections
from gateway.settings import Settings

_settings: Settings | None = None
_connections: Connections | None = None
_pid: int | None = None


def configure(settings: Settings, connections: Connections | None = None) -> Connections:
    """Use these settings (and connections) for the rest of the process; returns the connections."""
    global _settings, _connections, _pid
    _settings = settings
    _connections = connections or Connections(settings)
    _pid = os.getpid()
    return _connections


def settings() -> Settings:
    if _settings is None:
        configure(Settings.from_env())
    assert _settings is not None
    return _settings


def connections() -> Connections:
    """The process's connections; after a fork (RQ runs each job in a work horse) the inherited
    SQLAlchemy pool is dropped without closing the parent's sockets, as SQLAlchemy advises."""
    global _pid
    if _connections is None:
        configure(settings())
    assert _connections is not None
    if _pid != os.getpid():
        if "engine" in _connections.__dict__:
            _connections.engine.dispose(close=False)
        _pid = os.getpid()
    return _connections


def reset() -> None:
    """Forget the configured settings and close the connections (tests, worker shutdown)."""
    global _settings, _connections, _pid
    if _connections is not None:
        _connections.close()
    _settings = _connections = _pid = None
