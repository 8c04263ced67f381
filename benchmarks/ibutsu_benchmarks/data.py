"""Synthetic test results, the one source of every benchmark's data: written as a JUnit report,
as rows in the importer's COPY format, and as bulk-loadable runs, results and artifacts."""

from __future__ import annotations

import io
import itertools
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from ibutsu_benchmarks.common import say
from ibutsu_server.db.models import Run, utcnow
from ibutsu_worker.importing.copy import copy_line
from ibutsu_worker.importing.rows import ARTIFACT_COLUMNS, RESULT_COLUMNS

SUITES = 10
HOSTNAME = "ci-runner-07"
PROJECT = "bench"
# One result in this many has an artifact (a log file).
ARTIFACT_EVERY = 100
ARTIFACT_CONTENT = b"2025-01-01 12:00:00 INFO collected log line of a test\n" * 16
# Cumulative shares of outcomes, roughly those of a large, mostly green suite.
OUTCOME_SHARES = (
    (0.78, "passed"),
    (0.88, "failed"),
    (0.90, "error"),
    (0.98, "skipped"),
    (1.00, "xfailed"),
)
SYSTEM_OUT_SHARE = 0.10
AREAS = ("api", "ui", "db", "auth", "reports", "widgets", "imports", "runs")
VERBS = ("create", "update", "delete", "list", "filter", "export", "upload", "render")
NOUNS = ("project", "run", "result", "artifact", "widget", "dashboard", "user", "token")
# Tables of a bulk-loaded data set and the columns its COPY files hold, parents first.
DATASET_TABLES: dict[str, tuple[str, ...]] = {
    "projects": ("id", "name", "title"),
    "runs": ("id", "project_id", "start_time", "created"),
    "results": RESULT_COLUMNS,
    "artifacts": ("id", "result_id", "run_id", "filename", "content", "upload_date"),
}
COPY_READ_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Case:
    """One generated test case."""

    suite: str
    timestamp: datetime
    classname: str
    name: str
    file: str
    line: int
    time: float
    outcome: str
    message: str | None = None
    detail: str | None = None  # the traceback, or the skip details
    system_out: str | None = None

    @property
    def test_id(self) -> str:
        """The ``test_id`` the JUnit importer builds, as upstream builds it."""
        return f"{self.classname.split('.')[-1]}.{self.name}"

    def metadata(self, run_id: uuid.UUID) -> dict[str, Any]:
        """The ``data`` the JUnit importer stores for this case (upstream's layout)."""
        data: dict[str, Any] = {"run": str(run_id), "fspath": self.file, "line": str(self.line)}
        if self.outcome in ("failed", "error"):
            data.update(short_tb=self.message, exception_name=_error_type(self.outcome))
        elif self.outcome == "skipped":
            data["skip_reason"] = self.detail
        elif self.outcome == "xfailed":
            data["xfail_reason"] = self.message
        return data

    def artifacts(self) -> list[tuple[str, bytes]]:
        """The artifacts the JUnit importer stores for this case: its traceback and output."""
        found = []
        if self.outcome in ("failed", "error") and self.detail:
            found.append(("traceback.log", self.detail.encode()))
        if self.system_out:
            found.append(("system-out.log", self.system_out.encode()))
        return found


def _error_type(outcome: str) -> str:
    return "AssertionError" if outcome == "failed" else "ConnectionError"


def cases(count: int, seed: int, start: datetime) -> Iterator[Case]:
    """``count`` cases in SUITES suites, the same ones for the same ``seed``; suites start a
    minute apart from ``start``."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    for index in range(count):
        suite_index = index * SUITES // count
        module = rng.randrange(400)
        area, noun = AREAS[module % len(AREAS)], NOUNS[module % len(NOUNS)]
        name = f"test_{rng.choice(VERBS)}_{rng.choice(NOUNS)}_{index}"
        file = f"tests/{area}/test_{noun}_{module}.py"
        line = rng.randrange(10, 2000)
        draw = rng.random()
        outcome = next(outcome for share, outcome in OUTCOME_SHARES if draw < share)
        message, detail = _outcome_text(rng, outcome, file, line, name)
        yield Case(
            suite=f"tests.{AREAS[suite_index % len(AREAS)]}.suite{suite_index}",
            timestamp=start + timedelta(minutes=suite_index),
            classname=f"tests.{area}.test_{noun}_{module}.Test{noun.title()}",
            name=name,
            file=file,
            line=line,
            time=round(rng.expovariate(20.0), 3),
            outcome=outcome,
            message=message,
            detail=detail,
            system_out=_system_out(rng, noun) if rng.random() < SYSTEM_OUT_SHARE else None,
        )


def _outcome_text(
    rng: random.Random, outcome: str, file: str, line: int, name: str
) -> tuple[str | None, str | None]:
    if outcome == "failed":
        expected, got = rng.choice((200, 201, 204)), rng.choice((400, 404, 409, 500, 503))
        message = f"AssertionError: assert {got} == {expected}"
        return message, (
            f"{file}:{line}: in {name}\n"
            f"    response = client.post(url, json=payload, timeout=30)\n"
            f"    assert response.status_code == {expected}, response.text\n"
            f"E   {message}\n"
            f"E    +  where {got} = <Response [{got}]>.status_code\n"
            f"tests/conftest.py:88: in check_response\n"
            f"    raise AssertionError(details)"
        )
    if outcome == "error":
        message = "failed on setup with ConnectionError: connection refused"
        return message, (
            f"{file}:{line}: in fixture 'db_session'\n"
            f"    engine.connect()\n"
            f"E   ConnectionError: could not connect to server: Connection refused\n"
            f"E   Is the server running on host 10.0.{rng.randrange(256)}.12, port 5432?"
        )
    if outcome == "skipped":
        return "needs a browser", f"{file}:{line}: needs a browser (--browser not given)"
    if outcome == "xfailed":
        return f"known bug #{rng.randrange(1000, 9999)}", f"{file}:{line}: expected failure"
    return None, None


def _system_out(rng: random.Random, noun: str) -> str:
    return "\n".join(
        f"12:00:{second:02d} INFO ibutsu.client: GET /api/{noun}/{rng.randrange(10**6)} "
        f"200 in {rng.randrange(1, 300)} ms"
        for second in range(rng.randrange(3, 8))
    )


def write_junit(path: Path, report: Iterable[Case]) -> None:
    """Write ``report`` as a JUnit XML file in the shape pytest writes, suite by suite."""
    with path.open("w", encoding="utf-8") as out:
        out.write('<?xml version="1.0" encoding="utf-8"?>\n<testsuites name="pytest tests">\n')
        for suite, group in itertools.groupby(report, key=lambda case: case.suite):
            members = list(group)
            counts = {
                outcome: sum(case.outcome == outcome for case in members)
                for outcome in ("failed", "error", "skipped", "xfailed")
            }
            timestamp = members[0].timestamp.replace(tzinfo=None).isoformat()
            out.write(
                f"  <testsuite name={quoteattr(suite)} errors=\"{counts['error']}\" "
                f"failures=\"{counts['failed']}\" "
                f"skipped=\"{counts['skipped'] + counts['xfailed']}\" tests=\"{len(members)}\" "
                f'time="{sum(case.time for case in members):.3f}" timestamp="{timestamp}" '
                f'hostname="{HOSTNAME}">\n'
            )
            out.writelines(_testcase(case) for case in members)
            out.write("  </testsuite>\n")
        out.write("</testsuites>\n")


def _testcase(case: Case) -> str:
    head = (
        f"    <testcase classname={quoteattr(case.classname)} name={quoteattr(case.name)} "
        f'file={quoteattr(case.file)} line="{case.line}" time="{case.time:.3f}"'
    )
    children = []
    if case.outcome in ("failed", "error"):
        tag = "failure" if case.outcome == "failed" else "error"
        children.append(
            f"<{tag} message={quoteattr(case.message or '')} "
            f'type="{_error_type(case.outcome)}">{escape(case.detail or "")}</{tag}>'
        )
    elif case.outcome in ("skipped", "xfailed"):
        kind = "pytest.skip" if case.outcome == "skipped" else "pytest.xfail"
        children.append(
            f'<skipped type="{kind}" message={quoteattr(case.message or "")}>'
            f"{escape(case.detail or '')}</skipped>"
        )
    if case.system_out:
        children.append(f"<system-out>{escape(case.system_out)}</system-out>")
    if not children:
        return f"{head}/>\n"
    return f"{head}>{''.join(children)}</testcase>\n"


def result_row(
    case: Case,
    *,
    run_id: uuid.UUID,
    project_id: uuid.UUID | None,
    start_time: datetime | None = None,
) -> tuple[Any, ...]:
    """The ``results`` row the importer writes for ``case``, in its COPY column order, with a
    new id; ``start_time`` overrides the suite's timestamp."""
    row = {
        "id": uuid.uuid4(),
        "project_id": project_id,
        "run_id": run_id,
        "test_id": case.test_id,
        "result": case.outcome,
        "data": case.metadata(run_id),
        "params": {},
        "duration": case.time,
        "start_time": start_time or case.timestamp,
        "source": case.suite,
        "env": None,
        "component": None,
    }
    return tuple(row[column] for column in RESULT_COLUMNS)


def artifact_rows(case: Case, result_id: uuid.UUID, uploaded: datetime) -> list[tuple[Any, ...]]:
    """The ``artifacts`` rows the importer writes for ``case``, in its COPY column order."""
    rows = []
    for filename, content in case.artifacts():
        row = {
            "id": uuid.uuid4(),
            "content": content,
            "result_id": result_id,
            "run_id": None,
            "filename": filename,
            "data": {"contentType": "text/plain", "resultId": str(result_id)},
            "upload_date": uploaded,
        }
        rows.append(tuple(row[column] for column in ARTIFACT_COLUMNS))
    return rows


def new_runs(
    engine: Engine, project_id: uuid.UUID | None, start: datetime, count: int
) -> list[uuid.UUID]:
    """``count`` empty runs, committed, for baselines to COPY results into."""
    ids = [uuid.uuid4() for _ in range(count)]
    created = utcnow()
    with Session(engine) as session:
        session.add_all(
            Run(id=run_id, project_id=project_id, start_time=start, created=created)
            for run_id in ids
        )
        session.commit()
    return ids


def copy_text(
    count: int, seed: int, start: datetime, run_id: uuid.UUID, project_id: uuid.UUID | None
) -> tuple[str, str]:
    """The COPY text of the ``results`` and the ``artifacts`` rows the importer writes for a
    report of ``count`` cases (:func:`cases`) into the run ``run_id``."""
    results, artifacts = io.StringIO(), io.StringIO()
    uploaded = utcnow()
    for case in cases(count, seed, start):
        row = result_row(case, run_id=run_id, project_id=project_id)
        results.write(copy_line(row))
        for artifact in artifact_rows(case, row[RESULT_COLUMNS.index("id")], uploaded):
            artifacts.write(copy_line(artifact))
    return results.getvalue(), artifacts.getvalue()


def copy_in(engine: Engine, table: str, columns: Sequence[str], source: IO[str]) -> None:
    """``COPY table (columns) FROM STDIN`` from ``source`` and commit, on a connection of its
    own."""
    connection = engine.raw_connection()
    try:
        dbapi_connection: Any = connection.dbapi_connection
        with dbapi_connection.cursor() as cursor:
            cursor.copy_expert(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN", source, size=COPY_READ_SIZE
            )
        dbapi_connection.commit()
    finally:
        connection.close()


def settle(engine: Engine) -> None:
    """VACUUM ANALYZE and CHECKPOINT, so what is timed next starts with fresh statistics, a
    set visibility map, and no checkpoint of the load still to write."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
        connection.execute(text("CHECKPOINT"))


@dataclass(frozen=True)
class RunPlan:
    """A run to generate: when it started and how many results it has."""

    start_time: datetime
    results: int


@dataclass(frozen=True)
class Dataset:
    """COPY files of runs, results and artifacts, written once so every load of them brings
    back exactly the same rows."""

    files: tuple[tuple[str, tuple[str, ...], Path], ...]
    run_ids: tuple[uuid.UUID, ...]
    results: int
    artifacts: int

    def load(self, engine: Engine) -> None:
        """COPY every file into its (empty) table, then :func:`settle`."""
        started = time.perf_counter()
        for table, columns, path in self.files:
            with path.open(encoding="utf-8") as source:
                copy_in(engine, table, columns, source)
        settle(engine)
        say(
            f"loaded {self.results:,} results and {self.artifacts:,} artifacts "
            f"in {time.perf_counter() - started:.1f} s"
        )


def write_dataset(folder: Path, plans: Sequence[RunPlan], seed: int) -> Dataset:
    """One project, a run per plan in order, its results one second apart from the run's
    start, and an artifact on every ARTIFACT_EVERY-th result."""
    project_id = uuid.uuid4()
    run_ids = tuple(uuid.uuid4() for _ in plans)
    stream = cases(sum(plan.results for plan in plans), seed, plans[0].start_time)
    paths = {table: folder / f"{table}.copy" for table in DATASET_TABLES}
    created = utcnow()
    written = artifacts = 0
    with ExitStack() as stack:
        out = {
            table: stack.enter_context(path.open("w", encoding="utf-8"))
            for table, path in paths.items()
        }
        out["projects"].write(copy_line((project_id, PROJECT, PROJECT)))
        for run_id, plan in zip(run_ids, plans, strict=True):
            out["runs"].write(copy_line((run_id, project_id, plan.start_time, created)))
            for offset, case in enumerate(itertools.islice(stream, plan.results)):
                when = plan.start_time + timedelta(seconds=offset)
                row = result_row(case, run_id=run_id, project_id=project_id, start_time=when)
                out["results"].write(copy_line(row))
                if written % ARTIFACT_EVERY == 0:
                    result_id = row[RESULT_COLUMNS.index("id")]
                    artifact = (uuid.uuid4(), result_id, run_id, "log.txt", ARTIFACT_CONTENT, when)
                    out["artifacts"].write(copy_line(artifact))
                    artifacts += 1
                written += 1
    return Dataset(
        files=tuple((table, DATASET_TABLES[table], path) for table, path in paths.items()),
        run_ids=run_ids,
        results=written,
        artifacts=artifacts,
    )
