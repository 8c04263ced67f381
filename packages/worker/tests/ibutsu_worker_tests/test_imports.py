"""Imports as a worker runs them, on the real PostgreSQL: called in the test's process, but
for the worker killed mid-import, which needs real worker processes."""

from __future__ import annotations

import uuid
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from ibutsu_server import task_names
from ibutsu_server.app_factory import FlaskCelery
from ibutsu_server.db.models import Artifact, Import, ImportFile, Result, Run, utcnow
from ibutsu_worker.importing import artifact_spool, junit
from ibutsu_worker.importing.job import CHUNK_SIZE, content_chunks
from ibutsu_worker.importing.row_writers import HELD_ROWS
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
    with submitter.db.transaction() as session:
        record = session.get(Import, uuid.UUID(outcome.import_id))
        assert record is not None and record.format == "junit" and record.data is not None
        assert record.data["result_count"] == 8 and record.data["run_id"] == [outcome.run_id]
        stored = session.scalar(select(ImportFile.content).where(ImportFile.import_id == record.id))
        assert stored is None  # cleared after success
        run = session.get(Run, uuid.UUID(str(outcome.run_id)))
        assert run is not None and run.project_id == project and run.source == "ci"
        assert run.duration is not None and abs(run.duration - 1.84) < 1e-9
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
    # (the duration is the report's own total; an update sums the results, as upstream's).
    columns = (Run.id, Run.summary, Run.start_time, Run.data, Run.env, Run.component, Run.source)
    with submitter.db.transaction() as session:
        tallied = session.execute(select(*columns).order_by(Run.id)).all()
        for run in tallied:
            update_summary(session, run.id, start_at_first=True)
        session.flush()
        recomputed = session.execute(select(*columns).order_by(Run.id)).all()
        assert recomputed == tallied


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
    with submitter.db.transaction() as session:
        run = session.get(Run, uuid.UUID(str(outcome.run_id)))
        assert run is not None and run.summary == outcome.summary and run.duration == cases
        assert count(submitter, Result) == cases


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


def _stored(submitter: Submitter, run_id: str | None) -> list[dict[str, Any]]:
    with submitter.db.engine.connect() as connection:
        rows = connection.execute(
            select(Result.data).where(Result.run_id == uuid.UUID(str(run_id))).order_by(Result.id)
        )
        return [row.data for row in rows]


def test_a_value_copied_into_every_result_is_refused_over_the_budget(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    report = tmp_path / "copied.xml"
    # The suite's file is cut at 1 kB, and 1 kB into each of 20,000 empty cases is still far
    # more than 8 times the report.
    cases = b"<testcase/>" * 20_000
    report.write_bytes(
        b'<testsuite name="s" file="' + b"f" * 4000 + b'">' + cases + b"</testsuite>"
    )
    outcome = run_import(report)
    assert outcome.status == "error"
    assert outcome.message is not None
    assert outcome.message.startswith("the report would store more than 8 times its size")
    assert outcome.message.endswith("(IBUTSU_IMPORT_MAX_FOOTPRINT_RATIO)")
    assert (count(submitter, Run), count(submitter, Result)) == (0, 0)


def test_run_and_project_in_a_reports_metadata_name_no_other_row(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    project = submitter.ensure_project("acme")
    elsewhere = str(uuid.uuid4())
    report = tmp_path / "claims.xml"
    report.write_text(
        '<testsuites><properties><property name="project" value="victim"/></properties>'
        '<testsuite name="s"><testcase name="t"><properties>'
        f'<property name="run" value="{elsewhere}"/><property name="project" value="acme"/>'
        "</properties></testcase></testsuite></testsuites>"
    )
    outcome = run_import(report, project_id=project)
    assert outcome.status == "done", outcome.message
    (data,) = _stored(submitter, outcome.run_id)
    assert data["run"] == outcome.run_id and data["reported_run"] == elsewhere
    assert data["project"] == "acme"
    with submitter.db.transaction() as session:
        run = session.get(Run, uuid.UUID(str(outcome.run_id)))
        assert run is not None and run.data == {"reported_project": "victim"}


def test_times_out_of_range_are_not_stored_and_the_import_says_so(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    report = tmp_path / "times.xml"
    report.write_text(
        '<testsuite name="s" timestamp="9999-12-31T00:00:00">'
        '<testcase name="a" time="1.7e308"/><testcase name="b" time="1.7e308"/>'
        '<testcase name="c" time="2"/></testsuite>'
    )
    outcome = run_import(report)
    assert outcome.status == "done"
    assert outcome.message is not None
    assert "2 time= value(s) not a number of seconds from 0 to a year" in outcome.message
    assert "1 timestamp= value(s) not dates from 1970 to a day from now" in outcome.message
    with submitter.db.transaction() as session:
        run = session.get(Run, uuid.UUID(str(outcome.run_id)))
        assert run is not None and run.duration == 2.0
        assert run.start_time < utcnow() + timedelta(days=1)
        durations = session.scalars(select(Result.duration).order_by(Result.test_id)).all()
        assert durations == [None, None, 2.0]


def test_a_text_too_big_for_memory_is_streamed_to_the_database_whole(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(junit, "TEXT_IN_MEMORY", 1000)
    monkeypatch.setattr(artifact_spool, "SLICE_BYTES", 4096)
    text = "".join(f"line {n}: é✓\t\\\n" for n in range(5000))
    report = tmp_path / "big-text.xml"
    report.write_text(
        '<testsuite name="s"><testcase name="t"><failure message="m">'
        + text.replace("&", "&amp;").replace("<", "&lt;")
        + "</failure></testcase></testsuite>"
    )
    outcome = run_import(report)
    assert outcome.status == "done", outcome.message
    with submitter.db.engine.connect() as connection:
        stored = connection.scalar(select(Artifact.content))
    assert stored == text.strip().encode()


def test_a_stored_report_of_many_slices_reads_back_whole(
    submitter: Submitter, tmp_path: Path
) -> None:
    # Compressible, as reports are (PostgreSQL stores it compressed), and not a whole number
    # of slices long.
    content = b"".join(b"<testcase name='t%d'/>\n" % n for n in range(260_000))
    assert len(content) > 3 * CHUNK_SIZE and len(content) % CHUNK_SIZE
    report = tmp_path / "big.xml"
    report.write_bytes(content)
    record = submitter.store(report)
    with submitter.db.transaction() as session:
        file_id = session.scalar(select(ImportFile.id).where(ImportFile.import_id == record.id))
    assert file_id is not None
    head = content[:CHUNK_SIZE]
    chunks = list(content_chunks(submitter.db.engine, file_id, len(content), head))
    assert b"".join(chunks) == content
    assert [len(chunk) for chunk in chunks[:-1]] == [CHUNK_SIZE] * (len(chunks) - 1)


# A run's duration as upstream's importer has it: the report's own total time.
DURATION_CASES = {
    "the root's time": (
        '<testsuites time="9.5"><testsuite name="a" time="3"><testcase name="x" time="1"/>'
        '</testsuite><testsuite name="b" time="4"><testcase name="y" time="1"/></testsuite>'
        "</testsuites>",
        9.5,
    ),
    "else the sum of its top suites' times (nested ones are inside them)": (
        '<testsuites><testsuite name="a" time="3"><testsuite name="a1" time="2">'
        '<testcase name="x" time="0.5"/></testsuite></testsuite>'
        '<testsuite name="b" time="4"><testcase name="y" time="1"/></testsuite></testsuites>',
        7.0,
    ),
    "a <testsuite> root's own time": (
        '<testsuite name="a" time="0.057"><testcase name="x" time="0.006"/>'
        '<testcase name="y" time="0.002"/></testsuite>',
        0.057,
    ),
    "else the sum of its cases' times": (
        '<testsuites><testsuite name="a"><testcase name="x" time="0.25"/>'
        '<testcase name="y" time="0.5"/></testsuite><testsuite name="b">'
        '<testcase name="z" time="1"/></testsuite></testsuites>',
        1.75,
    ),
    "a root's time of 0 is no total (upstream's rule)": (
        '<testsuites time="0"><testsuite name="a" time="2"><testcase name="x" time="1"/>'
        "</testsuite></testsuites>",
        2.0,
    ),
}


@pytest.mark.parametrize("case", sorted(DURATION_CASES))
def test_a_runs_duration_is_the_reports_own_total(
    run_import: ImportRunner,
    submitter: Submitter,
    worker_app: FlaskCelery,
    tmp_path: Path,
    case: str,
) -> None:
    content, expected = DURATION_CASES[case]
    report = tmp_path / "report.xml"
    report.write_text(content)
    outcome = run_import(report)
    assert outcome.status == "done", outcome.message
    with submitter.db.transaction() as session:
        run = session.get(Run, uuid.UUID(str(outcome.run_id)))
        assert run is not None and run.duration == pytest.approx(expected)
    # update_run sums the results, as upstream's update_run does.
    worker_app.tasks[task_names.UPDATE_RUN].apply(args=[str(outcome.run_id)]).get()
    with submitter.db.transaction() as session:
        cases = session.scalar(select(func.sum(Result.duration)).where(Result.run_id == run.id))
        assert session.get(Run, run.id).duration == pytest.approx(cases)  # type: ignore[union-attr]


def test_a_long_report_streamed_keeps_its_suites_total(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    """Results streamed past the held rows (the run inserted before them): the total comes
    after the last suite and still lands."""
    report = tmp_path / "long.xml"
    with report.open("w") as out:
        out.write('<testsuites><testsuite name="a" time="12.5">')
        out.writelines(f'<testcase name="t{n}" time="0.001"/>' for n in range(HELD_ROWS + 10))
        out.write('</testsuite><testsuite name="b" time="0.5"/></testsuites>')
    outcome = run_import(report)
    assert outcome.status == "done", outcome.message
    with submitter.db.transaction() as session:
        run = session.get(Run, uuid.UUID(str(outcome.run_id)))
        assert run is not None and run.duration == pytest.approx(13.0)
