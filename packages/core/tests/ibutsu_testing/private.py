"""Services of a test's own: for the tests that break them, a Redis with append-only
persistence and a PostgreSQL cluster (initdb/pg_ctl), on free ports, stopped and removed
afterwards; and the PostgreSQL server and Redis every other test of a process shares
(``session_postgres``, ``session_redis``: see ``ibutsu_testing.services``). The machine's
shared services are never touched."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from ibutsu_testing.services import DIE_WITH_PARENT, free_port, wait_for

# PostgreSQL refuses to run as root; the machine's postgres user runs the private cluster.
PG_OS_USER = "postgres"
# Debian puts only PostgreSQL's client programs on PATH; the server's are in a folder per
# major version.
PG_LIB = Path("/usr/lib/postgresql")


def pg_program(name: str) -> str:
    """The path of a PostgreSQL server program (``initdb``, ``pg_ctl``, ``postgres``): on PATH,
    else in the newest ``/usr/lib/postgresql/<major>/bin``."""
    if found := shutil.which(name):
        return found
    versions = [path for path in PG_LIB.glob(f"*/bin/{name}") if path.parts[-3].isdigit()]
    if not versions:
        raise RuntimeError(f"{name} not found: the tests need the Debian package postgresql")
    return str(max(versions, key=lambda path: int(path.parts[-3])))


@dataclass
class PrivateRedis:
    """A redis-server of the test's own, persisting every write (AOF, fsync always), or, not
    ``durable``, persisting nothing (the machine's Redis, for benchmarks that count its CPU)."""

    port: int
    folder: Path
    durable: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                *DIE_WITH_PARENT,
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.folder),
                "--appendonly", "yes" if self.durable else "no",
                "--appendfsync", "always",
                "--save", "",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                log_tail = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited:\n{log_tail}")
            return _pings(client)

        try:
            wait_for(answers, timeout=30, interval=0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Shut down as an operator would (SIGTERM: it writes what it has and exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


@contextmanager
def private_redis(*, durable: bool = True) -> Iterator[PrivateRedis]:
    folder = Path(tempfile.mkdtemp(prefix="ibutsu-redis-"))
    server = PrivateRedis(free_port(), folder, durable)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def init_cluster(folder: Path) -> Path:
    """A new PostgreSQL cluster in ``folder``/data, owned by the postgres OS user: superuser
    ``postgres``, trust authentication, UTF-8; not synced to disk (it is thrown away)."""
    shutil.chown(folder, PG_OS_USER)
    data = folder / "data"
    done = subprocess.run(
        [
            "runuser", "-u", PG_OS_USER, "--", pg_program("initdb"), "-D", str(data),
            "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
    return data


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (trust authentication, database ``ibutsu``)."""

    port: int
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        """The POSTGRESQL_* variables of a role pointed at it."""
        return {
            "POSTGRESQL_HOST": "127.0.0.1",
            "POSTGRESQL_PORT": str(self.port),
            "POSTGRESQL_USER": "postgres",
            "POSTGRESQL_DATABASE": "ibutsu",
        }

    def _ctl(self, *args: str) -> None:
        data = str(self.folder / "data")
        subprocess.run(
            ["runuser", "-u", PG_OS_USER, "--", pg_program("pg_ctl"), "-D", data, *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        self._ctl("-o", options, "-l", str(self.folder / "postgres.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    folder = Path(tempfile.mkdtemp(prefix="ibutsu-pg-"))
    init_cluster(folder)
    server = PrivatePostgres(free_port(), folder)
    server.start()
    try:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "-c",
             "CREATE DATABASE ibutsu"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        yield server
    finally:
        with suppress(subprocess.SubprocessError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# The servers a test process shares: started on first use, stopped when the process exits.
# Nothing in them outlives the process: each one's data is thrown away, hence no fsync, no
# full-page writes and small buffers (cheap to start, as one starts per test file).
SESSION_PG_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
}
# A second port if the first was taken between free_port() and the server's bind.
SESSION_START_ATTEMPTS = 3


@dataclass
class SessionPostgres:
    """A PostgreSQL server that is a child of the test process: ``postgres`` itself, run as
    the postgres OS user with the parent-death signal (not daemonised by pg_ctl), so it dies
    with the process however the process ends."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Immediate shutdown (its data is thrown away), then its folder goes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _accepts_connections(port: int) -> bool:
    engine = create_engine(
        f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres",
        poolclass=NullPool,
        connect_args={"connect_timeout": 2},
    )
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def _started(process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> bool:
    """Whether the server ``process`` became ready within ``timeout``; False as soon as it
    exits."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if ready():
            return True
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"the server was not ready within {timeout:.0f} s")
        time.sleep(0.02)
    return False


def _session_folder(kind: str) -> Path:
    """A new folder for this process's ``kind`` server, named after the process; the folders of
    processes that died without their exit handlers (SIGKILL, a timeout) are removed first."""
    for stale in Path(tempfile.gettempdir()).glob("ibutsu-test-*-*-*"):
        owner = stale.name.split("-")[3]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"ibutsu-test-{kind}-{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _at_exit(stop: Callable[[], None]) -> None:
    """Run ``stop`` when this process exits (not in a child forked from it)."""
    owner = os.getpid()

    def stop_in_owner() -> None:
        if os.getpid() == owner:
            stop()

    atexit.register(stop_in_owner)


def session_postgres() -> SessionPostgres:
    """Start this process's PostgreSQL server (a new cluster on a free port); stopped and
    removed when the process exits."""
    folder = _session_folder("pg")
    data = init_cluster(folder)
    settings = [
        arg for name, value in SESSION_PG_SETTINGS.items() for arg in ("-c", f"{name}={value}")
    ]
    log_path = folder / "postgres.log"
    for _ in range(SESSION_START_ATTEMPTS):
        port = free_port()
        with log_path.open("ab") as log:
            # The parent-death signal is set after the change of user (setpriv does it last),
            # so it survives; it is sent when the thread that started the server ends, which
            # is the main thread for every test that reaches services.
            process = subprocess.Popen(
                [
                    "setpriv", f"--reuid={PG_OS_USER}", f"--regid={PG_OS_USER}", "--init-groups",
                    "--pdeathsig", "KILL", "--",
                    pg_program("postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                    *settings,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        if _started(process, functools.partial(_accepts_connections, port), timeout=60):
            server = SessionPostgres(port, folder, process)
            _at_exit(server.stop)
            return server
    log_tail = log_path.read_text(errors="replace")[-2000:]
    shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"the tests' PostgreSQL server did not start:\n{log_tail}")


def session_redis() -> PrivateRedis:
    """Start this process's redis-server (no persistence, a free port); stopped and removed
    when the process exits."""
    folder = _session_folder("redis")
    server = PrivateRedis(free_port(), folder, durable=False)
    for attempt in range(SESSION_START_ATTEMPTS):
        try:
            server.start()
            break
        except RuntimeError:  # exited: the port was taken meanwhile
            if attempt + 1 == SESSION_START_ATTEMPTS:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            server.port = free_port()

    def stop() -> None:
        with suppress(subprocess.SubprocessError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)

    _at_exit(stop)
    return server
