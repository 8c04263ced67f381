"""prune_results in keyset batches against one plain DELETE, on the same data set loaded twice."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from ibutsu_benchmarks.common import Figure, Sizes, Target, count_label, fresh_services, say
from ibutsu_benchmarks.data import DATASET_TABLES, RunPlan, write_dataset
from ibutsu_server.db.models import utcnow
from ibutsu_worker.pruning import months_ago, prune_results

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
    """The pruning figures: total time against a plain DELETE, and the longest batch."""
    say(f"{NAME}: writing {sizes.prune_results:,} results")
    dataset = write_dataset(folder, plans(sizes.prune_results), SEED)
    with fresh_services(NAME) as services:
        engine = services.engine
        dataset.load(engine)
        session = Session(engine)
        try:
            started = time.perf_counter()
            report = prune_results(session, session.commit, RETENTION_MONTHS)
            batched = time.perf_counter() - started
        finally:
            session.close()
        say(
            f"{NAME}: prune_results: {batched:.2f} s, {report.batches} batches, longest "
            f"{report.longest_batch_seconds:.3f} s, deleted {report.deleted}"
        )
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(DATASET_TABLES)} CASCADE"))
        dataset.load(engine)
        plain, deleted = _plain_delete(engine)
        say(f"{NAME}: plain DELETE: {plain:.2f} s, deleted {deleted}")
    if deleted != report.deleted:
        raise RuntimeError(f"the two deletes disagree: {report.deleted} vs {deleted}")
    what = f"{report.deleted['results']:,} of {count_label(dataset.results)} results"
    return [
        Figure(
            NAME,
            f"prune_results, {what}; ratio batched/plain",
            batched,
            "s",
            baseline=plain,
            baseline_label="(one DELETE)",
            ratio=batched / plain,
            target=Target("ratio", "<=", 1.5),
        ),
        Figure(
            NAME,
            f"longest of {report.batches} batches",
            report.longest_batch_seconds,
            "s",
            target=Target("value", "<", 1.0),
        ),
    ]


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
