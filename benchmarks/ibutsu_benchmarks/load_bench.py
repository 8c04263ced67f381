"""Many small imports queued at once to one worker (concurrency 2): imports per second from a
full queue to an empty one, counts checked exactly, and Redis memory before and after."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from sqlalchemy import func, select

from ibutsu_benchmarks.common import Figure, Sizes, Target, fresh_services, say
from ibutsu_benchmarks.data import cases, write_junit
from ibutsu_server.db.models import Import, ImportStatus, Result, Run, utcnow
from ibutsu_testing.services import REDIS_URL, running_worker, wait_for
from ibutsu_worker.submission import Submitter

NAME = "load"
CASES_PER_REPORT = 100
SEED = 3


def _used_memory() -> float:
    client = redis.Redis.from_url(REDIS_URL)
    used = int(client.info("memory")["used_memory"]) / 1e6
    client.close()
    return used


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """Queue ``sizes.load_imports`` imports, then time one worker draining them."""
    count = sizes.load_imports
    report = folder / "small.xml"
    write_junit(report, cases(CASES_PER_REPORT, SEED, utcnow().replace(microsecond=0)))
    with fresh_services(NAME) as services:
        submitter = Submitter(services.settings)
        memory_before = _used_memory()
        started = time.perf_counter()
        for n in range(count):
            submitter.submit(report)
            if (n + 1) % 1000 == 0:
                say(f"{NAME}: queued {n + 1:,} imports")
        queued = time.perf_counter() - started
        memory_queued = _used_memory()
        env = {**services.env, "CELERY_WORKER_CONCURRENCY": "2"}
        engine = services.engine

        def done() -> int:
            with engine.connect() as connection:
                finished = select(func.count()).where(Import.status == ImportStatus.DONE)
                return int(connection.scalar(finished.select_from(Import)) or 0)

        with running_worker("ibutsu_server:worker_app", env, folder / "worker.log"):
            started = time.perf_counter()
            wait_for(lambda: done() == count, timeout=3600, interval=0.25)
            drained = time.perf_counter() - started
        with engine.connect() as connection:
            runs = connection.scalar(select(func.count()).select_from(Run))
            results = connection.scalar(select(func.count()).select_from(Result))
        if (runs, results) != (count, count * CASES_PER_REPORT):
            raise RuntimeError(f"{runs} runs and {results} results for {count} imports")
        memory_after = _used_memory()
        submitter.close()
    rate = count / drained
    say(
        f"{NAME}: {count:,} imports queued in {queued:.1f} s, drained in {drained:.1f} s "
        f"({rate:.0f}/s); Redis {memory_before:.1f} MB before, {memory_queued:.1f} MB queued, "
        f"{memory_after:.1f} MB after"
    )
    return [
        Figure(
            NAME,
            f"{count:,} imports of {CASES_PER_REPORT} cases, one worker, concurrency 2",
            rate,
            "imports/s",
            target=Target("value", ">=", 120.0),
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
