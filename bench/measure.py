"""Timing helpers shared by every row: HTTP sessions, sequential latency samples, concurrent throughput.

Responses are read raw (never decompressed by the client), so a gzip answer costs the bench no CPU that
the server under test would be missing on a small machine; every loop is bounded by a count or a deadline.
The high-rate frame loop uses `LeanClient` (http.client, one kept-alive connection, readinto a reused
buffer): it costs about 0.4 ms of client CPU per 512 KB frame where requests costs about 0.9 ms, CPU
that the servers would otherwise lose on two cores.
"""

from __future__ import annotations

import http.client
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

IDENTITY = "identity"
GZIP = "gzip, deflate"
CHUNK = 1 << 20
STOP = threading.Event()  # set on Ctrl-C or SIGTERM: every client loop ends at its next request


class Failed(Exception):
    """A measurement that could not be made; the message goes into the table as "failed: ..."."""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in 0..100."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def session(pool: int = 8) -> requests.Session:
    """A keep-alive session whose pool holds `pool` connections per host (one per client thread)."""
    s = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool, max_retries=0)
    s.mount("http://", adapter)
    return s


@dataclass
class Reply:
    status: int
    size: int  # bytes on the wire (compressed if the server compressed)
    encoding: str
    content_type: str
    body: bytes = b""


def get(
    s: requests.Session, url: str, headers: dict[str, str], keep: bool = False, timeout: float = 120
) -> Reply:
    """GET and read the whole body raw; `keep` also returns it (decoded) for checks."""
    with s.get(url, headers=headers, stream=True, timeout=timeout) as response:
        size = 0
        kept: list[bytes] = []
        for chunk in response.raw.stream(CHUNK, decode_content=False):
            size += len(chunk)
            if keep:
                kept.append(chunk)
        body = b"".join(kept)
        encoding = response.headers.get("Content-Encoding", "")
        if keep and encoding in ("gzip", "deflate"):
            import zlib

            body = zlib.decompress(body, 47 if encoding == "gzip" else 15)
        return Reply(response.status_code, size, encoding, response.headers.get("Content-Type", ""), body)


def multipart_dicom(parts: Iterable[bytes]) -> tuple[bytes, str]:
    """A STOW-RS body (PS3.18 10.5) and its Content-Type, built in memory for small instances."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for data in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(s: requests.Session, root: str, parts: list[bytes], timeout: float = 300) -> None:
    """Store parts in one request; Failed unless the server says every instance was stored."""
    body, content_type = multipart_dicom(parts)
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    response = s.post(f"{root}/studies", data=body, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise Failed(f"STOW HTTP {response.status_code}: {response.text[:300]}")
    try:
        answer = response.json()
    except ValueError as exc:
        raise Failed(f"STOW answer is not JSON: {response.text[:200]}") from exc
    failed = answer.get("00081198", {}).get("Value") if isinstance(answer, dict) else None
    if failed:
        raise Failed(f"STOW refused {len(failed)} instance(s): {str(failed)[:300]}")


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.seconds, q)


def sequential(call: Callable[[], Reply], count: int, seconds: float, warmup: int = 3) -> Latencies:
    """Up to `count` calls one after the other (stopping at `seconds`), after `warmup` unmeasured ones."""
    for _ in range(warmup):
        reply = call()
        if reply.status != 200:
            raise Failed(f"HTTP {reply.status}: {reply.body[:200]!r}")
    out = Latencies()
    deadline = time.perf_counter() + seconds
    while len(out.seconds) < count and (len(out.seconds) < 5 or time.perf_counter() < deadline):
        if STOP.is_set():
            raise Failed("interrupted")
        start = time.perf_counter()
        reply = call()
        out.seconds.append(time.perf_counter() - start)
        out.sizes.append(reply.size)
        if reply.status != 200:
            raise Failed(f"HTTP {reply.status}")
    return out


@dataclass
class Throughput:
    done: int
    errors: int
    elapsed: float
    bytes: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else math.nan


class LeanClient:
    """One kept-alive HTTP/1.1 connection to `base` (http://host:port), reconnected after an error."""

    def __init__(self, base: str) -> None:
        host, _, port = base.split("/")[2].partition(":")
        self.host, self.port = host, int(port or 80)
        self.connection: http.client.HTTPConnection | None = None
        self.buffer = memoryview(bytearray(CHUNK))

    def get(self, path: str, headers: dict[str, str], timeout: float = 120) -> Reply:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            self.connection.request("GET", path, headers=headers)
            response = self.connection.getresponse()
            size = 0
            while count := response.readinto(self.buffer):
                size += count
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Failed(f"{type(exc).__name__}: {exc}") from exc
        if response.will_close:
            self.close()
        return Reply(
            response.status,
            size,
            response.getheader("Content-Encoding", ""),
            response.getheader("Content-Type", ""),
        )

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def for_duration(
    call: Callable[[Any, int], Reply], clients: int, seconds: float, make: Callable[[], Any] | None = None
) -> Throughput:
    """`clients` threads, each with its own keep-alive client from `make` (default a requests session),
    calling until the deadline."""
    lock = threading.Lock()
    totals = {"done": 0, "errors": 0, "bytes": 0}
    first_error: list[str] = []
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        s = make() if make else session(1)
        n = 0
        while time.perf_counter() < stop_at and not STOP.is_set():
            try:
                reply = call(s, index * 1_000_003 + n)
                ok = reply.status == 200
                problem = "" if ok else f"HTTP {reply.status}"
            except (requests.RequestException, Failed) as exc:
                ok, reply, problem = False, None, f"{type(exc).__name__}: {exc}"
            n += 1
            with lock:
                if ok and reply is not None:
                    totals["done"] += 1
                    totals["bytes"] += reply.size
                else:
                    totals["errors"] += 1
                    if not first_error:
                        first_error.append(problem[:300])
            if totals["errors"] > 50 and totals["done"] == 0:
                return
        s.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    return Throughput(totals["done"], totals["errors"], elapsed, totals["bytes"], "".join(first_error))


def for_items(
    call: Callable[[requests.Session, Any], None], items: Sequence[Any], clients: int
) -> Throughput:
    """Work through `items` with `clients` threads (one keep-alive connection each); failures are counted."""
    lock = threading.Lock()
    position = {"next": 0, "done": 0, "errors": 0}
    first_error: list[str] = []

    def client(_: int) -> None:
        s = session(1)
        while True:
            with lock:
                index = position["next"]
                position["next"] += 1
            if index >= len(items) or STOP.is_set():
                break
            try:
                call(s, items[index])
                ok, problem = True, ""
            except (requests.RequestException, Failed) as exc:
                ok, problem = False, f"{type(exc).__name__}: {exc}"
            with lock:
                position["done" if ok else "errors"] += 1
                if problem and not first_error:
                    first_error.append(problem[:300])
        s.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    return Throughput(position["done"], position["errors"], elapsed, 0, "".join(first_error))
