"""A watch on PostgreSQL connections that went silent: the path to the server dropped without
a FIN or RST (a middlebox forgot the connection, a network partitioned, a proxy froze), so a
statement waits for a reply that will never come, holding its task, for ever.

The kernel notices some of these: libpq's keepalives (KEEPALIVE_*) probe an idle connection
and ``tcp_user_timeout`` fails a write nobody acknowledges. Not a path that still acknowledges
but no longer delivers (a frozen proxy, a half-open middlebox), and not a statement that waits
for its reply while the kernel sees nothing wrong. A time limit on statements cannot tell
those from a long aggregate or a lock wait, which are legitimate. So the watch asks the server:
a statement that has made no progress for PROBE_AFTER_SECONDS (no reply, no COPY data read) is
looked up in ``pg_stat_activity`` over a new connection (PROBE_CONNECT_TIMEOUT): if the server
is waiting for *us* (``ClientRead``: our statement never arrived, or COPY data stopped coming;
``ClientWrite``: its reply does not leave), if its backend is gone, or if the server cannot be
reached at all, the connection is dead, and its socket is shut down. The waiting call then
fails as on a lost connection (SQLAlchemy invalidates it, the task is retried). A statement the
server is still working on is left alone, however long it takes.

So a silent database is noticed within SILENCE_NOTICED_WITHIN: PROBE_AFTER_SECONDS +
PROBE_CONNECT_TIMEOUT + the watch's rounds (22 s). The backend a dead connection leaves behind
on the server (whose keepalives may take hours to notice) is terminated as soon as the server
can be reached, so it holds no lock for longer: a retried import does not wait on its ghost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

import psycopg2
import psycopg2.extensions

log = logging.getLogger(__name__)

KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000
CONNECT_TIMEOUT = 10
PROBE_AFTER_SECONDS = 15.0
PROBE_CONNECT_TIMEOUT = 5
ROUND_SECONDS = 1.0
# A backend left behind that the server cannot be asked about for this long is left to it.
GHOST_GIVE_UP_SECONDS = 3600.0
SILENCE_NOTICED_WITHIN = PROBE_AFTER_SECONDS + PROBE_CONNECT_TIMEOUT + 2 * ROUND_SECONDS
# What the server waits for when the connection, not the work, is stuck.
WAITING_FOR_US = ("ClientRead", "ClientWrite")


def connect_args() -> dict[str, Any]:
    """libpq and psycopg2 arguments for every connection: keepalives, a bound on unacknowledged
    writes and on connecting, and the watched connection class."""
    return {
        "connect_timeout": CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        "connection_factory": WatchedConnection,
    }


class WatchedConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection whose round trips the watch can see."""

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.cursor_factory = WatchedCursor
        self.waiting_since: float | None = None
        # Read now, from this thread: the watch never calls into the connection.
        self.watched_dsn = dsn
        self.watched_fd = self.fileno()
        self.watched_pid = self.info.backend_pid
        WATCH.add(self)

    def commit(self) -> None:
        with waiting(self):
            super().commit()

    def rollback(self) -> None:
        with waiting(self):
            super().rollback()


@contextlib.contextmanager
def waiting(connection: WatchedConnection) -> Any:
    """Mark ``connection`` as waiting on the server for the block's duration."""
    connection.waiting_since = time.monotonic()
    try:
        yield
    finally:
        connection.waiting_since = None


class _Progress:
    """A COPY's data source that tells the watch the COPY moves each time it is read."""

    def __init__(self, source: Any, connection: WatchedConnection) -> None:
        self._source = source
        self._connection = connection

    def read(self, *args: Any) -> Any:
        self._connection.waiting_since = time.monotonic()
        return self._source.read(*args)

    def readline(self, *args: Any) -> Any:
        self._connection.waiting_since = time.monotonic()
        return self._source.readline(*args)


class WatchedCursor(psycopg2.extensions.cursor):  # type: ignore[misc]
    """A cursor whose every call that waits on the server is marked on its connection."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        with waiting(self.connection):
            return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        with waiting(self.connection):
            return super().executemany(*args, **kwargs)

    def callproc(self, *args: Any, **kwargs: Any) -> Any:
        with waiting(self.connection):
            return super().callproc(*args, **kwargs)

    def copy_expert(self, sql: Any, file: Any, *args: Any, **kwargs: Any) -> Any:
        with waiting(self.connection):
            return super().copy_expert(sql, _Progress(file, self.connection), *args, **kwargs)

    # A named (server-side) cursor fetches over the connection.
    def fetchone(self) -> Any:
        with waiting(self.connection):
            return super().fetchone()

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        with waiting(self.connection):
            return super().fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        with waiting(self.connection):
            return super().fetchall()


class _Watch:
    """The connections of this process and the thread that watches them (one per process:
    a forked pool child starts its own)."""

    def __init__(self) -> None:
        self._connections: weakref.WeakSet[WatchedConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0
        # Backends of connections declared dead, to terminate: (pid, when, dsn), ``when`` on
        # the monotonic clock (the server's clock may differ from ours).
        self._ghosts: list[tuple[int, float, str]] = []

    def add(self, connection: WatchedConnection) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a new process: what the parent watched is not ours
                self._pid = os.getpid()
                self._connections = weakref.WeakSet()
                self._ghosts = []
                threading.Thread(target=self._run, name="ibutsu-db-watch", daemon=True).start()
            self._connections.add(connection)

    def _run(self) -> None:
        while True:
            time.sleep(ROUND_SECONDS)
            try:
                self.round()
            except Exception as exc:  # the watch must outlive anything it meets
                log.warning("database watch: %s", type(exc).__name__)

    def round(self, now: float | None = None) -> None:
        """Look at every connection once (see the module's doc)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            suspects = [
                c
                for c in self._connections
                if not c.closed
                and c.waiting_since is not None
                and now - c.waiting_since >= PROBE_AFTER_SECONDS
            ]
        by_server: dict[str, list[WatchedConnection]] = {}
        for connection in suspects:
            by_server.setdefault(connection.watched_dsn, []).append(connection)
        for group in by_server.values():
            self._judge(group, now)
        if self._ghosts:
            self._terminate_ghosts()

    def _judge(self, suspects: list[WatchedConnection], now: float) -> None:
        states = _server_states(suspects[0].watched_dsn, [c.watched_pid for c in suspects])
        for connection in suspects:
            since = connection.waiting_since
            if since is None or now - since < PROBE_AFTER_SECONDS:
                continue  # it moved on while we asked
            if states is None:
                why = "the server cannot be reached"
            elif connection.watched_pid not in states:
                why = "its server process is gone"
            elif states[connection.watched_pid] in WAITING_FOR_US:
                why = f"the server is waiting for it ({states[connection.watched_pid]})"
            else:
                continue  # the server is working on it: a long statement, a lock wait
            if connection.closed:
                continue  # closed meanwhile: its descriptor may be another socket's now
            log.warning(
                "database connection silent for %.0f s (%s): dropped, the work is retried",
                now - since,
                why,
            )
            _shut_down(connection.watched_fd)
            with self._lock:
                self._ghosts.append((connection.watched_pid, now, connection.watched_dsn))

    def _terminate_ghosts(self) -> None:
        with self._lock:
            ghosts, self._ghosts = self._ghosts, []
        pending = []
        for pid, declared, dsn in ghosts:
            ago = time.monotonic() - declared
            try:
                with contextlib.closing(_probe(dsn)) as probe, probe.cursor() as cursor:
                    # Only the backend we left, still waiting for us as we left it: a process
                    # that reuses its pid changed state after that.
                    cursor.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s"
                        " AND wait_event IN ('ClientRead', 'ClientWrite')"
                        " AND state_change < now() - make_interval(secs => %s)",
                        (pid, ago),
                    )
            except psycopg2.Error:
                if ago < GHOST_GIVE_UP_SECONDS:
                    pending.append((pid, declared, dsn))
        with self._lock:
            self._ghosts.extend(pending)


WATCH = _Watch()


def _probe(dsn: str) -> Any:
    return psycopg2.connect(
        dsn,
        connect_timeout=PROBE_CONNECT_TIMEOUT,
        application_name="ibutsu-tasks-watch",
        options=f"-c statement_timeout={PROBE_CONNECT_TIMEOUT * 1000}",
    )


def _server_states(dsn: str, pids: list[int]) -> dict[int, str] | None:
    """What the server says each backend waits on ('' for nothing), by pid; None when the
    server cannot be reached, or answers nothing, within PROBE_CONNECT_TIMEOUT."""
    try:
        with contextlib.closing(_probe(dsn)) as probe, probe.cursor() as cursor:
            cursor.execute(
                "SELECT pid, coalesce(wait_event, '') FROM pg_stat_activity WHERE pid = ANY(%s)",
                (pids,),
            )
            return {int(pid): str(event) for pid, event in cursor.fetchall()}
    except psycopg2.OperationalError as exc:
        if exc.pgcode or "FATAL" in str(exc):
            # The server answered (too many connections, a slow catalogue): no judgement.
            return {pid: "" for pid in pids}
        return None


def _shut_down(fd: int) -> None:
    """Shut the connection's socket down under libpq: its wait ends with an error."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
