"""update_summary on a big run among many, against loading its results with the ORM."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ibutsu_benchmarks.common import Figure, Sizes, Target, count_label, fresh_services, say
from ibutsu_benchmarks.data import RunPlan, write_dataset
from ibutsu_server.db.models import SUMMARY_COUNTERS, Result, utcnow
from ibutsu_worker.summaries import build_summary, update_summary

NAME = "update_run"
SEED = 3
RESULTS_PER_RUN = 1000
MS = 1000.0


def plans(total: int, big: int) -> tuple[list[RunPlan], int]:
    """Runs of RESULTS_PER_RUN results an hour apart over the last weeks, with one run of
    ``big`` results in the middle, ``total`` results in all; and the index of the big run."""
    small_runs = (total - big) // RESULTS_PER_RUN
    start = utcnow() - timedelta(hours=small_runs + 2)
    runs = [RunPlan(start + timedelta(hours=n), RESULTS_PER_RUN) for n in range(small_runs)]
    middle = small_runs // 2
    runs.insert(middle, RunPlan(runs[middle].start_time, big))
    return runs, middle


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """The summary figures: time for the big run, and the speed-up over the ORM baseline."""
    total, big = sizes.summary_table_results, sizes.summary_run_results
    say(f"{NAME}: writing {total:,} results, {big:,} of them in one run")
    runs, big_index = plans(total, big)
    dataset = write_dataset(folder, runs, SEED)
    run_id = dataset.run_ids[big_index]
    with fresh_services(NAME) as services:
        dataset.load(services.engine)
        repeats = sizes.summary_repeats
        sql, sql_summary = _median(services.engine, run_id, repeats, "update_summary", _sql)
        orm, orm_summary = _median(services.engine, run_id, repeats, "ORM load + count", _orm)
    if sql_summary != orm_summary or sql_summary["tests"] != big:
        raise RuntimeError(f"the summaries disagree: {sql_summary} vs {orm_summary}")
    label = f"run of {count_label(big)} among {count_label(dataset.results)}"
    return [
        Figure(
            NAME,
            f"update_summary, {label}, median of {repeats}",
            sql * MS,
            "ms",
            target=Target("value", "<=", 100.0),
        ),
        Figure(
            NAME,
            "speed-up over loading the run with the ORM; ratio ORM/SQL",
            sql * MS,
            "ms",
            baseline=orm * MS,
            baseline_label="(ORM)",
            ratio=orm / sql,
            target=Target("ratio", ">=", 50.0),
        ),
    ]


def _median(
    engine: Engine,
    run_id: uuid.UUID,
    repeats: int,
    label: str,
    summarise: Callable[[Session, uuid.UUID], dict[str, int]],
) -> tuple[float, dict[str, int]]:
    """The median seconds of ``summarise`` over ``repeats`` transactions of their own, each
    rolled back so every repeat finds the run as loaded; and the summary it computed."""
    samples = []
    for _ in range(repeats):
        with Session(engine) as session:
            started = time.perf_counter()
            summary = summarise(session, run_id)
            samples.append(time.perf_counter() - started)
            session.rollback()
    say(f"{NAME}: {label}: " + ", ".join(f"{sample * MS:.1f}" for sample in samples) + " ms")
    return statistics.median(samples), summary


def _sql(session: Session, run_id: uuid.UUID) -> dict[str, int]:
    summary = update_summary(session, run_id)
    assert summary is not None  # the run exists
    session.flush()  # the UPDATE is part of the work
    return summary


def _orm(session: Session, run_id: uuid.UUID) -> dict[str, int]:
    """Upstream's update_run: every result of the run loaded, in start order, and counted."""
    counts: dict[str, int] = {}
    tests = 0
    query = select(Result).where(Result.run_id == run_id).order_by(Result.start_time)
    for result in session.scalars(query).all():
        tests += 1
        counter = SUMMARY_COUNTERS.get(result.result or "")
        if counter:
            counts[counter] = counts.get(counter, 0) + 1
    return build_summary(counts, tests, collected=0)
