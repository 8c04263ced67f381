"""prune_results in keyset batches against one plain DELETE, each on its own copy of the same
loaded data set, median of a few interleaved rounds."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from ibutsu_benchmarks.common import Figure, Sizes, Target, count_label, fresh_services, say
from ibutsu_benchmarks.data import RunPlan, settle, write_dataset
from ibutsu_server.db.models import utcnow
from ibutsu_server.db.sessions import SessionTransaction
from ibutsu_worker.pruning import PruneReport, months_ago, prune_results

NAME = "prune"
SEED = 2
RETENTION_MONTHS = 5
RESULTS_PER_RUN = 1000
OLD_SHARE = 0.6
# Old runs start between these many days ago, recent ones within the last RECENT_DAYS: no row
# is near the cutoff (about 150 days), so both deletes see exactly the same rows as old.
OLD_DAYS = (730, 170)
RECENT_DAYS = 120
_PLAIN_DELETE = (
    "DELETE FROM artifacts WHERE result_id IN (SELECT id FROM results WHERE start_time < :cutoff)",
    "DELETE FROM results WHERE start_time < :cutoff",
)


def plans(results: int) -> list[RunPlan]:
    """Runs of RESULTS_PER_RUN results in the order they happened: OLD_SHARE of them spread
    over two years before the retention, the rest over the last four months."""
    runs = results // RESULTS_PER_RUN
    old = round(runs * OLD_SHARE)
    now = utcnow()
    oldest, newest = OLD_DAYS
    old_days = [oldest - (oldest - newest) * n / old for n in range(old)]
    recent_days = [RECENT_DAYS - RECENT_DAYS * n / (runs - old) for n in range(runs - old)]
    return [RunPlan(now - timedelta(days=days), RESULTS_PER_RUN) for days in old_days + recent_days]


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """The pruning figures: total time against a plain DELETE (median of the rounds), and the
    longest batch of any round."""
    say(f"{NAME}: writing {sizes.prune_results:,} results")
    dataset = write_dataset(folder, plans(sizes.prune_results), SEED)
    batched: list[float] = []
    plain: list[float] = []
    reports: list[PruneReport] = []
    counts: list[dict[str, int]] = []
    with fresh_services(NAME) as services:
        dataset.load(services.engine)
        services.engine.dispose()  # a template database must have no connection
        template = services.engine.url.database
        assert template is not None
        for repeat in range(sizes.prune_repeats):
            # Each first in turn, so whatever drifts on the machine favours neither.
            for mode in ("batched", "plain") if repeat % 2 == 0 else ("plain", "batched"):
                with _copy_of(services.engine, template) as engine:
                    if mode == "batched":
                        seconds, report = _batched(engine)
                        batched.append(seconds)
                        reports.append(report)
                        detail = (
                            f"{report.batches} batches, longest "
                            f"{report.longest_batch_seconds:.3f} s, deleted {report.deleted}"
                        )
                    else:
                        seconds, deleted = _plain_delete(engine)
                        plain.append(seconds)
                        detail = f"deleted {deleted}"
                        counts.append(deleted)
                say(f"{NAME}: {repeat + 1}/{sizes.prune_repeats} {mode}: {seconds:.2f} s, {detail}")
    if any(deleted != reports[0].deleted for deleted in [*counts, *(r.deleted for r in reports)]):
        raise RuntimeError(f"the deletes disagree: {[r.deleted for r in reports]}, {counts}")
    median_batched, median_plain = statistics.median(batched), statistics.median(plain)
    report = reports[0]
    what = f"{report.deleted['results']:,} of {count_label(dataset.results)} results"
    longest = max(report.longest_batch_seconds for report in reports)
    return [
        Figure(
            NAME,
            f"prune_results, {what}, median of {sizes.prune_repeats}; ratio batched/plain",
            median_batched,
            "s",
            baseline=median_plain,
            baseline_label="(one DELETE)",
            ratio=median_batched / median_plain,
            target=Target("ratio", "<=", 1.1),
        ),
        Figure(
            NAME,
            f"longest batch of {sizes.prune_repeats} rounds of {report.batches} batches",
            longest,
            "s",
            target=Target("value", "<", 1.0),
        ),
    ]


@contextmanager
def _copy_of(admin: Engine, template: str) -> Iterator[Engine]:
    """A new database copied from ``template`` file by file (much faster than loading the
    data again), settled as a load is; dropped afterwards."""
    name = f"{template}_{uuid.uuid4().hex[:6]}"
    # Asked from another database: a connection to the template would block the copy.
    maintenance = create_engine(admin.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with maintenance.connect() as connection:
            connection.execute(
                text(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
            )
        engine = create_engine(admin.url.set(database=name))
        try:
            settle(engine)
            yield engine
        finally:
            engine.dispose()
            with maintenance.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        maintenance.dispose()


def _batched(engine: Engine) -> tuple[float, PruneReport]:
    """Seconds for prune_results with its own batches and commits, and its report."""
    with Session(engine) as session:
        started = time.perf_counter()
        report = prune_results(SessionTransaction(session), RETENTION_MONTHS)
        return time.perf_counter() - started, report


def _plain_delete(engine: Engine) -> tuple[float, dict[str, int]]:
    """Seconds for the old results' artifacts and then the old results to go, in one
    transaction of one statement each, and how many rows of each table went."""
    cutoff = months_ago(utcnow(), RETENTION_MONTHS)
    started = time.perf_counter()
    with engine.begin() as connection:
        counts = [
            connection.execute(text(sql), {"cutoff": cutoff}).rowcount for sql in _PLAIN_DELETE
        ]
    elapsed = time.perf_counter() - started
    return elapsed, {"artifacts": counts[0], "results": counts[1]}
