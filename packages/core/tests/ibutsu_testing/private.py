"""Services of a test's own, for the tests that break them: a Redis with append-only
persistence and a PostgreSQL cluster (initdb/pg_ctl), on free ports, stopped and removed
afterwards. The machine's shared services are never touched."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis

from ibutsu_testing.services import DIE_WITH_PARENT, free_port, wait_for

# PostgreSQL refuses to run as root; the machine's postgres user runs the private cluster.
PG_OS_USER = "postgres"


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
        wait_for(lambda: _pings(client), timeout=30, interval=0.05)
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
        subprocess.run(
            ["runuser", "-u", PG_OS_USER, "--", "pg_ctl", "-D", str(self.folder / "data"), *args],
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
    shutil.chown(folder, PG_OS_USER)
    subprocess.run(
        [
            "runuser", "-u", PG_OS_USER, "--", "initdb", "-D", str(folder / "data"),
            "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
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
