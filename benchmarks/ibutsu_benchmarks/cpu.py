"""CPU time of every process a benchmark involves, from /proc, by component: the workers' pool
children, the workers' main processes, the PostgreSQL backends of the benchmark's database and
the benchmark's own Redis.

Processes come and go during a measurement (a pool child replaced, a backend connecting): a
sampler thread reads them every SAMPLE_SECONDS and keeps each one's last reading, so a process
that ends between two readings loses at most one interval; a process that was already there
when the measurement started counts only what it used since.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.2
POOL = "pool children"
MAIN = "main process"
POSTGRES = "PostgreSQL"
REDIS = "Redis"
COMPONENTS = (POOL, MAIN, POSTGRES, REDIS)


def process_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of ``pid`` (its threads included, its reaped children
    not), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # Fields 14 and 15 of stat(5): utime and stime; the text after ")" starts at field 3.
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def status_mb(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status (reported in KiB) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1_000_000
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a prefork worker's pool processes)."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in path.read_text().split()]
        except FileNotFoundError:
            continue
    return found


def postgres_backends(engine: Engine) -> Callable[[], list[int]]:
    """A function listing the server processes working for ``engine``'s database (client
    backends and autovacuum), but the connection it asks on."""
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    query = text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )

    def backends() -> list[int]:
        return [int(pid) for pid in connection.scalars(query)]

    backends.close = connection.close  # type: ignore[attr-defined]
    return backends


@dataclass(frozen=True)
class Usage:
    """CPU seconds per component over a measurement, and its wall-clock seconds."""

    seconds: dict[str, float]
    wall: float

    def __add__(self, other: Usage) -> Usage:
        names = dict.fromkeys([*self.seconds, *other.seconds])
        seconds = {n: self.seconds.get(n, 0.0) + other.seconds.get(n, 0.0) for n in names}
        return Usage(seconds, self.wall + other.wall)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def per(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per unit of work, by component (and "total")."""
        each = {name: 1000 * value / count for name, value in self.seconds.items()}
        return {**each, "total": 1000 * self.total / count}

    def busy(self) -> dict[str, float]:
        """Cores each component kept busy on average (CPU seconds over wall seconds)."""
        return {name: value / self.wall for name, value in self.seconds.items()}

    def describe(self, count: int, unit: str) -> str:
        """One line: ms of CPU per ``unit`` for each component, then the total."""
        parts = [f"{name} {value:.2f}" for name, value in self.per(count).items()]
        return f"CPU ms per {unit}: " + ", ".join(parts)


class CpuMeter:
    """Measures the CPU of the named components' processes between start() and stop().

    ``sources`` maps a component to a function listing its processes now."""

    def __init__(self, sources: dict[str, Callable[[], Iterable[int]]]) -> None:
        self.sources = sources
        self.base: dict[int, float] = {}
        self.last: dict[str, dict[int, float]] = {name: {} for name in sources}
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.started_at = 0.0

    def _read(self) -> None:
        for name, source in self.sources.items():
            for pid in source():
                seconds = process_seconds(pid)
                if seconds is not None:
                    self.last[name][pid] = seconds

    def start(self) -> None:
        self._read()
        self.base = {
            pid: value for readings in self.last.values() for pid, value in readings.items()
        }
        self.started_at = time.perf_counter()
        self.stopped.clear()
        self.thread = threading.Thread(target=self._loop, name="cpu-meter", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            self._read()

    def stop(self) -> Usage:
        wall = time.perf_counter() - self.started_at
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        self._read()
        seconds = {
            name: sum(value - self.base.get(pid, 0.0) for pid, value in readings.items())
            for name, readings in self.last.items()
        }
        self.last = {name: {} for name in self.sources}
        return Usage(seconds, wall)


def worker_sources(
    worker_pids: Sequence[int], backends: Callable[[], list[int]], redis_pid: int | None
) -> dict[str, Callable[[], Iterable[int]]]:
    """The four components of a deployment: workers (main processes and pool children), the
    database's backends, and Redis when it is the benchmark's own."""
    sources: dict[str, Callable[[], Iterable[int]]] = {
        POOL: lambda: [child for pid in worker_pids for child in children(pid)],
        MAIN: lambda: list(worker_pids),
        POSTGRES: backends,
    }
    if redis_pid is not None:
        sources[REDIS] = lambda: [redis_pid]
    return sources


def thread_and_backend_seconds(dbapi_connection: Any) -> Callable[[], float]:
    """A clock of the CPU this thread and ``dbapi_connection``'s server backend have used:
    for work the benchmark does itself, on one connection (a baseline's COPY)."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = int(cursor.fetchone()[0])
    dbapi_connection.commit()

    def clock() -> float:
        return time.thread_time() + (process_seconds(pid) or 0.0)

    return clock
