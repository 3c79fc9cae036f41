"""Shared fixtures: real redis-server, moto S3 server, PostgreSQL and SQLite, and the app on a real server.

Session fixtures start the services once and stop them at the end; function fixtures give each test a clean
slate (Redis flushed, a fresh SQLite file or PostgreSQL database, fresh buckets)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.connections import Connections
from gateway.redisbin import find_redis_server
from gateway.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real DICOM files of ../shared/data (SHARED_DATA overrides)."""
    return Path(os.environ.get("SHARED_DATA") or REPO / ".." / "shared" / "data").resolve()


# --- Redis --------------------------------------------------------------------------------------------------


class RedisProcess:
    """A redis-server on 127.0.0.1 in its own directory, without persistence; stop() kills it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        binary = find_redis_server()
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # the free port may be taken between probe and bind
            self.port = free_port()
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                wait_for(self._answers, "redis-server", 10)
                return self
            except TimeoutError:
                self.stop()
        raise RuntimeError("could not start redis-server")

    def _answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise TimeoutError("redis-server exited")
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    yield redis_server


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, for tests that stop it to inject a Redis fault."""
    server = RedisProcess(tmp_path / "private-redis").start()
    try:
        yield server
    finally:
        server.stop()


# --- S3 (moto in server mode) -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")}  # fmt: skip
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """One empty Bucket per test, on each backend: the same tests run against both."""
    if request.param == "local":
        from gateway.storage.local import LocalBucket

        return LocalBucket("test", tmp_path / "bucket")
    from gateway.storage.s3 import S3Bucket

    endpoint = request.getfixturevalue("moto_server")
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return S3Bucket(name, endpoint_url=endpoint)


# --- PostgreSQL ---------------------------------------------------------------------------------------------


def _postgres_bin(name: str) -> str | None:
    """Debian keeps initdb and pg_ctl off PATH, under /usr/lib/postgresql/<major>/bin; newest major first."""
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(Path(path).parts[4]) if Path(path).parts[4].isdigit() else 0,
        reverse=True,
    )
    return candidates[0] if candidates else shutil.which(name)


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as the `postgres` user then."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(_quote(a) for a in argv)]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): run `make deps`")
    # Not under pytest's tmp_path: that folder is root-only (0700) and the postgres user must enter it.
    directory = Path(tempfile.mkdtemp(prefix="gw-pg-"))
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
    data = directory / "data"
    log = directory / "server.log"
    port = free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "stdin": subprocess.DEVNULL}
    try:
        subprocess.run(
            _as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "-N"]),
            check=True, **quiet,  # type: ignore[arg-type]
        )
        options = (
            f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]),
            check=True, **quiet,  # type: ignore[arg-type]
        )
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace")
        if log.exists():
            detail += log.read_text(errors="replace")
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {detail}") from exc
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/"
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
            check=False, **quiet,  # type: ignore[arg-type]
        )
        shutil.rmtree(directory, ignore_errors=True)


def _postgres_admin(base_url: str, statement: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(base_url + "postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()


# --- Settings -----------------------------------------------------------------------------------------------

MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[MakeSettings]:
    """make_settings(storage="local"|"s3", index="sqlite"|"postgresql", **overrides) -> Settings.

    Upper-case overrides are environment variables read by Settings.from_env (PORT="abc" fails there);
    lower-case ones replace Settings fields afterwards (policies_dir=Path(...))."""
    cleanups: list[Callable[[], None]] = []
    count = 0

    def make(storage: str = "local", index: str = "sqlite", **overrides: Any) -> Settings:
        nonlocal count
        count += 1
        data_dir = tmp_path / ("data" if count == 1 else f"data{count}")
        suffix = uuid.uuid4().hex[:12]
        env = {"DATA_DIR": str(data_dir), "REDIS_URL": redis_url, "STORAGE": storage}
        if index == "postgresql":
            base = request.getfixturevalue("postgres_server")
            name = f"test_{suffix}"
            _postgres_admin(base, f"CREATE DATABASE {name}")
            cleanups.append(lambda: _postgres_admin(base, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            env["DATABASE_URL"] = base + name
        elif index == "sqlite":
            env["DATABASE_URL"] = f"sqlite:///{data_dir / 'index.sqlite3'}"
        else:
            raise ValueError(f"index must be sqlite or postgresql, not {index!r}")
        if storage == "s3":
            endpoint = request.getfixturevalue("moto_server")
            client = s3_client(endpoint)
            for kind in ("originals", "hot", "cold"):
                bucket = f"{kind}-{suffix}"
                client.create_bucket(Bucket=bucket)
                env[f"{kind.upper()}_BUCKET"] = bucket
            env["S3_ENDPOINT_URL"] = endpoint
        env.update({key: str(value) for key, value in overrides.items() if key.isupper()})
        fields = {key: value for key, value in overrides.items() if not key.isupper()}
        settings = Settings.from_env(env)
        return dataclasses.replace(settings, **fields) if fields else settings

    yield make
    for cleanup in reversed(cleanups):
        with contextlib.suppress(Exception):
            cleanup()


@pytest.fixture
def settings(make_settings: MakeSettings) -> Settings:
    return make_settings()


@pytest.fixture(params=["local", "s3"])
def storage_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
def index_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def any_storage_settings(make_settings: MakeSettings, storage_kind: str) -> Settings:
    return make_settings(storage=storage_kind)


@pytest.fixture
def any_index_settings(make_settings: MakeSettings, index_kind: str) -> Settings:
    return make_settings(index=index_kind)


@pytest.fixture
def conn(settings: Settings) -> Iterator[Connections]:
    connections = Connections(settings)
    try:
        yield connections
    finally:
        connections.close()


# --- The application ----------------------------------------------------------------------------------------


@pytest.fixture
def app(settings: Settings, conn: Connections) -> Any:
    from gateway.app import create_app  # imported here: the blueprints are still being written

    application = create_app(settings, conn)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def live_server() -> Iterator[Callable[..., str]]:
    """live_server(settings, connections=None) -> "http://127.0.0.1:PORT": the real app on a real server."""
    from werkzeug.serving import make_server

    from gateway.app import create_app

    started: list[tuple[Any, threading.Thread, Connections | None]] = []

    def start(settings: Settings, connections: Connections | None = None) -> str:
        own = None if connections is not None else Connections(settings)
        application = create_app(settings, connections or own)
        server = make_server("127.0.0.1", 0, application, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
        thread.start()
        started.append((server, thread, own))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread, own in started:
        server.shutdown()
        thread.join(10)
        server.server_close()
        if own is not None:
            own.close()
