"""The HTTP endpoint of the worker and the scheduler: /metrics, /healthz, /readyz.

/metrics needs the role's basic-auth credentials (it names tasks and hosts); the probes are
open and answer only whether the process is alive or ready.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from ibutsu_server.settings import MetricsSettings

log = logging.getLogger(__name__)

Check = Callable[[], str | None]  # None when healthy, else the reason


class Endpoints:
    """What the server answers: the metrics text and the two probes."""

    def __init__(self, metrics: Callable[[], bytes], alive: Check, ready: Check) -> None:
        self.metrics = metrics
        self.alive = alive
        self.ready = ready


def _handler(endpoints: Endpoints, credentials: str) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(credentials.encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        # An idle or slow client gives up its thread after this many seconds.
        timeout = 10

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
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
                    self._send(503, f"not ready: {problem}\n".encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in {
                "Content-Type": "text/plain; charset=utf-8",
                **(headers or {}),
            }.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: " + format, *args)

    return Handler


def serve(settings: MetricsSettings, endpoints: Endpoints) -> ThreadingHTTPServer:
    """Start serving on ``settings.port`` in a daemon thread; returns the server."""
    server = ThreadingHTTPServer(("", settings.port), _handler(endpoints, settings.basic_auth))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ibutsu-http", daemon=True)
    thread.start()
    log.info("serving /metrics, /healthz and /readyz on port %d", server.server_address[1])
    return server
