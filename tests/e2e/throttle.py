"""A throttling TCP proxy on loopback: a slow line between a client and a server, for tests and the bench.

Bytes from the server reach the client at `mbps` (all connections share one line, as on a real link);
the proxy reads from the server only as fast as it sends on, with a small receive buffer, so the
server's writes block as they would on a slow network and the throughput the gateway measures for
the client is the line's. Bounded: at most `max_connections` at once, and everything stops by itself
after `lifetime` seconds (or at stop() / the end of a `with` block). Standard library only."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

# The proxy reads from the server in small, evenly paced pieces (about 10 ms of the line each) through
# a small receive buffer with Ethernet-sized segments. Loopback's 64 KB segments and bursty reads let
# the server's send buffer grow to megabytes (Linux sizes it from cwnd x MSS, BBR's bandwidth probe
# from the bursts), so a whole response would vanish into buffers and "arrive" in no time; like this
# about 0.2 MB stays in flight, close to what a real slow path leaves.
MIN_CHUNK, MAX_CHUNK = 2048, 65536
SERVER_RCVBUF = 8192
SERVER_MSS = 1460


class Line:
    """One shared pacer: every chunk waits until the line has carried the ones before it."""

    def __init__(self, mbps: float) -> None:
        if mbps <= 0:
            raise ValueError("mbps must be positive")
        self.bytes_per_second = mbps * 1_000_000 / 8
        self.chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, self.bytes_per_second / 100)))
        self._free_at = 0.0
        self._lock = threading.Lock()

    def wait(self, nbytes: int, stop: threading.Event) -> bool:
        """Block until `nbytes` may be sent; False when the proxy is stopping."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.bytes_per_second
            until = self._free_at
        delay = until - time.monotonic()
        return not stop.wait(delay) if delay > 0 else not stop.is_set()


class Throttle:
    """`with Throttle(("127.0.0.1", port), mbps=2) as proxy:` then talk to proxy.url instead.

    `up_mbps` throttles the client-to-server direction too (None: unthrottled)."""

    def __init__(
        self,
        target: tuple[str, int],
        mbps: float,
        up_mbps: float | None = None,
        lifetime: float = 300.0,
        max_connections: int = 32,
    ) -> None:
        self.target = target
        self.down = Line(mbps)
        self.up = Line(up_mbps) if up_mbps else None
        self.lifetime = lifetime
        self.max_connections = max_connections
        self.stopping = threading.Event()
        self.bytes_down = 0
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Throttle:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._spawn(self._accept_loop, "throttle-accept")
        timer = threading.Timer(self.lifetime, self.stop)
        timer.daemon = True
        timer.start()
        return self

    def __enter__(self) -> Throttle:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the listener and every connection; idempotent, safe from any thread."""
        self.stopping.set()
        with self._lock:
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        current = threading.current_thread()
        for thread in list(self._threads):
            if thread is not current:
                thread.join(2)

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.update(sockets)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stopping.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                client.close()  # over the bound: refused, as a full server would
                continue
            try:
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SERVER_RCVBUF)  # before connect
                server.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SERVER_MSS)
                server.settimeout(10)
                server.connect(self.target)
                server.settimeout(None)
            except OSError:
                client.close()
                self._slots.release()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(client, server)
            done = threading.Event()
            self._spawn(self._pump, "throttle-down", server, client, self.down, True, done)
            self._spawn(self._pump, "throttle-up", client, server, self.up, False, done)

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        line: Line | None,
        downstream: bool,
        done: threading.Event,
    ) -> None:
        try:
            while not self.stopping.is_set():
                data = source.recv(line.chunk if line is not None else MAX_CHUNK)
                if not data:
                    break
                if line is not None and not line.wait(len(data), self.stopping):
                    break
                sink.sendall(data)
                if downstream:
                    with self._lock:
                        self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with self._lock:
                last = done.is_set()  # the other direction ended first: this connection is over
                done.set()
                if last:
                    self._sockets.difference_update((source, sink))
            if last:
                for sock in (source, sink):
                    with contextlib.suppress(OSError):
                        sock.close()
                self._slots.release()
