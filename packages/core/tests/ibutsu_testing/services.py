"""Throwaway databases and Redis namespaces, and real workers.

The services: each test process has a PostgreSQL server and a redis-server of its own
(``ibutsu_testing.private.session_postgres``/``session_redis``), started on first use and gone
when the process exits, so tests neither need the machine's services nor disturb them.
``IBUTSU_TEST_PG_HOST``, ``IBUTSU_TEST_PG_PORT``, ``IBUTSU_TEST_PG_USER`` (any of them) and
``IBUTSU_TEST_REDIS_URL`` point the tests at existing services instead (then none is started):
``IBUTSU_TEST_PG_HOST=127.0.0.1 IBUTSU_TEST_REDIS_URL=redis://127.0.0.1:6379/0`` for the
machine's. ``PG_HOST``, ``PG_PORT``, ``PG_USER`` and ``REDIS_URL`` are resolved on first use
(module ``__getattr__``), which starts the server they name.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
from sqlalchemy import create_engine, text

from ibutsu_server.settings import Role, Settings, load_settings

PG_VARS = ("IBUTSU_TEST_PG_HOST", "IBUTSU_TEST_PG_PORT", "IBUTSU_TEST_PG_USER")
REDIS_VAR = "IBUTSU_TEST_REDIS_URL"
# Prefixed to a server's or worker's command: it gets SIGKILL when the test process dies,
# however it dies (a timeout's kill included), so none outlives its test run (util-linux).
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")

T = TypeVar("T")


@dataclass(frozen=True)
class PostgresServer:
    """Where the tests' PostgreSQL listens and whom they connect as (trust authentication)."""

    host: str
    port: str
    user: str


@dataclass
class _Resolved:
    """The services this process's tests use, once the first test asked for them."""

    postgres: PostgresServer | None = None
    redis_url: str | None = None


_lock = threading.Lock()  # two threads asking first start one server, not two
_resolved = _Resolved()


def postgres_server() -> PostgresServer:
    """The tests' PostgreSQL: the one IBUTSU_TEST_PG_* name, else this process's own
    (started now if it is not yet)."""
    with _lock:
        if _resolved.postgres is None:
            if any(name in os.environ for name in PG_VARS):
                _resolved.postgres = PostgresServer(
                    os.environ.get("IBUTSU_TEST_PG_HOST", "127.0.0.1"),
                    os.environ.get("IBUTSU_TEST_PG_PORT", "5432"),
                    os.environ.get("IBUTSU_TEST_PG_USER", "postgres"),
                )
            else:
                from ibutsu_testing import private  # it imports this module

                port = str(private.session_postgres().port)
                _resolved.postgres = PostgresServer("127.0.0.1", port, "postgres")
                # A Python process started from this one (with this environment) that uses
                # these helpers shares the server instead of starting one.
                os.environ.update(zip(PG_VARS, ("127.0.0.1", port, "postgres"), strict=True))
        return _resolved.postgres


def redis_url() -> str:
    """The tests' Redis: IBUTSU_TEST_REDIS_URL, else this process's own (started now if it is
    not yet)."""
    with _lock:
        if _resolved.redis_url is None:
            if REDIS_VAR in os.environ:
                _resolved.redis_url = os.environ[REDIS_VAR]
            else:
                from ibutsu_testing import private  # it imports this module

                _resolved.redis_url = private.session_redis().url
                os.environ[REDIS_VAR] = _resolved.redis_url
        return _resolved.redis_url


def __getattr__(name: str) -> str:
    """``PG_HOST``, ``PG_PORT``, ``PG_USER``, ``REDIS_URL``: resolved when first imported or
    read, so a test file that never names them starts no server."""
    if name in ("PG_HOST", "PG_PORT", "PG_USER"):
        return str(getattr(postgres_server(), name[3:].lower()))
    if name == "REDIS_URL":
        return redis_url()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of this test's own; dropped afterwards."""
    name = f"ibutsu_test_{uuid.uuid4().hex[:12]}"
    server = postgres_server()
    admin = create_engine(
        f"postgresql+psycopg2://{server.user}@{server.host}:{server.port}/postgres",
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def psql(database: str, *args: str) -> str:
    """Run ``psql`` on ``database`` with ``args``, stopping at the first error; its output."""
    server = postgres_server()
    done = subprocess.run(
        [
            "psql",
            "-h",
            server.host,
            "-p",
            server.port,
            "-U",
            server.user,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def service_env(database: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a worker pointed at the tests' services, in its own namespaces."""
    server, url = postgres_server(), redis_url()
    return {
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "IBUTSU_REDIS_KEY_PREFIX": key_prefix,
        "POSTGRESQL_HOST": server.host,
        "POSTGRESQL_PORT": server.port,
        "POSTGRESQL_USER": server.user,
        "POSTGRESQL_DATABASE": database,
        **extra,
    }


def settings_for(env: Mapping[str, str], role: Role = Role.WORKER) -> Settings:
    """Settings parsed from ``env`` alone, as the process started with it would parse them."""
    return load_settings(role, environ=env)


def clear_redis_prefix(prefix: str) -> None:
    """Delete every key of one test's Redis namespace."""
    client = redis.Redis.from_url(redis_url())
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def clean_environ(**extra: str) -> dict[str, str]:
    """os.environ without any Ibutsu, Celery or PostgreSQL variable, plus ``extra``."""
    prefixes = ("CELERY_", "POSTGRESQL_", "IBUTSU_", "FLOWER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.update(extra)
    return env


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in a fresh interpreter (what a role's process would import), with
    only ``env`` of Ibutsu's, Celery's and PostgreSQL's variables."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=clean_environ(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_for(predicate: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def http_get(port: int, path: str, credentials: str | None = None) -> tuple[int, str]:
    """GET ``path`` on 127.0.0.1:``port``, with basic auth when ``credentials`` are given:
    (status, body), or (0, "") while nothing listens yet."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except urllib.error.URLError:
        return 0, ""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def celery_process(
    app: str,
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    ready: Callable[[], bool] | None = None,
    ready_timeout: float = 60.0,
    exit_ok: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery -A app <command>`` process (worker, beat, flower) in a process group of
    its own, so a test can kill it and its children at once; its output goes to ``log_path``.

    Yields once ``ready()`` is true; if the process exits first, that fails the test, unless
    ``exit_ok`` (then it yields at once). Stops the process afterwards, gracefully if it can."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, sys.executable, "-m", "celery", "-A", app, *command],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=clean_environ(**env),
            start_new_session=True,
        )
    try:

        def started() -> bool:
            if process.poll() is not None:
                if exit_ok:
                    return True
                raise AssertionError(
                    f"celery {command[0]} exited:\n" + log_path.read_text(errors="replace")
                )
            return ready is None or ready()

        wait_for(started, timeout=ready_timeout)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def running_worker(
    app: str, env: Mapping[str, str], log_path: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery worker`` (prefork pool) for ``app``, ready once it has logged 'ready.'."""
    command = [
        "worker",
        "--loglevel=INFO",
        "--without-mingle",
        "--without-gossip",
        f"--hostname=test-{uuid.uuid4().hex[:8]}@%h",
        *args,
    ]
    with celery_process(
        app, command, env, log_path, ready=lambda: "ready." in log_path.read_text(errors="replace")
    ) as process:
        yield process
