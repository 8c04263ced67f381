"""The engine's connection pool on the real PostgreSQL: a connection the server dropped while
it sat in the pool is replaced before anyone gets it, and one used a moment ago is handed out
without a ping (a round trip per task for nothing)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from ibutsu_server.db import engine as engine_module
from ibutsu_server.db.engine import make_engine
from ibutsu_server.settings import DatabaseSettings
from ibutsu_testing.services import PG_HOST, PG_PORT, PG_USER, postgres_database


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, list[Any]]]:
    """An engine as the workers make it, and the connections it pinged."""
    with postgres_database() as name:
        made = make_engine(
            DatabaseSettings(host=PG_HOST, port=int(PG_PORT), user=PG_USER, database=name)
        )
        pinged: list[Any] = []
        ping = made.dialect.do_ping

        def counting(dbapi_connection: Any) -> bool:
            pinged.append(dbapi_connection)
            return bool(ping(dbapi_connection))

        monkeypatch.setattr(made.dialect, "do_ping", counting)
        yield made, pinged
        made.dispose()


def _backend(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)


def test_a_connection_used_a_moment_ago_is_not_pinged(
    engine: tuple[Engine, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    made, pinged = engine
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 3600.0)
    first = _backend(made)
    assert _backend(made) == first  # the same pooled connection
    assert pinged == []


def test_an_idle_connection_the_server_dropped_is_replaced(
    engine: tuple[Engine, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    made, pinged = engine
    dropped = _backend(made)
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 0.0)  # idle long enough
    other = create_engine(made.url, isolation_level="AUTOCOMMIT")
    try:
        with other.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dropped})
    finally:
        other.dispose()
    replacement = _backend(made)  # no error: the dead connection was found and replaced
    assert replacement not in (0, dropped)
    assert len(pinged) >= 1
