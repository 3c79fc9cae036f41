"""The project's plumbing, on real parts: the fixtures' services, migrations on SQLite and PostgreSQL,
settings, both storage backends with S3 faults injected through botocore, `gateway up`, the chart."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from botocore.exceptions import EndpointConnectionError
from sqlalchemy import inspect

from gateway.errors import ConfigError, ObjectNotFound, StorageUnavailable
from gateway.index.db import make_engine, migrate
from gateway.index.models import Base
from gateway.redisbin import find_redis_server
from gateway.settings import Settings
from gateway.storage.s3 import S3Bucket
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TABLES = {"studies", "series", "instances"}


# --- Services the fixtures start ----------------------------------------------------------------------------


def test_find_redis_server_returns_a_runnable_binary() -> None:
    path = find_redis_server()
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    assert "Redis server" in version


def test_redis_fixture_is_a_real_server(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0  # flushed for this test
    client.set("gw:test", b"\x00\xff")
    assert client.get("gw:test") == b"\x00\xff"
    assert client.info("server")["redis_version"]
    client.close()


def test_private_redis_can_be_stopped(private_redis: Any) -> None:
    client = redis.Redis.from_url(private_redis.url, socket_connect_timeout=1)
    assert client.ping()
    private_redis.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_postgres_fixture_serves_a_fresh_database(make_settings: Any) -> None:
    settings = make_settings(index="postgresql")
    assert settings.database_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    engine = make_engine(settings.database_url)
    try:
        assert inspect(engine).get_table_names() == []
        migrate(engine)
        assert TABLES | {"alembic_version"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_create_the_tables_and_are_idempotent(any_index_settings: Settings) -> None:
    engine = make_engine(any_index_settings.database_url)
    try:
        migrate(engine)
        migrate(engine)  # every process start runs it again
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_heads()
    finally:
        engine.dispose()


def test_alembic_migrations_match_the_models(any_index_settings: Settings) -> None:
    engine = make_engine(any_index_settings.database_url)
    try:
        migrate(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == [], f"models and migrations differ: {differences}"


def test_make_settings_gives_each_call_its_own_buckets(make_settings: Any, moto_server: str) -> None:
    first, second = make_settings(storage="s3"), make_settings(storage="s3")
    assert first.storage == "s3" and first.s3_endpoint_url == moto_server
    assert len({first.originals_bucket, first.hot_bucket, first.cold_bucket, second.originals_bucket}) == 4
    assert first.data_dir != second.data_dir


# --- Settings -----------------------------------------------------------------------------------------------


def test_settings_defaults_are_the_embedded_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    data = (tmp_path / "var").resolve()
    assert settings.data_dir == data
    assert settings.port == 8080
    assert settings.public_url is None
    assert settings.database_url == f"sqlite:///{data / 'index.sqlite3'}"
    assert settings.redis_url == f"unix://{data / 'redis' / 'redis.sock'}"
    assert settings.redis_socket == data / "redis" / "redis.sock"
    assert settings.storage == "local"
    buckets = (settings.originals_bucket, settings.hot_bucket, settings.cold_bucket)
    assert buckets == ("originals", "hot", "cold")
    assert settings.auth_mode == "none" and settings.default_role == "radiologist"
    assert settings.uid_root == "2.25."


def test_settings_read_the_configuration_variables(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "DATA_DIR": str(tmp_path),
            "PORT": "9090",
            "PUBLIC_URL": "https://pacs.example/",
            "STORAGE": "s3",
            "S3_ENDPOINT_URL": "http://minio:9000",
            "ORIGINALS_BUCKET": "o",
            "HOT_BUCKET": "h",
            "COLD_BUCKET": "c",
            "AUTH_MODE": "local",
            "DEFAULT_ROLE": "referring",
            "UID_ROOT": "1.2.3.",
            "REDIS_URL": "redis://r:1/2",
            "DATABASE_URL": "postgresql+psycopg2://u@db/gw",
        }
    )
    assert settings.port == 9090 and settings.public_url == "https://pacs.example"
    assert settings.storage == "s3" and settings.s3_endpoint_url == "http://minio:9000"
    assert (settings.originals_bucket, settings.hot_bucket, settings.cold_bucket) == ("o", "h", "c")
    assert settings.auth_mode == "local" and settings.default_role == "referring"
    assert settings.uid_root == "1.2.3." and settings.redis_url == "redis://r:1/2"
    assert settings.database_url == "postgresql+psycopg2://u@db/gw"


def test_config_error_names_every_bad_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"PORT": "abc", "STORAGE": "ftp", "DEFAULT_ROLE": "janitor"})
    message = str(caught.value)
    assert "PORT" in message and "'abc'" in message
    assert "STORAGE" in message and "ftp" in message
    assert "DEFAULT_ROLE" in message


def test_cli_reports_a_bad_configuration(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    env = {"DATA_DIR": str(tmp_path), "PORT": "abc", "STORAGE": "ftp"}
    result = CliRunner().invoke(main, ["up"], env=env)
    assert result.exit_code == 2
    assert "PORT" in result.output and "STORAGE" in result.output
    assert not (tmp_path / "redis").exists()  # nothing was started


# --- Storage: one suite, both backends ----------------------------------------------------------------------


def test_put_bytes_then_get_head_and_range(bucket: Any) -> None:
    data = os.urandom(4096)
    bucket.put_bytes("studies/1/series/2/instances/3.dcm", data, {"kind": "original"})
    assert bucket.get_bytes("studies/1/series/2/instances/3.dcm") == data
    assert bucket.get_range("studies/1/series/2/instances/3.dcm", 100, 50) == data[100:150]
    info = bucket.head("studies/1/series/2/instances/3.dcm")
    assert info is not None
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.metadata.get("kind") == "original"
    with bucket.open("studies/1/series/2/instances/3.dcm") as stream:
        assert stream.read() == data


def test_put_file_keeps_bytes_and_sha256(bucket: Any, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    source = tmp_path / "upload.dcm"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    bucket.put_file("a/b.dcm", str(source), digest, {"ratio": "20"})
    assert hashlib.sha256(bucket.get_bytes("a/b.dcm")).hexdigest() == digest
    info = bucket.head("a/b.dcm")
    assert info is not None and info.sha256 == digest and info.size == len(data)
    assert info.metadata.get("ratio") == "20"


def test_put_replaces_an_object_whole(bucket: Any) -> None:
    bucket.put_bytes("k", b"first version")
    bucket.put_bytes("k", b"second")
    assert bucket.get_bytes("k") == b"second"
    assert bucket.head("k").sha256 == hashlib.sha256(b"second").hexdigest()


def test_missing_key_is_object_not_found(bucket: Any) -> None:
    assert bucket.head("no/such/key") is None
    with pytest.raises(ObjectNotFound):
        bucket.get_bytes("no/such/key")
    with pytest.raises(ObjectNotFound):
        bucket.open("no/such/key")
    with pytest.raises(ObjectNotFound):
        bucket.get_range("no/such/key", 0, 10)


def test_delete_is_idempotent(bucket: Any) -> None:
    bucket.put_bytes("gone.dcm", b"x")
    bucket.delete("gone.dcm")
    bucket.delete("gone.dcm")
    bucket.delete("never-was.dcm")
    assert bucket.head("gone.dcm") is None
    with pytest.raises(ObjectNotFound):
        bucket.get_bytes("gone.dcm")


def test_list_by_prefix(bucket: Any) -> None:
    keys = [
        "studies/1/series/1/instances/1.dcm",
        "studies/1/series/1/instances/2.dcm",
        "studies/1/series/2/instances/3.dcm",
        "studies/10/series/1/instances/4.dcm",
        "studies/2/study.json",
    ]
    for key in keys:
        bucket.put_bytes(key, key.encode())
    assert sorted(bucket.list("studies/1/")) == keys[:3]
    assert sorted(bucket.list("studies/1/series/1/")) == keys[:2]
    assert sorted(bucket.list("studies/1")) == keys[:4]  # a prefix, not a folder
    assert sorted(bucket.list("")) == keys
    assert list(bucket.list("studies/3/")) == []


# --- S3 faults, injected at the botocore boundary -----------------------------------------------------------


@pytest.fixture
def s3_bucket(moto_server: str) -> S3Bucket:
    from tests.conftest import s3_client

    name = f"faults-{os.urandom(6).hex()}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return S3Bucket(name, endpoint_url=moto_server)


def _refuse(status: int, code: str) -> Any:
    """A before-call handler whose answer replaces S3's: the request never leaves the client."""

    def handler(**_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        response = SimpleNamespace(status_code=status, headers={}, content=b"")
        return response, {"Error": {"Code": code, "Message": "refused by the test"},
                          "ResponseMetadata": {"HTTPStatusCode": status}}  # fmt: skip

    return handler


def _unreachable(**_kwargs: Any) -> None:
    raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")


def test_s3_refusing_put_bytes_is_storage_unavailable(s3_bucket: S3Bucket) -> None:
    s3_bucket.client.meta.events.register("before-call.s3.PutObject", _refuse(503, "SlowDown"))
    with pytest.raises(StorageUnavailable) as caught:
        s3_bucket.put_bytes("k.dcm", b"data")
    assert "SlowDown" in caught.value.detail
    s3_bucket.client.meta.events.unregister("before-call.s3.PutObject")
    assert s3_bucket.head("k.dcm") is None  # nothing half-written


def test_s3_refusing_put_file_is_storage_unavailable(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    source = tmp_path / "f.dcm"
    source.write_bytes(b"payload")
    s3_bucket.client.meta.events.register("before-call.s3.PutObject", _refuse(500, "InternalError"))
    with pytest.raises(StorageUnavailable):
        s3_bucket.put_file("f.dcm", str(source), hashlib.sha256(b"payload").hexdigest())
    s3_bucket.client.meta.events.unregister("before-call.s3.PutObject")
    assert s3_bucket.head("f.dcm") is None


def test_s3_unreachable_is_storage_unavailable_not_missing(s3_bucket: S3Bucket) -> None:
    s3_bucket.put_bytes("present.dcm", b"x")
    s3_bucket.client.meta.events.register("before-call.s3.GetObject", _unreachable)
    s3_bucket.client.meta.events.register("before-call.s3.HeadObject", _unreachable)
    with pytest.raises(StorageUnavailable):
        s3_bucket.get_bytes("present.dcm")
    with pytest.raises(StorageUnavailable):
        s3_bucket.head("present.dcm")
    s3_bucket.client.meta.events.unregister("before-call.s3.GetObject", _unreachable)
    s3_bucket.client.meta.events.unregister("before-call.s3.HeadObject", _unreachable)
    assert s3_bucket.get_bytes("present.dcm") == b"x"


def test_s3_access_denied_is_not_object_not_found(s3_bucket: S3Bucket) -> None:
    s3_bucket.client.meta.events.register("before-call.s3.GetObject", _refuse(403, "AccessDenied"))
    with pytest.raises(StorageUnavailable):
        s3_bucket.get_bytes("any.dcm")


# --- Workers ------------------------------------------------------------------------------------------------


def _child_env(**values: str) -> dict[str, str]:
    ours = ("REDIS_URL", "DATABASE_URL", "PUBLIC_URL", "STORAGE", "S3_ENDPOINT_URL", "PORT", "DATA_DIR")
    env = {key: value for key, value in os.environ.items() if key not in ours}
    env.update(values)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def test_worker_process_runs_a_queued_job(settings: Settings) -> None:
    from rq import Queue

    connection = redis.Redis.from_url(settings.redis_url)
    job = Queue("derive", connection=connection).enqueue("builtins.len", "abcd")
    env = _child_env(DATA_DIR=str(settings.data_dir), REDIS_URL=settings.redis_url,
                     DATABASE_URL=settings.database_url)  # fmt: skip
    subprocess.run([sys.executable, "-m", "workers", "--burst"], env=env, check=True, timeout=60,
                   capture_output=True)  # fmt: skip
    job.refresh()
    assert job.get_status() == "finished"
    assert job.return_value() == 4
    assert (settings.data_dir / "index.sqlite3").exists()  # the worker migrated the index at start
    connection.close()


def test_worker_context_builds_connections_once(settings: Settings) -> None:
    from workers import context

    try:
        configured = context.configure(settings)
        assert context.connections() is configured
        assert context.settings() is settings
    finally:
        context.reset()


# --- gateway up ---------------------------------------------------------------------------------------------


def _gateway_argv() -> list[str]:
    """The venv's `gateway` script, else the module (a venv without the package installed)."""
    script = Path(sys.executable).parent / "gateway"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class Up:
    """One `gateway up` in a session of its own, so its process group is its pid."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [*_gateway_argv(), "up"],
            env=_child_env(DATA_DIR=str(data_dir), PORT=str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for_root(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.output.append(line)
            found = re.search(r"DICOMweb root: (\S+)", line)
            if found:
                return found.group(1)
        self.stop()
        raise AssertionError("gateway up printed no DICOMweb root:\n" + "".join(self.output))

    def stop(self, timeout: float = 45) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            deadline = time.monotonic() + 5
            while _group_members(self.process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            leftovers = _group_members(self.process.pid)
            if leftovers:
                os.killpg(self.process.pid, signal.SIGKILL)
                raise AssertionError(f"processes left in the group after stop: {leftovers}")


def _get(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


@pytest.fixture
def up_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    # Short paths: the Redis socket under DATA_DIR must fit in a Unix socket address.
    yield tmp_path_factory.mktemp("upA"), tmp_path_factory.mktemp("upB")


def test_gateway_up_runs_side_by_side_stops_cleanly_and_restarts(up_dirs: tuple[Path, Path]) -> None:
    from rq import Queue
    from rq.job import Job

    first_dir, second_dir = up_dirs
    first_port, second_port = free_port(), free_port()
    first, second = Up(first_dir, first_port), Up(second_dir, second_port)
    try:
        assert first.wait_for_root() == f"http://localhost:{first_port}/dicomweb"
        assert second.wait_for_root() == f"http://localhost:{second_port}/dicomweb"
        for port in (first_port, second_port):
            assert _get(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
            # Index, the embedded Redis (over its Unix socket) and the local buckets all answer.
            status, body = _get(f"http://127.0.0.1:{port}/readyz")
            assert (status, body["status"]) == (200, "ready"), body
        # The embedded Redis and the worker are live: a queued job runs and its result is kept.
        connection = redis.Redis(unix_socket_path=str(first_dir / "redis" / "redis.sock"))
        job = Queue("default", connection=connection).enqueue("builtins.len", "abc", result_ttl=-1)
        deadline = time.monotonic() + 20
        while job.get_status(refresh=True) != "finished" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.return_value() == 3
        connection.close()
        # A second `up` on the same DATA_DIR refuses at once rather than take over the first one's Redis.
        clash_env = _child_env(DATA_DIR=str(first_dir), PORT=str(free_port()))
        clash = subprocess.run(
            [*_gateway_argv(), "up"], env=clash_env, capture_output=True, text=True, timeout=30
        )
        assert clash.returncode != 0 and "another `gateway up`" in clash.stderr
    finally:
        assert first.stop() == 0
        assert second.stop() == 0
    assert (first_dir / "index.sqlite3").exists()
    assert (first_dir / "buckets" / "originals").is_dir()

    restarted = Up(first_dir, first_port)
    try:
        restarted.wait_for_root()
        assert _get(f"http://127.0.0.1:{first_port}/healthz")[0] == 200
        connection = redis.Redis(unix_socket_path=str(first_dir / "redis" / "redis.sock"))
        assert Job.fetch(job.id, connection=connection).return_value() == 3  # Redis data survived
        connection.close()
        # One child dying takes the whole system down, visibly, rather than leaving it half up.
        os.kill(_child_running(restarted.process.pid, "-m workers"), signal.SIGKILL)
        assert restarted.process.wait(45) == 1
    finally:
        restarted.stop()
    assert "worker exited" in "".join(restarted.output) + "".join(iter_queue(restarted.lines))


def iter_queue(lines: queue.Queue[str]) -> Iterator[str]:
    while True:
        try:
            yield lines.get(timeout=1)
        except queue.Empty:
            return


def _child_running(parent: int, needle: str) -> int:
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[1]) == parent and needle in cmdline:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} runs {needle}")


# --- Scripts and chart --------------------------------------------------------------------------------------


def test_ensure_system_deps_is_idempotent() -> None:
    postgres = list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not (Path("/usr/bin/redis-server").exists() and postgres):
        pytest.skip("system packages not installed: this would install them")
    result = subprocess.run(["bash", str(REPO / "scripts" / "ensure-system-deps.sh")], capture_output=True,
                            text=True, timeout=60, check=True)  # fmt: skip
    assert "nothing to install" in result.stdout


def test_ci_entry_point_runs_make_test() -> None:
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and "make test" in text


def test_helm_chart_carries_every_configuration_variable() -> None:
    chart = yaml.safe_load((REPO / "helm" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "helm" / "values.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] and chart["version"]
    configmap = (REPO / "helm" / "templates" / "configmap.yaml").read_text()
    design = (REPO / ".." / "shared" / "DESIGN.md").resolve()
    documented = {"DATA_DIR", "PORT", "PUBLIC_URL", "DATABASE_URL", "REDIS_URL", "STORAGE", "S3_ENDPOINT_URL",
                  "ORIGINALS_BUCKET", "HOT_BUCKET", "COLD_BUCKET", "AUTH_MODE", "DEFAULT_ROLE", "OIDC_ISSUER",
                  "OIDC_AUDIENCE", "OIDC_JWKS_URL", "ROLE_CLAIM", "UID_ROOT"}  # fmt: skip
    if design.exists():
        section = design.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
        documented |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    in_chart = set(values["config"]) | set(re.findall(r"^\s+([A-Z][A-Z0-9_]+):", configmap, re.M))
    assert documented <= in_chart, f"missing from the chart: {sorted(documented - in_chart)}"
    templates = {path.name for path in (REPO / "helm" / "templates").iterdir()}
    assert {"gateway-deployment.yaml", "gateway-service.yaml", "worker-deployment.yaml"} <= templates
