"""What IbutsuTask costs: a few thousand tasks through one real worker (prefork, concurrency 2)
on a Redis of the benchmark's own, an IbutsuTask whose body is one SQL statement against a bare
Celery no-op on the same worker process, and the CPU each took, by process.

Each round runs every kind's tasks in slices, the kinds taking turns, so that a burst of load
from elsewhere on the machine falls on all of them alike."""

from __future__ import annotations

import statistics
from pathlib import Path

from ibutsu_benchmarks import cpu
from ibutsu_benchmarks.common import Figure, Sizes, Target, fresh_services, say, show
from ibutsu_benchmarks.workers import (
    EMPTY,
    NOOP,
    ONE_STATEMENT,
    Workers,
    own_redis,
    running_workers,
)

NAME = "overhead"
QUEUE = "ibutsu-bench"
FLOOR = "bare Celery no-op"
KINDS = {
    FLOOR: NOOP,
    "IbutsuTask, empty body": EMPTY,
    "IbutsuTask, one SQL statement": ONE_STATEMENT,
}
TARGETED = "IbutsuTask, one SQL statement"
SLICES = 6


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """Tasks/s of each kind, median of ``sizes.overhead_repeats`` rounds."""
    count = sizes.overhead_tasks
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    usages: dict[str, list[cpu.Usage]] = {kind: [] for kind in KINDS}
    with (
        own_redis() as (url, redis_pid),
        fresh_services(NAME, url) as services,
        running_workers(services, redis_pid, folder) as workers,
    ):
        for repeat in range(sizes.overhead_repeats):
            for kind, (seconds, usage) in _round(workers, count).items():
                rates[kind].append(count / seconds)
                usages[kind].append(usage)
                say(
                    f"{NAME}: {repeat + 1}/{sizes.overhead_repeats} {kind}: "
                    f"{show(count / seconds, 'tasks/s')}; {usage.describe(count, 'task')}"
                )
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    figures = []
    for kind in (TARGETED, "IbutsuTask, empty body"):
        target = Target("ratio", ">=", 0.90) if kind == TARGETED else None
        figures.append(
            Figure(
                NAME,
                f"{kind}, {count:,} tasks, concurrency 2, median of {sizes.overhead_repeats}; "
                f"ratio to a bare no-op{'' if target else ' (information)'}",
                medians[kind],
                "tasks/s",
                baseline=medians[FLOOR],
                baseline_label="(no-op)",
                ratio=medians[kind] / medians[FLOOR],
                target=target,
            )
        )
    for kind, kind_usages in usages.items():
        usage = sorted(kind_usages, key=lambda u: u.total)[len(kind_usages) // 2]
        say(f"{NAME}: {kind}, median round: {usage.describe(count, 'task')}")
        per = usage.per(count)["total"]
        figures.append(
            Figure(NAME, f"CPU per task, all processes: {kind} (information)", per, "ms")
        )
    return figures


def _round(workers: Workers, count: int) -> dict[str, tuple[float, cpu.Usage]]:
    """``count`` tasks of every kind in SLICES slices, the kinds taking turns (each first in
    turn); the seconds and CPU each kind took in all."""
    totals: dict[str, tuple[float, cpu.Usage]] = {}
    for number in range(SLICES):
        kinds = list(KINDS)
        kinds = kinds[number % len(kinds) :] + kinds[: number % len(kinds)]
        for kind in kinds:
            for _ in range(count // SLICES):
                workers.producer.send_task(KINDS[kind], queue=QUEUE)
            seconds, usage = workers.drain(QUEUE)
            if kind in totals:
                seconds, usage = seconds + totals[kind][0], usage + totals[kind][1]
            totals[kind] = (seconds, usage)
    return totals
