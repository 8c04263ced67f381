"""A large JUnit report imported end to end through a real worker, against a plain COPY of
the same rows, and the worker's peak memory for it and for a report ten times bigger."""

from __future__ import annotations

import io
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ibutsu_benchmarks.common import (
    Figure,
    Services,
    Sizes,
    Target,
    count_label,
    fresh_services,
    say,
    show,
)
from ibutsu_benchmarks.cpu import children, status_mb
from ibutsu_benchmarks.data import PROJECT, cases, copy_in, copy_text, new_runs, write_junit
from ibutsu_server.db.models import Import, ImportStatus, Project, utcnow
from ibutsu_testing.services import running_worker, wait_for
from ibutsu_worker.importing.rows import ARTIFACT_COLUMNS, RESULT_COLUMNS
from ibutsu_worker.submission import Submitter

NAME = "import"
APP = "ibutsu_server:worker_app"
SEED = 1
IMPORT_TIMEOUT = 3600.0
# The pool child finishes its own start-up just after the worker logs 'ready.'.
IDLE_SETTLE_SECONDS = 1.0
BYTES_PER_MB = 1_000_000
RSS_NOISE = 1.10


@dataclass(frozen=True)
class Timing:
    """One import: seconds from submit to done, and how they split."""

    total: float
    submit: float  # storing the report and enqueueing
    queued: float  # until the task claimed the import
    task: float  # the task, from its claim until it set the import done (before its commit)

    def describe(self, results: int) -> str:
        return (
            f"{show(results / self.total, 'results/s')} "
            f"(submit {self.submit:.2f} s, queued {self.queued:.2f} s, task {self.task:.2f} s)"
        )


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """The import figures: rate against COPY, and peak memory at two report sizes."""
    start = utcnow().replace(microsecond=0)
    small, large = sizes.import_cases, sizes.import_big_cases
    report, big_report = folder / "report.xml", folder / "report-big.xml"
    say(f"{NAME}: writing reports of {small:,} and {large:,} cases")
    write_junit(report, cases(small, SEED, start))
    write_junit(big_report, cases(large, SEED, start))
    say(
        f"{NAME}: {report.stat().st_size / BYTES_PER_MB:.0f} MB and "
        f"{big_report.stat().st_size / BYTES_PER_MB:.0f} MB"
    )
    import_rates: list[float] = []
    copy_rates: list[float] = []
    task_rates: list[float] = []
    ceilings: list[float] = []
    peaks: list[float] = []
    with fresh_services(NAME) as services:
        submitter = Submitter(services.settings)
        try:
            project_id = _project(services.engine)
            with _pool_child(services, folder / "worker-1.log") as child:
                idle = _idle_mb(child)
                for attempt in range(1, sizes.import_repeats + 1):
                    # Interleaved, so both write into a table of about the same size.
                    seconds = _copy_baseline(services.engine, project_id, small, start)
                    copy_rates.append(small / seconds)
                    timing = _import(submitter, project_id, report, small)
                    import_rates.append(small / timing.total)
                    task_rates.append(small / timing.task)
                    # What end to end could reach were the worker's part free: the COPY
                    # behind the API's own storing of the upload.
                    ceilings.append(seconds / (seconds + timing.submit))
                    peaks.append(status_mb(child, "VmHWM"))
                    say(
                        f"{NAME}: {attempt}/{sizes.import_repeats}: COPY "
                        f"{show(copy_rates[-1], 'results/s')}; import {timing.describe(small)}; "
                        f"pool child idle {idle:.1f} MB, peak {peaks[-1]:.1f} MB"
                    )
            with _pool_child(services, folder / "worker-2.log") as child:
                big_idle = _idle_mb(child)
                big_timing = _import(submitter, project_id, big_report, large)
                big_peak = status_mb(child, "VmHWM")
                say(
                    f"{NAME}: {large:,} cases on a fresh worker: {big_timing.describe(large)}; "
                    f"pool child idle {big_idle:.1f} MB, peak {big_peak:.1f} MB"
                )
        finally:
            submitter.celery.close()
            submitter.close()

    import_rate, copy_rate = statistics.median(import_rates), statistics.median(copy_rates)
    task_rate = statistics.median(task_rates)
    # Apples to apples with the bigger report: one import on a fresh worker.
    growth, big_growth = peaks[0] - idle, big_peak - big_idle
    repeats = sizes.import_repeats
    return [
        Figure(
            NAME,
            f"{count_label(small)} cases end to end, median of {repeats}; ratio import/COPY",
            import_rate,
            "results/s",
            baseline=copy_rate,
            baseline_label="(COPY)",
            ratio=import_rate / copy_rate,
            target=Target("ratio", ">=", 0.90),
        ),
        Figure(
            NAME,
            f"  the task alone (claimed to done), median of {repeats}; ratio to COPY "
            "(information)",
            task_rate,
            "results/s",
            baseline=copy_rate,
            baseline_label="(COPY)",
            ratio=task_rate / copy_rate,
        ),
        Figure(
            NAME,
            "  end to end's ceiling: COPY / (COPY + storing the upload as the API does) "
            "(information)",
            statistics.median(ceilings),
            "x",
        ),
        Figure(
            NAME,
            f"{count_label(large)} cases end to end on a fresh worker (information)",
            large / big_timing.total,
            "results/s",
        ),
        Figure(
            NAME,
            f"pool child peak RSS above idle, {count_label(small)}",
            growth,
            "MB",
            target=Target("value", "<", 150.0),
        ),
        Figure(
            NAME,
            f"same after {repeats} imports of {count_label(small)} (information)",
            peaks[-1] - idle,
            "MB",
        ),
        Figure(
            NAME,
            f"pool child peak RSS above idle, {count_label(large)}; ratio to {count_label(small)}",
            big_growth,
            "MB",
            baseline=growth,
            baseline_label=f"({count_label(small)})",
            ratio=big_growth / growth,
            target=Target("ratio", "<=", RSS_NOISE),
        ),
    ]


def _project(engine: Engine) -> uuid.UUID:
    """The project both the imports and the baseline write to, as an admin creates it."""
    with Session(engine) as session:
        project = Project(id=uuid.uuid4(), name=PROJECT, title=PROJECT)
        session.add(project)
        session.commit()
        return project.id


def _copy_baseline(engine: Engine, project_id: uuid.UUID, count: int, start: datetime) -> float:
    """Seconds for plain COPYs (and commits) of the rows the importer writes for the report,
    results and their artifacts, into a run of their own; the COPY text is prepared before
    the clock starts."""
    (run_id,) = new_runs(engine, project_id, start, 1)
    results, artifacts = (
        io.StringIO(text) for text in copy_text(count, SEED, start, run_id, project_id)
    )
    started = time.perf_counter()
    copy_in(engine, "results", RESULT_COLUMNS, results)
    copy_in(engine, "artifacts", ARTIFACT_COLUMNS, artifacts)
    return time.perf_counter() - started


def _import(submitter: Submitter, project_id: uuid.UUID, report: Path, expected: int) -> Timing:
    """Submit ``report`` as the API does and time it until Submitter.wait sees it done, as an
    operator would (at worst one poll late: conservative); the import's own timestamps split
    that time."""
    submitted_at = utcnow()
    started = time.perf_counter()
    import_id = submitter.submit(report, project_id=project_id)
    submit_seconds = time.perf_counter() - started
    (outcome,) = submitter.wait([import_id], IMPORT_TIMEOUT)
    total = time.perf_counter() - started
    with submitter.db.transaction() as session:
        record = session.scalars(select(Import).where(Import.id == uuid.UUID(import_id))).one()
    data = record.data or {}
    if outcome.status != ImportStatus.DONE or data.get("result_count") != expected:
        raise RuntimeError(
            f"import {import_id} of {report.name} ended {outcome.status} with "
            f"{data.get('result_count')} of {expected} results: {outcome.message}"
        )
    began, finished = (
        datetime.fromisoformat(data["started"]),
        datetime.fromisoformat(data["finished"]),
    )
    return Timing(
        total=total,
        submit=submit_seconds,
        queued=(began - submitted_at).total_seconds() - submit_seconds,
        task=(finished - began).total_seconds(),
    )


@contextmanager
def _pool_child(services: Services, log_path: Path) -> Iterator[int]:
    """A real worker with one pool process; yields the pid of that process, which runs the
    tasks, while the worker runs."""
    with running_worker(APP, services.env, log_path, "--concurrency=1") as process:
        child = wait_for(lambda: _only_child(process.pid), timeout=30)
        assert child is not None  # wait_for returns only once it is truthy
        yield child


def _only_child(pid: int) -> int | None:
    found = children(pid)
    return found[0] if len(found) == 1 else None


def _idle_mb(pid: int) -> float:
    time.sleep(IDLE_SETTLE_SECONDS)
    return status_mb(pid, "VmRSS")
