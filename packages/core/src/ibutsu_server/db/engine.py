"""Engines: how every role connects to its database. The ORM's side, sessions, is in
ibutsu_server.db.sessions: the scheduler makes an engine (for readiness) and never a session,
so it never imports the ORM."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy import exc as sa_exc

from ibutsu_server.db import watchdog
from ibutsu_server.settings import DatabaseSettings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# Recycle connections before common server and proxy idle timeouts drop them.
POOL_RECYCLE_SECONDS = 1800
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# A connection back in the pool for longer than this is pinged before it is handed out; one
# used more recently is not: under load every task would pay a round trip for nothing. Should
# the server have gone in that last second, the first statement fails as a lost connection,
# which IbutsuTask retries on a new one.
PING_AFTER_IDLE_SECONDS = 1.0
_IDLE_SINCE = "ibutsu_idle_since"
_HOLDS_SESSION_LOCKS = "ibutsu_holds_session_locks"


def database_url(settings: DatabaseSettings) -> URL:
    """The SQLAlchemy URL for ``settings``; URL.create escapes the password correctly."""
    if settings.sqlite_path is not None:
        return URL.create("sqlite", database=str(settings.sqlite_path))
    return URL.create(
        "postgresql+psycopg2",
        username=settings.user,
        password=settings.password or None,
        host=settings.host,
        port=settings.port,
        database=settings.database,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys (and so ON DELETE rules) unless asked, per connection.
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets the command line read while a worker writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def make_engine(settings: DatabaseSettings, **kwargs: Any) -> Engine:
    """An engine with health checks on checkout, connection recycling, keepalives and the
    watch on silent connections (ibutsu_server.db.watchdog)."""
    url = database_url(settings)
    if settings.sqlite_path is not None:
        settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(
        url,
        pool_recycle=POOL_RECYCLE_SECONDS,
        connect_args={**watchdog.connect_args(), "application_name": "ibutsu-tasks"},
        **kwargs,
    )
    event.listen(engine, "connect", _mark_idle)
    event.listen(engine, "checkin", _mark_idle)
    event.listen(engine, "checkin", _release_advisory_locks)
    event.listen(engine, "checkout", _ping_if_idle(engine))
    # The pool logs under its class's own logger name; a filter does not reach down to it.
    logging.getLogger(f"sqlalchemy.pool.impl.{type(engine.pool).__name__}").addFilter(_QUIET_RESET)
    return engine


def _mark_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _ping_if_idle(engine: Engine) -> Callable[[Any, Any, Any], None]:
    """A checkout hook: SQLAlchemy's pre-ping, for connections idle over
    PING_AFTER_IDLE_SECONDS only. A dead one is replaced (the pool retries the checkout)."""

    def ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise sa_exc.DisconnectionError(str(exc)) from exc

    return ping


class _QuietDeadConnectionReset(logging.Filter):
    """The pool logs a traceback when it cannot roll back a connection the server has already
    dropped (a restart, a failover): one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Exception during reset") and record.exc_info:
            error = record.exc_info[1]
            record.msg = "a connection the database dropped was discarded (%s)"
            record.args = (str(error).strip().splitlines()[0] if error else "",)
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_QUIET_RESET = _QuietDeadConnectionReset()


def will_take_session_locks(session: Session) -> None:
    """Say that the session's connection is about to take session-level advisory locks: it
    releases them all when it goes back to the pool, whatever happened in between."""
    session.connection().info[_HOLDS_SESSION_LOCKS] = True


def _release_advisory_locks(dbapi_connection: Any, record: Any) -> None:
    """A connection goes back to the pool holding no session-level advisory lock, so a lock
    that an interrupted task held can never outlive the task. Only connections that said they
    would take one pay the round trip."""
    if not record.info.pop(_HOLDS_SESSION_LOCKS, False):
        return
    if dbapi_connection is None:  # invalidated: the server dropped its locks with it
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock_all()")
        dbapi_connection.commit()
    except Exception:  # a broken connection holds no lock; the pool discards it
        return
