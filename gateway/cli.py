"""The `gateway` command: `up` runs the whole embedded system in the foreground; `serve`, `worker` and
`migrate` run one part each, for operators at scale. Other command groups attach to `main`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import click

from gateway.errors import ConfigError, GatewayError
from gateway.redisbin import find_redis_server
from gateway.settings import Settings

# Seconds a child gets between SIGTERM and SIGKILL; gunicorn's own graceful timeout is 30.
GRACE_SECONDS = 35.0
# sun_path of a Unix socket holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


@click.group()
def main() -> None:
    """DICOMweb gateway in front of object storage."""


def load_settings() -> Settings:
    """Settings.from_env(), with a bad configuration reported as a usage error naming every variable."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def gunicorn_argv(settings: Settings, workers: int = 2, threads: int = 4) -> list[str]:
    """The gunicorn command line; the long timeout lets a multi-GB STOW stream to the end."""
    argv = [
        sys.executable, "-m", "gunicorn",
        "--bind", f"0.0.0.0:{settings.port}",
        "--workers", str(workers),
        "--threads", str(threads),
        "--timeout", "3600",
        "--graceful-timeout", "30",
    ]  # fmt: skip
    import gunicorn.config

    if hasattr(gunicorn.config, "ControlSocket"):
        # newer gunicorn opens a control socket, by default one per user in ~/.gunicorn: two instances
        # side by side would share it, so each DATA_DIR gets its own.
        argv += ["--control-socket", str(settings.data_dir / "gunicorn.ctl")]
    return [*argv, "gateway.app:create_app()"]


def redis_argv(settings: Settings) -> list[str]:
    """redis-server on a Unix socket only (port 0), its AOF and snapshots under DATA_DIR/redis."""
    return [
        find_redis_server(),
        "--port", "0",
        "--unixsocket", str(settings.redis_socket),
        "--unixsocketperm", "700",
        "--dir", str(settings.redis_socket.parent),
        "--appendonly", "yes",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """Runs in each child before exec: Linux sends it SIGTERM if `gateway up` itself is killed."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (empty where there is no /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Stopped(Exception):
    """A stop signal arrived while starting up."""


@dataclass
class Supervisor:
    """Children of `gateway up`, in its process group, stopped in reverse tiers (Redis last)."""

    grace: float = GRACE_SECONDS
    children: list[tuple[int, str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stop_signal: int | None = None

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: no more patience
            for _tier, _name, process in self.children:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
        self.stop_signal = signum

    def start(self, tier: int, name: str, argv: list[str], env: dict[str, str]) -> None:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.children.append((tier, name, process))

    def dead_child(self) -> tuple[str, int] | None:
        for _tier, name, process in self.children:
            code = process.poll()
            if code is not None:
                return name, code
        return None

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll `ready` until true; give up on a stop signal, a child's death or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stop_signal is not None:
                raise Stopped()
            dead = self.dead_child()
            if dead is not None:
                raise click.ClickException(f"{dead[0]} exited with status {dead[1]} while starting")
            if ready():
                return
            if time.monotonic() > deadline:
                raise click.ClickException(f"{what} did not answer within {timeout:.0f} s")
            time.sleep(0.1)

    def stop_all(self) -> None:
        """SIGTERM each tier (highest first), SIGKILL whatever outlives the grace period."""
        for tier in sorted({tier for tier, _, _ in self.children}, reverse=True):
            group = [(name, p) for t, name, p in self.children if t == tier]
            for _name, process in group:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            for name, process in group:
                leftovers = _descendants(process.pid)
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    click.echo(f"gateway up: killing {name}, still alive after SIGTERM", err=True)
                    leftovers = _descendants(process.pid)
                    process.kill()
                    process.wait()
                for pid in leftovers:  # e.g. gunicorn workers left behind by a killed master
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def _redis_answers(url: str) -> Callable[[], bool]:
    import redis

    def check() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):  # BusyLoadingError while the AOF loads is a RedisError
            return False
        finally:
            client.close()

    return check


def _http_answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[IO[str]]:
    """One `gateway up` per DATA_DIR: a second would take over the first one's Redis socket."""
    handle = open(data_dir / "gateway.lock", "a+")  # noqa: SIM115 - held for the lifetime of `up`
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise click.ClickException(f"another `gateway up` is running on {data_dir}") from exc
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield handle
    finally:
        handle.close()


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise click.ClickException(f"port {port} is in use: set PORT to a free one") from exc


def _child_env(settings: Settings) -> dict[str, str]:
    """The children see the same configuration, with the derived values spelled out."""
    env = dict(os.environ)
    env["DATA_DIR"] = str(settings.data_dir)
    env["PORT"] = str(settings.port)
    env["REDIS_URL"] = settings.redis_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        # prometheus-client's multiprocess mode: gunicorn workers and the RQ worker share counters here.
        metrics = settings.data_dir / "metrics"
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    return env


def _migrate(settings: Settings) -> None:
    from gateway.connections import Connections

    connections = Connections(settings)
    try:
        connections.engine  # noqa: B018 - building the engine runs the migrations
    except GatewayError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        connections.close()


def _start_redis(supervisor: Supervisor, settings: Settings, env: dict[str, str]) -> None:
    sock = settings.redis_socket
    if len(str(sock).encode()) > _MAX_SOCKET_PATH:
        raise click.ClickException(
            f"the Redis socket path {sock} is too long for a Unix socket: "
            "use a shorter DATA_DIR or set REDIS_URL"
        )
    sock.parent.mkdir(parents=True, exist_ok=True)
    try:
        supervisor.start(0, "redis-server", redis_argv(settings), env)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes")
@click.option("--threads", default=4, show_default=True, help="threads per gunicorn worker")
def up(workers: int, threads: int) -> None:
    """Run Redis (unless REDIS_URL is set), the gateway and one worker in the foreground until stopped."""
    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    with _data_dir_lock(settings.data_dir):
        _check_port_free(settings.port)
        env = _child_env(settings)
        try:
            if settings.redis_url == f"unix://{settings.redis_socket}":  # REDIS_URL unset: embedded Redis
                _start_redis(supervisor, settings, env)
            supervisor.wait_until(_redis_answers(settings.redis_url), "Redis", 120)
            _migrate(settings)
            supervisor.start(1, "gunicorn", gunicorn_argv(settings, workers, threads), env)
            supervisor.start(1, "worker", [sys.executable, "-m", "workers"], env)
            health = f"http://127.0.0.1:{settings.port}/healthz"
            supervisor.wait_until(_http_answers(health), f"the gateway at {health}", 120)
            root = (settings.public_url or f"http://localhost:{settings.port}") + "/dicomweb"
            click.echo(f"DICOMweb root: {root}")
            click.echo(f"data in {settings.data_dir}; Ctrl-C stops everything")
            while supervisor.stop_signal is None:
                dead = supervisor.dead_child()
                if dead is not None:
                    raise click.ClickException(f"{dead[0]} exited with status {dead[1]}; stopping the rest")
                time.sleep(0.2)
        except Stopped:
            pass
        finally:
            supervisor.stop_all()
    click.echo("gateway up: stopped")


@main.command()
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes")
@click.option("--threads", default=4, show_default=True, help="threads per gunicorn worker")
def serve(workers: int, threads: int) -> None:
    """Run only the HTTP gateway under gunicorn on PORT (Redis, index and buckets are external)."""
    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = gunicorn_argv(settings, workers, threads)
    os.execv(argv[0], argv)


@main.command()
@click.option("--burst", is_flag=True, help="work off what is queued, then exit")
def worker(burst: bool) -> None:
    """Run one RQ worker on the derive and default queues (same as `python -m workers`)."""
    load_settings()
    from workers.__main__ import run

    run(burst=burst)


@main.command()
def migrate() -> None:
    """Bring the index schema to the newest revision (a Helm hook or init container runs it once)."""
    _migrate(load_settings())
    click.echo("index schema is up to date")


@main.command()
@click.option("--role", "roles", required=True, multiple=True, help="a role of access.yaml (repeatable)")
@click.option("--sub", "subject", default=None, help="the token's subject (default: local-ROLE)")
@click.option("--groups", default="", help="comma-separated groups (for group client profiles)")
@click.option("--ttl", default=8 * 3600, show_default=True, help="seconds the token is valid")
def token(roles: tuple[str, ...], subject: str | None, groups: str, ttl: int) -> None:
    """Print a bearer token that AUTH_MODE=local accepts, signed with the key under DATA_DIR."""
    from gateway.auth import mint_local_token
    from gateway.errors import RulesError
    from policies.rules import RulesStore

    settings = load_settings()
    try:
        known = RulesStore(settings.policies_dir).access.roles
    except RulesError as exc:
        raise click.ClickException(str(exc)) from exc
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: roles are {', '.join(known)}", param_hint="--role")
    if ttl <= 0:
        raise click.BadParameter("must be positive", param_hint="--ttl")
    if settings.auth_mode != "local":
        mode = settings.auth_mode
        click.echo(f"note: AUTH_MODE is {mode}; only AUTH_MODE=local accepts this token", err=True)
    group_list = [g.strip() for g in groups.split(",") if g.strip()]
    click.echo(mint_local_token(settings, roles, subject, group_list, ttl))


@main.group()
def rules() -> None:
    """The rule files in policies/ (versions.yaml, access.yaml)."""


@rules.command("check")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder to check (default: POLICIES_DIR)")  # fmt: skip
def rules_check(folder: Path | None) -> None:
    """Validate the rule files before they go live; running gateways pick up edited files by
    themselves within access.yaml's reload_check_seconds, and keep the last good rules when a file is bad."""
    from gateway.errors import RulesError
    from policies.rules import RulesStore

    folder = folder or load_settings().policies_dir
    store = RulesStore(folder)
    try:
        store.reload(require_access=True)
    except RulesError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{folder}: versions.yaml and access.yaml are good (generation {store.generation})")


def _lifecycle_rules(settings: Settings, rules_file: Path | None, preset: str | None):  # type: ignore[no-untyped-def]
    """lifecycle.yaml, a --rules file or a --preset, checked against versions.yaml."""
    from gateway.errors import RulesError
    from policies.lifecycle import load_lifecycle, rules_path
    from policies.rules import load_versions

    try:
        path = rules_path(settings.policies_dir, rules_file, preset)
        return load_lifecycle(path, load_versions(settings.policies_dir / "versions.yaml"))
    except RulesError as exc:
        raise click.ClickException(str(exc)) from exc


def _lifecycle_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--preset",
        default=None,
        help="a preset of policies/presets (archive-originals, mirror, archive-lossy)",
    )(command)
    return click.option(
        "--rules", "rules_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
        help="a lifecycle rules file (default: policies/lifecycle.yaml)",
    )(command)  # fmt: skip


@main.group()
def lifecycle() -> None:
    """Tiers and lifecycle: S3-native rules per bucket, and the mover between buckets."""


@lifecycle.command("plan")
@_lifecycle_options
def lifecycle_plan(rules_file: Path | None, preset: str | None) -> None:
    """Print, per bucket, the JSON boto3's put_bucket_lifecycle_configuration takes (null: none)."""
    import json

    settings = load_settings()
    rules = _lifecycle_rules(settings, rules_file, preset)
    buckets = {
        "originals": settings.originals_bucket,
        "hot": settings.hot_bucket,
        "cold": settings.cold_bucket,
    }
    click.echo(json.dumps(rules.render(buckets), indent=2))


@lifecycle.command("apply")
@_lifecycle_options
def lifecycle_apply(rules_file: Path | None, preset: str | None) -> None:
    """Put each bucket's lifecycle configuration (removing it where the rules render none)."""
    from gateway.connections import Connections
    from gateway.storageclass import apply_configurations

    settings = load_settings()
    rules = _lifecycle_rules(settings, rules_file, preset)
    connections = Connections(settings)
    try:
        for bucket, what in apply_configurations(connections, rules).items():
            click.echo(f"{bucket}: {what}")
    except GatewayError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        connections.close()


@lifecycle.command("run")
@_lifecycle_options
@click.option("--dry-run", is_flag=True, help="list what would move; change nothing")
def lifecycle_run(rules_file: Path | None, preset: str | None, dry_run: bool) -> None:
    """Run the mover once: copy, verify, record, then delete, for every object due (exit 1 on failures)."""
    from gateway.connections import Connections
    from workers.lifecycle import run

    settings = load_settings()
    rules = _lifecycle_rules(settings, rules_file, preset)
    connections = Connections(settings)
    try:
        report = run(connections, rules, dry_run=dry_run)
    except GatewayError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        connections.close()
    for outcome in report.outcomes:
        if outcome.result == "planned":
            verb = "would move" if outcome.action == "move" else "would copy"
            click.echo(f"{verb} {outcome.key} -> cold ({outcome.storage_class}): {outcome.reason}")
        elif outcome.result in ("failed", "skipped"):
            click.echo(f"{outcome.result} {outcome.key}: {outcome.reason}")
    counts = ", ".join(f"{name} {count}" for name, count in sorted(report.counts.items())) or "nothing due"
    summary = report.as_json()
    click.echo(
        f"{'dry run: ' if dry_run else ''}{counts}; {report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s"
        + (f"; {report.finished_leaving} leaving copies deleted" if report.finished_leaving else "")
        + (f"; stopped: {summary['stopped']}" if report.stopped else "")
    )
    if report.counts.get("failed"):
        raise SystemExit(1)


@main.group("index")
def index_group() -> None:
    """The SQL index: rebuilt from the buckets alone when lost."""


@index_group.command("rebuild")
@click.option("--wipe", is_flag=True, help="empty the index first (otherwise only what is missing is added)")
def index_rebuild(wipe: bool) -> None:
    """Rebuild studies, series, instances, versions, locations, checksums and diagnosis status from the
    buckets (originals, hot, cold) and each study's study.json."""
    from gateway.connections import Connections
    from gateway.index.rebuild import rebuild

    connections = Connections(load_settings())
    try:
        report = rebuild(connections, wipe=wipe)
    except GatewayError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        connections.close()
    for line in report.lines():
        click.echo(line)


@main.command()
@click.option("--repair", is_flag=True, help="fix what can be fixed (otherwise read-only)")
@click.option("--deep", is_flag=True, help="hash every readable object instead of trusting stored checksums")
def fsck(repair: bool, deep: bool) -> None:
    """Compare the index with the buckets: rows without objects, objects without rows, checksum
    mismatches (exit 1 when something is wrong and was not repaired)."""
    from gateway.connections import Connections
    from gateway.fsck import check

    connections = Connections(load_settings())
    try:
        report = check(connections, repair=repair, deep=deep)
    except GatewayError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        connections.close()
    for line in report.lines():
        click.echo(line)
    if report.unrepaired:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
