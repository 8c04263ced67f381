"""Throwaway databases and Redis namespaces on the machine's real services, and real workers."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import redis
from sqlalchemy import create_engine, text

from ibutsu_server.settings import Role, Settings, load_settings

PG_HOST = os.environ.get("IBUTSU_TEST_PG_HOST", "127.0.0.1")
PG_PORT = os.environ.get("IBUTSU_TEST_PG_PORT", "5432")
PG_USER = os.environ.get("IBUTSU_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("IBUTSU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Prefixed to a server's or worker's command: it gets SIGKILL when the test process dies,
# however it dies (a timeout's kill included), so none outlives its test run (util-linux).
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")

T = TypeVar("T")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of this test's own; dropped afterwards."""
    name = f"ibutsu_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres",
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
    done = subprocess.run(
        [
            "psql",
            "-h",
            PG_HOST,
            "-p",
            PG_PORT,
            "-U",
            PG_USER,
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
    """The environment of a worker pointed at the real services, in its own namespaces."""
    return {
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_RESULT_BACKEND": REDIS_URL,
        "IBUTSU_REDIS_KEY_PREFIX": key_prefix,
        "POSTGRESQL_HOST": PG_HOST,
        "POSTGRESQL_PORT": PG_PORT,
        "POSTGRESQL_USER": PG_USER,
        "POSTGRESQL_DATABASE": database,
        **extra,
    }


def settings_for(env: Mapping[str, str], role: Role = Role.WORKER) -> Settings:
    """Settings parsed from ``env`` alone, as the process started with it would parse them."""
    return load_settings(role, environ=env)


def clear_redis_prefix(prefix: str) -> None:
    """Delete every key of one test's Redis namespace."""
    client = redis.Redis.from_url(REDIS_URL)
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
