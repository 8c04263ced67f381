"""import_results through a real worker, real Redis and the real PostgreSQL."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ibutsu_server.db.models import Import, ImportFile, Result, Run
from ibutsu_testing.services import running_worker, settings_for, wait_for
from ibutsu_worker.cli import IMPORT_TASK, Operator
from ibutsu_worker_tests.corpus import REFUSED, SAMPLE_SUMMARY, corpus_files, expected_count

SAMPLE = Path(__file__).parent.parent.parent / "src/ibutsu_worker/samples/sample-junit.xml"


def _sample(tmp_path: Path) -> Path:
    from importlib import resources

    target = tmp_path / "sample-junit.xml"
    target.write_bytes((resources.files("ibutsu_worker.samples") / "sample-junit.xml").read_bytes())
    return target


def test_sample_import_lands_whole(operator: Operator, tmp_path: Path) -> None:
    import_id = operator.submit(_sample(tmp_path), project="acme")
    (outcome,) = operator.wait([import_id], timeout=60, progress=None)
    assert outcome.status == "done" and outcome.message is None
    assert outcome.summary == SAMPLE_SUMMARY
    session = operator.db.session()
    record = session.get(Import, uuid.UUID(import_id))
    assert record is not None and record.result_count == 8 and record.format == "junit"
    stored = session.scalar(select(ImportFile.content).where(ImportFile.import_id == record.id))
    assert stored is None  # cleared after success
    run = session.get(Run, record.run_id)
    assert run is not None and run.start_time is not None and run.duration == pytest.approx(1.84)
    operator.db.session.remove()


def test_redelivered_import_lands_once(operator: Operator, tmp_path: Path) -> None:
    import_id = operator.submit(_sample(tmp_path), project=None)
    # Two more deliveries of the same task, as after a crash or a retry.
    operator.celery.send_task(IMPORT_TASK, args=[import_id])
    operator.celery.send_task(IMPORT_TASK, args=[import_id])
    operator.wait([import_id], timeout=60, progress=None)
    marker = operator.submit(_sample(tmp_path), project=None)
    operator.wait([marker], timeout=60, progress=None)  # queued after the duplicates
    session = operator.db.session()
    assert session.scalar(select(func.count()).select_from(Run)) == 2
    assert session.scalar(select(func.count()).select_from(Result)) == 16
    operator.db.session.remove()


def test_whole_corpus(operator: Operator) -> None:
    files = corpus_files()
    import_ids = [operator.submit(path, project="corpus") for path in files]
    outcomes = operator.wait(import_ids, timeout=300, progress=None)
    session = operator.db.session()
    for path, outcome in zip(files, outcomes, strict=True):
        if path.name in REFUSED:
            assert outcome.status == "failed", path.name
            assert outcome.message
            assert (
                session.scalar(
                    select(func.count())
                    .select_from(Run)
                    .where(Run.data["import_id"].as_string() == outcome.import_id)
                )
                == 0
            )
            continue
        assert outcome.status == "done", (path.name, outcome.message)
        assert outcome.summary is not None
        assert outcome.summary["tests"] == expected_count(path), path.name
    operator.db.session.remove()


def test_bad_input_is_recorded_and_the_worker_goes_on(operator: Operator, tmp_path: Path) -> None:
    garbage = tmp_path / "report.xml"
    garbage.write_bytes(b"PK\x03\x04 this is a zip file, not a report")
    truncated = tmp_path / "truncated.xml"
    truncated.write_bytes(b'<testsuite name="s"><testcase name="a"/><testcase name="b">')
    bad_ids = [operator.submit(garbage, None), operator.submit(truncated, None)]
    good = operator.submit(_sample(tmp_path), None)
    outcomes = operator.wait([*bad_ids, good], timeout=60, progress=None)
    assert [o.status for o in outcomes] == ["failed", "failed", "done"]
    assert outcomes[0].message == "not a JUnit report or Ibutsu archive"
    assert outcomes[1].message is not None and "malformed XML" in outcomes[1].message
    session = operator.db.session()
    # The truncated report's first result was written before the error: it must be gone.
    assert session.scalar(select(func.count()).select_from(Result)) == 8
    operator.db.session.remove()


def _big_report(path: Path, cases: int) -> Path:
    with path.open("w") as out:
        out.write('<testsuites><testsuite name="big">\n')
        for n in range(cases):
            out.write(f'<testcase classname="pkg.Mod{n % 50}" name="test_{n}" time="0.01"/>\n')
        out.write("</testsuite></testsuites>\n")
    return path


def test_worker_killed_mid_import_completes_exactly_once(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    # Redis hands an unacknowledged task to another worker after this many seconds.
    env = {**service_environ, "CELERY_VISIBILITY_TIMEOUT": "3"}
    operator = Operator(settings_for(env))
    operator.upgrade()
    cases = 300_000
    report = _big_report(tmp_path / "big.xml", cases)
    with running_worker("ibutsu_server:worker_app", env, tmp_path / "first.log") as first:
        import_id = operator.submit(report, project="kill")
        wait_for(lambda: operator.outcome(import_id).status == "running", timeout=60)
        time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)  # the pod dies: main process and pool child
        first.wait()
    assert operator.outcome(import_id).status == "running", "import finished before the kill"
    with running_worker("ibutsu_server:worker_app", env, tmp_path / "second.log"):
        (outcome,) = operator.wait([import_id], timeout=180, progress=None)
    assert outcome.status == "done", outcome.message
    assert outcome.summary is not None and outcome.summary["tests"] == cases
    session = operator.db.session()
    assert session.scalar(select(func.count()).select_from(Run)) == 1
    assert session.scalar(select(func.count()).select_from(Result)) == cases
    operator.db.session.remove()
    operator.db.engine.dispose()
