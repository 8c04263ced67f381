"""Imports as a worker runs them, on the real PostgreSQL: called in the test's process, but
for the worker killed mid-import, which needs real worker processes."""

from __future__ import annotations

import uuid
from importlib import resources
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ibutsu_server import task_names
from ibutsu_server.app_factory import FlaskCelery
from ibutsu_server.db.models import Artifact, Import, ImportFile, Result, Run
from ibutsu_worker.importing.landing import HELD_ROWS
from ibutsu_worker.submission import Submitter, import_record
from ibutsu_worker.summaries import update_summary
from ibutsu_worker_tests.builders import ImportRunner
from ibutsu_worker_tests.corpus import REFUSED, SAMPLE_SUMMARY, corpus_files, expected_count


def sample(tmp_path: Path) -> Path:
    target = tmp_path / "sample-junit.xml"
    target.write_bytes((resources.files("ibutsu_worker.samples") / "sample-junit.xml").read_bytes())
    return target


def count(submitter: Submitter, model: type[Run] | type[Result] | type[Artifact]) -> int:
    with submitter.db.engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(model)) or 0)


def test_sample_import_lands_whole(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    project = submitter.ensure_project("acme")
    outcome = run_import(sample(tmp_path), project_id=project, source="ci")
    assert outcome.status == "done" and outcome.message is None
    assert outcome.summary == SAMPLE_SUMMARY
    session = submitter.db.session()
    record = session.get(Import, uuid.UUID(outcome.import_id))
    assert record is not None and record.format == "junit" and record.data is not None
    assert record.data["result_count"] == 8 and record.data["run_id"] == [outcome.run_id]
    stored = session.scalar(select(ImportFile.content).where(ImportFile.import_id == record.id))
    assert stored is None  # cleared after success
    run = session.get(Run, uuid.UUID(str(outcome.run_id)))
    assert run is not None and run.project_id == project and run.source == "ci"
    assert run.duration is not None and abs(run.duration - 1.84) < 1e-9
    submitter.db.session.remove()
    assert count(submitter, Artifact) == 3  # two tracebacks and one system-out


def test_redelivered_import_lands_once(
    worker_app: FlaskCelery, submitter: Submitter, tmp_path: Path
) -> None:
    record = submitter.store(sample(tmp_path))
    # Three deliveries of the same import, as after a crash or a retry, by every name.
    worker_app.tasks[task_names.RUN_JUNIT_IMPORT].apply(args=[import_record(record)]).get()
    worker_app.tasks[task_names.IMPORT_RESULTS].apply(args=[str(record.id)]).get()
    worker_app.tasks[task_names.RUN_ARCHIVE_IMPORT].apply(args=[{"id": str(record.id)}]).get()
    assert submitter.outcome(str(record.id)).status == "done"
    assert (count(submitter, Run), count(submitter, Result)) == (1, 8)


def test_whole_corpus(run_import: ImportRunner, submitter: Submitter) -> None:
    files = corpus_files()
    for path in files:
        outcome = run_import(path)
        if path.name in REFUSED:
            assert outcome.status == "error" and outcome.message, path.name
            assert outcome.run_id is None
            continue
        assert outcome.status == "done", (path.name, outcome.message)
        assert outcome.summary is not None
        assert outcome.summary["tests"] == expected_count(path), path.name
    assert count(submitter, Run) == len(files) - len(REFUSED)
    # What an import tallied as it wrote is what the aggregates over the stored rows give
    # (durations summed in another order may differ in the last bits).
    columns = (Run.id, Run.summary, Run.start_time, Run.data, Run.env, Run.component, Run.source)
    session = submitter.db.session()
    tallied = session.execute(select(*columns, Run.duration).order_by(Run.id)).all()
    for run in tallied:
        update_summary(session, run.id, start_at_first=True)
    session.flush()
    recomputed = session.execute(select(*columns, Run.duration).order_by(Run.id)).all()
    assert [row[:-1] for row in recomputed] == [row[:-1] for row in tallied]
    assert [row[-1] for row in recomputed] == pytest.approx([row[-1] for row in tallied])
    submitter.db.session.remove()


@pytest.mark.parametrize("cases", [HELD_ROWS - 1, HELD_ROWS, HELD_ROWS + 1])
def test_held_and_streamed_results_land_alike(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path, cases: int
) -> None:
    """Up to HELD_ROWS results wait for their run, inserted once, complete; more stream in
    after it, and the run is updated at the end: the same run either way."""
    report = tmp_path / "report.xml"
    with report.open("w") as out:
        out.write('<testsuite name="held" timestamp="2026-01-02T03:04:05">')
        out.writelines(
            f'<testcase classname="c" name="t{n}" time="1">{"<failure/>" if n % 4 else ""}'
            "</testcase>"
            for n in range(cases)
        )
        out.write("</testsuite>")
    outcome = run_import(report)
    assert outcome.status == "done", outcome.message
    failures = sum(1 for n in range(cases) if n % 4)
    assert outcome.summary is not None
    assert (outcome.summary["tests"], outcome.summary["failures"]) == (cases, failures)
    session = submitter.db.session()
    run = session.get(Run, uuid.UUID(str(outcome.run_id)))
    assert run is not None and run.summary == outcome.summary and run.duration == cases
    assert count(submitter, Result) == cases
    submitter.db.session.remove()


def test_bad_input_is_recorded_and_the_worker_goes_on(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    garbage = tmp_path / "report.xml"
    garbage.write_bytes(b"PK\x03\x04 this is a zip file, not a report")
    truncated = tmp_path / "truncated.xml"
    truncated.write_bytes(b'<testsuite name="s"><testcase name="a"/><testcase name="b">')
    outcomes = [run_import(garbage), run_import(truncated), run_import(sample(tmp_path))]
    assert [o.status for o in outcomes] == ["error", "error", "done"]
    assert outcomes[0].message == "not a JUnit report or Ibutsu archive"
    assert outcomes[1].message is not None and "malformed XML" in outcomes[1].message
    # The truncated report's run and first result were written before the error: gone.
    assert (count(submitter, Run), count(submitter, Result)) == (1, 8)
