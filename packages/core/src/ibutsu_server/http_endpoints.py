"""The HTTP endpoint of the worker and the scheduler: /metrics, /healthz, /readyz.

/metrics needs the role's basic-auth credentials (it names tasks and hosts), and is not
served at all when none are configured; the probes are open and answer only whether the
process is alive or ready. The server is built to survive
abuse from whoever can reach the port: at most MAX_CONNECTIONS requests are served at once
(more are closed at once), each within an absolute REQUEST_SECONDS however slowly a client
sends, and readiness is computed at most once per READY_CACHE_SECONDS whatever the load.
"""

from __future__ import annotations

import base64
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from ibutsu_server.settings import MetricsSettings

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
REQUEST_SECONDS = 10.0
READY_CACHE_SECONDS = 2.0

Check = Callable[[], str | None]  # None when healthy, else the reason


class Endpoints:
    """What the server answers: the metrics text and the two probes."""

    def __init__(self, metrics: Callable[[], bytes], alive: Check, ready: Check) -> None:
        self.metrics = metrics
        self.alive = alive
        self.ready = cached(ready, READY_CACHE_SECONDS)


def cached(check: Check, seconds: float) -> Check:
    """``check``, run at most once per ``seconds``; callers meanwhile share its last answer."""
    lock = threading.Lock()
    last: list[Any] = [None, float("-inf")]  # answer, when

    def answer() -> str | None:
        with lock:
            if time.monotonic() - last[1] >= seconds:
                try:
                    last[0] = check()
                except Exception as exc:  # a probe must answer, whatever broke
                    last[0] = type(exc).__name__
                last[1] = time.monotonic()
            result: str | None = last[0]
            return result

    return answer


class _DeadlineReader:
    """The request's input, read with what is left of the request's absolute deadline as the
    socket timeout: a client that trickles bytes cannot hold its thread longer than that."""

    def __init__(self, stream: Any, connection: socket.socket, deadline: float) -> None:
        self._stream = stream
        self._connection = connection
        self._deadline = deadline

    def _budget(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._connection.settimeout(left)

    def readline(self, *args: Any) -> bytes:
        self._budget()
        return bytes(self._stream.readline(*args))

    def read(self, *args: Any) -> bytes:
        self._budget()
        return bytes(self._stream.read(*args))

    def close(self) -> None:
        self._stream.close()


def _handler(endpoints: Endpoints, credentials: str | None) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_SECONDS

        def setup(self) -> None:
            super().setup()
            deadline = time.monotonic() + REQUEST_SECONDS
            self.rfile = _DeadlineReader(self.rfile, self.connection, deadline)  # type: ignore[assignment]

        def handle(self) -> None:
            try:
                super().handle()
            except (TimeoutError, OSError):
                self.close_connection = True  # too slow or gone: drop it quietly

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if expected is None:
                    self._send(404, b"metrics are off: set IBUTSU_METRICS_BASIC_AUTH\n")
                    return
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    self._send(401, b"unauthorized\n", {"WWW-Authenticate": 'Basic realm="ibutsu"'})
                    return
                self._send(200, endpoints.metrics(), {"Content-Type": CONTENT_TYPE_LATEST})
            elif path in ("/healthz", "/readyz"):
                check = endpoints.alive if path == "/healthz" else endpoints.ready
                try:
                    problem = check()
                except Exception as exc:  # a probe must answer, whatever broke
                    problem = type(exc).__name__
                if problem is None:
                    self._send(200, b"ok\n")
                else:
                    state = "alive" if path == "/healthz" else "ready"
                    self._send(503, f"not {state}: {problem}\n".encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in {
                "Content-Type": "text/plain; charset=utf-8",
                "Connection": "close",
                **(headers or {}),
            }.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler


class _BoundedServer(ThreadingHTTPServer):
    """A thread per request, at most MAX_CONNECTIONS at once; the rest are closed at once."""

    daemon_threads = True
    # Connections waiting to be accepted (and then served or closed at once).
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(settings: MetricsSettings, endpoints: Endpoints) -> ThreadingHTTPServer:
    """Start serving on ``settings.port`` in a daemon thread; returns the server."""
    server = _BoundedServer(("", settings.port), _handler(endpoints, settings.basic_auth))
    thread = threading.Thread(target=server.serve_forever, name="ibutsu-http", daemon=True)
    thread.start()
    served = "/metrics, /healthz and /readyz" if settings.basic_auth else "/healthz and /readyz"
    log.info("serving %s on port %d", served, server.server_address[1])
    return server
