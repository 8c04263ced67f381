"""The watch on silent PostgreSQL connections, through a proxy that can go silent, against a
PostgreSQL cluster of the test's own. The watch looks sooner than in production
(PROBE_AFTER_SECONDS), so that the test is short; the rule is the same."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from ibutsu_server.db import watchdog
from ibutsu_server.db.engine import make_engine
from ibutsu_server.settings import DatabaseSettings
from ibutsu_testing.private import PrivatePostgres, private_postgres
from ibutsu_testing.tcp_proxy import TcpProxy, tcp_proxy

PROBE_AFTER = 2.0


@pytest.fixture
def through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, TcpProxy, Engine]]:
    """An engine whose path to the server can go silent, and one that reaches it directly."""
    monkeypatch.setattr(watchdog, "PROBE_AFTER_SECONDS", PROBE_AFTER)
    with private_postgres() as server, tcp_proxy(server.port) as path:
        silent = make_engine(_settings(server, path.port))
        direct = make_engine(_settings(server, server.port))
        yield silent, path, direct
        silent.dispose()
        direct.dispose()


def _settings(server: PrivatePostgres, port: int) -> DatabaseSettings:
    return DatabaseSettings(host="127.0.0.1", port=port, user="postgres", database="ibutsu")


def test_a_long_statement_is_left_alone(through_a_proxy: tuple[Engine, TcpProxy, Engine]) -> None:
    silent, _path, _direct = through_a_proxy
    with silent.connect() as connection:
        row = connection.execute(text("SELECT pg_sleep(:s), 1"), {"s": 3 * PROBE_AFTER}).one()
    assert row[1] == 1


def test_a_copy_that_keeps_sending_is_left_alone(
    through_a_proxy: tuple[Engine, TcpProxy, Engine],
) -> None:
    silent, _path, _direct = through_a_proxy

    class Slow(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            time.sleep(0.3)  # the rows come slowly, but they come
            return super().read(min(size, 8)) if size and size > 0 else super().read()

    rows = "".join(f"{n}\n" for n in range(100))
    with silent.begin() as connection:
        connection.execute(text("CREATE TEMP TABLE numbers (n int)"))
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        started = time.monotonic()
        cursor.copy_expert("COPY numbers FROM STDIN", Slow(rows))
        assert time.monotonic() - started > 2 * PROBE_AFTER
        assert connection.scalar(text("SELECT count(*) FROM numbers")) == 100


def test_a_silent_connection_is_dropped_and_its_server_process_ended(
    through_a_proxy: tuple[Engine, TcpProxy, Engine],
) -> None:
    silent, path, direct = through_a_proxy
    bound = PROBE_AFTER + watchdog.PROBE_CONNECT_TIMEOUT + 2 * watchdog.ROUND_SECONDS
    with silent.connect() as connection:
        pid = connection.scalar(text("SELECT pg_backend_pid()"))
        connection.execute(text("BEGIN; LOCK TABLE pg_class IN ACCESS SHARE MODE"))
        threading.Timer(0.5, path.freeze).start()
        started = time.monotonic()
        with pytest.raises(OperationalError) as caught:
            connection.execute(text("SELECT pg_sleep(1)"))
        waited = time.monotonic() - started
    assert caught.value.connection_invalidated  # as a lost connection: retried by IbutsuTask
    assert waited < bound + 1
    # The server never heard of it (the path is still silent), but the watch ends it once
    # the server answers: it holds nothing for longer.
    path.resume()
    with direct.connect() as connection:
        alive = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        deadline = time.monotonic() + 20
        while connection.scalar(alive, {"pid": pid}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert connection.scalar(alive, {"pid": pid}) == 0
    with silent.connect() as connection:  # and the path works again
        assert connection.scalar(text("SELECT 1")) == 1
