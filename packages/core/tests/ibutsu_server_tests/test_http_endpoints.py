"""The metrics and probe endpoint under abuse: a bounded number of threads, an absolute
deadline per request, liveness answered however many slow clients are connected, and
readiness computed at most once per interval."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import pytest

from ibutsu_server import http_endpoints
from ibutsu_server.http_endpoints import MAX_OPEN, WORKERS, Endpoints, serve
from ibutsu_server.settings import MetricsSettings
from ibutsu_testing.services import free_port, http_get, wait_for

CREDENTIALS = "prometheus:scrape-password-1"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, list[float]]]:
    """A served endpoint on a free port with a one-second request deadline; yields the port
    and when readiness was really computed (``time.monotonic()``)."""
    monkeypatch.setattr(http_endpoints, "REQUEST_SECONDS", 1.0)
    computed: list[float] = []

    def ready() -> str | None:
        computed.append(time.monotonic())
        return None

    port = free_port()
    endpoints = Endpoints(metrics=lambda: b"m 1\n", alive=lambda: None, ready=ready)
    running = serve(MetricsSettings(port=port, basic_auth=CREDENTIALS), endpoints)
    yield port, computed
    running.shutdown()
    running.server_close()


def _idle_clients(port: int, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        clients.append(client)
    return clients


def test_slow_clients_hold_a_bounded_number_of_threads_for_a_bounded_time(
    server: tuple[int, list[float]],
) -> None:
    port, _ = server
    before = threading.active_count()
    clients = _idle_clients(port, 128)
    try:
        # The loop's thread and the workers', however many clients wait.
        assert threading.active_count() <= before + 1 + WORKERS
        # Each slow client is dropped at its deadline, and the port answers again.
        for client in clients:
            client.settimeout(10)
            assert client.recv(1024) == b""
        wait_for(lambda: http_get(port, "/healthz")[0] == 200, timeout=10)
    finally:
        for client in clients:
            client.close()


def test_a_client_that_trickles_bytes_is_cut_at_the_deadline(
    server: tuple[int, list[float]],
) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(10)
        closed = threading.Event()

        def trickle() -> None:
            try:
                for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                    client.sendall(bytes([byte]))
                    if closed.wait(0.05):
                        return
            except OSError:
                return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            assert client.recv(1024) == b""  # closed by the server, long before 1000 bytes
        finally:
            closed.set()
            sender.join(timeout=5)


def test_readiness_is_computed_once_for_a_crowd(server: tuple[int, list[float]]) -> None:
    port, computed = server
    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(lambda _: http_get(port, "/readyz")[0], range(200)))
    assert statuses == [200] * 200
    # However slowly the crowd is served: never two computations within the cache's window.
    assert 1 <= len(computed) < 200
    gaps = [later - earlier for earlier, later in pairwise(computed)]
    assert all(gap >= http_endpoints.READY_CACHE_SECONDS for gap in gaps), gaps


def test_metrics_need_the_credentials(server: tuple[int, list[float]]) -> None:
    port, _ = server
    assert http_get(port, "/metrics")[0] == 401
    assert http_get(port, "/metrics", CREDENTIALS) == (200, "m 1\n")
    assert http_get(port, "/nothing")[0] == 404


def test_without_credentials_only_the_probes_are_served() -> None:
    port = free_port()
    stalled = Endpoints(metrics=lambda: b"m 1\n", alive=lambda: "stalled", ready=lambda: None)
    running = serve(MetricsSettings(port=port, basic_auth=None), stalled)
    try:
        assert http_get(port, "/metrics")[0] == 404
        assert http_get(port, "/metrics", CREDENTIALS)[0] == 404
        assert http_get(port, "/readyz") == (200, "ok\n")
        assert http_get(port, "/healthz")[0] == 503
    finally:
        running.shutdown()
        running.server_close()


def _trickle(port: int, stop: threading.Event, closed_after: list[float]) -> None:
    """Connect, send a request a byte at a time until told to stop or cut off; record when
    the server closed the connection, in seconds from connecting."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(0.05)
        request = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        for byte in request:
            try:
                client.sendall(bytes([byte]))
                if client.recv(1) == b"":
                    break
            except TimeoutError:
                pass  # nothing to read yet: still open
            except OSError:
                break
            if stop.is_set():
                return
        closed_after.append(time.monotonic() - started)


def test_liveness_answers_while_a_hundred_clients_trickle(
    server: tuple[int, list[float]],
) -> None:
    port, _ = server
    stop = threading.Event()
    closed_after: list[float] = []
    senders = [
        threading.Thread(target=_trickle, args=(port, stop, closed_after), daemon=True)
        for _ in range(100)
    ]
    for sender in senders:
        sender.start()
    try:
        for _ in range(20):
            assert http_get(port, "/healthz") == (200, "ok\n")
        # Each is cut at its deadline (one second here), however it trickles.
        wait_for(lambda: len(closed_after) == 100, timeout=30)
        assert max(closed_after) < http_endpoints.REQUEST_SECONDS + 1.5
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=5)


def test_the_longest_waiting_client_makes_room_for_a_new_one(
    monkeypatch: pytest.MonkeyPatch, server: tuple[int, list[float]]
) -> None:
    port, _ = server
    monkeypatch.setattr(http_endpoints, "REQUEST_SECONDS", 30.0)
    clients = _idle_clients(port, MAX_OPEN)
    try:
        oldest = clients[0]
        oldest.settimeout(10)
        # Every slot is held: a probe still gets its answer, and the oldest waiter goes.
        assert http_get(port, "/healthz") == (200, "ok\n")
        assert oldest.recv(1024) == b""
    finally:
        for client in clients:
            client.close()
