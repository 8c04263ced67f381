"""Many small imports queued at once to one worker (concurrency 2), on a Redis of the
benchmark's own: the CPU each import costs every process involved (pool children, the worker's
main process, the database's backends, Redis), against a floor measured in the same run: a bare
Celery task through the same broker and worker, plus a COPY of the same rows. Imports per
second, counts checked exactly, and Redis memory before and after."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, func, select

from ibutsu_benchmarks import cpu
from ibutsu_benchmarks.common import Figure, Sizes, Target, fresh_services, say
from ibutsu_benchmarks.data import cases, copy_text, new_runs, write_junit
from ibutsu_benchmarks.workers import NOOP, own_redis, running_workers
from ibutsu_server.db.models import Result, Run, utcnow
from ibutsu_worker.importing.rows import ARTIFACT_COLUMNS, RESULT_COLUMNS
from ibutsu_worker.submission import Submitter

NAME = "load"
CASES_PER_REPORT = 100
SEED = 3
# Where the API (and Submitter) sends imports: Celery's default queue.
IMPORT_QUEUE = "celery"
FLOOR_QUEUE = "ibutsu-bench"
CPU_TARGET = 2.0


@dataclass(frozen=True)
class Load:
    """What draining the imports cost, and its floor, in ms of CPU per import by component."""

    imports: int
    rate: float
    per_import: dict[str, float]
    task_floor: dict[str, float]  # a bare Celery task
    copy_floor: float  # COPY of the report's rows, client and server

    @property
    def floor(self) -> float:
        return self.task_floor["total"] + self.copy_floor

    def breakdown(self) -> list[str]:
        """Where the CPU of an import goes, component by component, against the floor's."""
        copy_note = f"COPY {self.copy_floor:.2f} (client and server)"
        lines = [
            f"{name}: {self.per_import.get(name, 0.0):.2f} ms per import; bare task "
            f"{self.task_floor.get(name, 0.0):.2f}"
            for name in cpu.COMPONENTS
        ]
        return [*lines, f"floor: bare task {self.task_floor['total']:.2f} + {copy_note}"]


def _used_memory(url: str) -> float:
    client = redis.Redis.from_url(url)
    used = int(client.info("memory")["used_memory"]) / 1e6
    client.close()
    return used


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """Queue ``sizes.load_imports`` imports, then time one worker draining them."""
    count = sizes.load_imports
    report = folder / "small.xml"
    start = utcnow().replace(microsecond=0)
    write_junit(report, cases(CASES_PER_REPORT, SEED, start))
    with own_redis() as (url, redis_pid), fresh_services(NAME, url) as services:
        submitter = Submitter(services.settings)
        try:
            memory_before = _used_memory(url)
            queued = queue_imports(submitter, report, count)
            memory_queued = _used_memory(url)
            with running_workers(services, redis_pid, folder) as workers:
                for _ in range(sizes.load_floor_tasks):
                    workers.producer.send_task(NOOP, queue=FLOOR_QUEUE)
                _, task_usage = workers.drain(FLOOR_QUEUE)
                drained, usage = workers.drain(IMPORT_QUEUE)
            _check_counts(services.engine, count)
            memory_after = _used_memory(url)
            copy_floor = _copy_floor(services.engine, sizes.load_floor_copies, start)
        finally:
            submitter.celery.close()
            submitter.close()
    load = Load(
        imports=count,
        rate=count / drained,
        per_import=usage.per(count),
        task_floor=task_usage.per(sizes.load_floor_tasks),
        copy_floor=copy_floor,
    )
    say(
        f"{NAME}: {count:,} imports queued in {queued:.1f} s, drained in {drained:.1f} s "
        f"({load.rate:.0f}/s); Redis {memory_before:.1f} MB before, {memory_queued:.1f} MB "
        f"queued, {memory_after:.1f} MB after"
    )
    for line in load.breakdown():
        say(f"{NAME}: {line}")
    return [
        Figure(
            NAME,
            f"CPU per import of {CASES_PER_REPORT} cases, all processes; ratio to the floor "
            "(a bare task + a COPY of its rows)",
            load.per_import["total"],
            "ms",
            baseline=load.floor,
            baseline_label="(floor)",
            ratio=load.per_import["total"] / load.floor,
            target=Target("ratio", "<=", CPU_TARGET),
        ),
        *(
            Figure(
                NAME,
                f"  of which {name} (information)",
                load.per_import.get(name, 0.0),
                "ms",
                baseline=load.task_floor.get(name, 0.0),
                baseline_label="(bare task)",
            )
            for name in cpu.COMPONENTS
        ),
        Figure(NAME, "  COPY of the same rows, client and server (information)", copy_floor, "ms"),
        Figure(
            NAME,
            f"{count:,} imports of {CASES_PER_REPORT} cases, one worker, concurrency 2 "
            "(information)",
            load.rate,
            "imports/s",
        ),
        Figure(
            NAME,
            "Redis memory after the queue drained, over before",
            memory_after - memory_before,
            "MB",
            baseline=memory_queued - memory_before,
            baseline_label="(queued)",
            target=Target("value", "<", 5.0),
        ),
    ]


def queue_imports(submitter: Submitter, report: Path, count: int) -> float:
    """Submit ``report`` ``count`` times as the API does (stored, then queued); the seconds
    that took."""
    started = time.perf_counter()
    for n in range(count):
        submitter.submit(report)
        if (n + 1) % 1000 == 0:
            say(f"queued {n + 1:,} imports")
    return time.perf_counter() - started


def _check_counts(engine: Engine, count: int) -> None:
    with engine.connect() as connection:
        runs = connection.scalar(select(func.count()).select_from(Run))
        results = connection.scalar(select(func.count()).select_from(Result))
    if (runs, results) != (count, count * CASES_PER_REPORT):
        raise RuntimeError(f"{runs} runs and {results} results for {count} imports")


def _copy_floor(engine: Engine, copies: int, start: datetime) -> float:
    """Milliseconds of CPU (this thread and its server backend) for a COPY of one report's
    rows (results, then artifacts) and its commit, as an import writes them, averaged over
    ``copies`` reports; each into a run of its own, the COPY text prepared beforehand."""
    run_ids = new_runs(engine, None, start, copies)
    texts = [copy_text(CASES_PER_REPORT, SEED, start, run_id, None) for run_id in run_ids]
    connection = engine.raw_connection()
    try:
        dbapi_connection: Any = connection.dbapi_connection
        clock = cpu.thread_and_backend_seconds(dbapi_connection)
        before = clock()
        for results, artifacts in texts:
            with dbapi_connection.cursor() as cursor:
                cursor.copy_expert(
                    f"COPY results ({', '.join(RESULT_COLUMNS)}) FROM STDIN", io.StringIO(results)
                )
                cursor.copy_expert(
                    f"COPY artifacts ({', '.join(ARTIFACT_COLUMNS)}) FROM STDIN",
                    io.StringIO(artifacts),
                )
            dbapi_connection.commit()
        return 1000 * (clock() - before) / copies
    finally:
        connection.close()
