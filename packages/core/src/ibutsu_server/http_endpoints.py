"""The HTTP endpoint of the worker and the scheduler: /metrics, /healthz, /readyz.

/metrics needs the role's basic-auth credentials (it names tasks and hosts), and is not
served at all when none are configured; the probes are open and answer only whether the
process is alive or ready.

The server is built to survive abuse from whoever can reach the port. Requests are read by one
event loop, which costs a slow client no thread: a connection that has not sent its whole
request (at most MAX_HEAD_BYTES) within REQUEST_SECONDS of connecting is closed, however it
trickles, and so is one whose answer it does not read in that time. At most MAX_OPEN
connections wait for their request; the next one makes room by closing the one that has
waited longest, so slow clients can never lock out a liveness probe, which is answered on the
loop itself at once. Readiness and metrics, which may block on the broker, the database or
the metric files, run on WORKERS threads, and readiness is computed at most once per
READY_CACHE_SECONDS whatever the load.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from ibutsu_server.settings import MetricsSettings

log = logging.getLogger(__name__)

MAX_OPEN = 256
WORKERS = 4
REQUEST_SECONDS = 10.0
READY_CACHE_SECONDS = 2.0
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}

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


class _BadRequest(Exception):
    """A request that gets an error status instead of an answer."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


Response = tuple[int, bytes, dict[str, str]]


class ProbeServer:
    """The endpoint's listening socket and event loop, served from a daemon thread."""

    def __init__(self, port: int, endpoints: Endpoints, credentials: str | None) -> None:
        self.endpoints = endpoints
        self.expected = (
            "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None
        )
        self.loop = asyncio.new_event_loop()
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ibutsu-http")
        # Connections still waiting for their request, oldest first: whom to close for room.
        self.waiting: dict[asyncio.StreamWriter, None] = {}
        self.server = self.loop.run_until_complete(
            # Every IPv4 interface, as before: a pod's probes and Prometheus reach its IP.
            asyncio.start_server(
                self._connection,
                "0.0.0.0",  # noqa: S104
                port,
                limit=MAX_HEAD_BYTES,
                backlog=MAX_OPEN,
            )
        )
        self.server_address = self.server.sockets[0].getsockname()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="ibutsu-http", daemon=True
        )
        self.thread.start()

    def shutdown(self) -> None:
        """Stop serving: no new connection, open ones closed."""
        if self.loop.is_closed():
            return

        async def stop() -> None:
            self.server.close()
            for writer in list(self.waiting):
                writer.transport.abort()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=REQUEST_SECONDS)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=REQUEST_SECONDS)

    def server_close(self) -> None:
        """Release the loop and the threads (after :meth:`shutdown`)."""
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.waiting) >= MAX_OPEN:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abort()
        self.waiting[writer] = None
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                try:
                    method, path, headers = await _read_request(reader)
                    self.waiting.pop(writer, None)
                    status, body, extra = await self._answer(method, path, headers)
                except _BadRequest as bad:
                    status, body, extra = bad.status, f"{_REASONS[bad.status]}\n".encode(), {}
                writer.write(_response(status, body, extra))
                writer.close()  # once the answer is sent
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # too slow, or gone: drop it quietly
        finally:
            self.waiting.pop(writer, None)
            writer.transport.abort()  # at once, unless it is closed already

    async def _answer(self, method: str, path: str, headers: dict[str, str]) -> Response:
        if method != "GET":
            raise _BadRequest(501)
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return _probe("alive", self.endpoints.alive)
        if path == "/readyz":
            return await self.loop.run_in_executor(self.pool, _probe, "ready", self.endpoints.ready)
        if path != "/metrics":
            return 404, b"not found\n", {}
        if self.expected is None:
            return 404, b"metrics are off: set IBUTSU_METRICS_BASIC_AUTH\n", {}
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), self.expected.encode()):
            return 401, b"unauthorized\n", {"WWW-Authenticate": 'Basic realm="ibutsu"'}
        body = await self.loop.run_in_executor(self.pool, self.endpoints.metrics)
        return 200, body, {"Content-Type": CONTENT_TYPE_LATEST}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """The request line and headers; _BadRequest when malformed or too big."""
    try:
        line = await reader.readline()
        words = line.decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            raise _BadRequest(400)
        headers: dict[str, str] = {}
        size = len(line)
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            size += len(line)
            if size > MAX_HEAD_BYTES or len(headers) >= MAX_HEADERS:
                raise _BadRequest(431)
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    except ValueError:  # a line longer than the stream's limit
        raise _BadRequest(431) from None
    return words[0], words[1], headers


def _probe(state: str, check: Check) -> Response:
    try:
        problem = check()
    except Exception as exc:  # a probe must answer, whatever broke
        problem = type(exc).__name__
    if problem is None:
        return 200, b"ok\n", {}
    return 503, f"not {state}: {problem}\n".encode(), {}


def _response(status: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.0 {status} {_REASONS[status]}"]
    fields = {
        "Content-Type": "text/plain; charset=utf-8",
        "Connection": "close",
        **headers,
        "Content-Length": str(len(body)),
    }
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def serve(settings: MetricsSettings, endpoints: Endpoints) -> ProbeServer:
    """Start serving on ``settings.port`` in a daemon thread; returns the server."""
    server = ProbeServer(settings.port, endpoints, settings.basic_auth)
    served = "/metrics, /healthz and /readyz" if settings.basic_auth else "/healthz and /readyz"
    log.info("serving %s on port %d", served, server.server_address[1])
    return server
