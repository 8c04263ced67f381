"""The contract with a running Ibutsu: every message upstream's API and beat sent
(``testdata/ibutsu-upstream/messages.json``) replayed into a real worker, on a database created by
upstream's own schema (``schema.sql``, revision d18de2b3253f), and every field the API and
frontend read back checked (``CONTRACT.md``).

The tests run in file order, as the messages were recorded: one database, one worker.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.models import (
    SUMMARY_KEYS,
    Artifact,
    Import,
    ImportFile,
    Project,
    Result,
    Run,
    utcnow,
)
from ibutsu_server.db.schema import UPSTREAM_REVISION
from ibutsu_testing.services import (
    clear_redis_prefix,
    postgres_database,
    psql,
    running_worker,
    service_env,
    settings_for,
    wait_for,
)
from ibutsu_worker_tests.archives import Sample
from ibutsu_worker_tests.builders import add_run

# Upstream's messages and schema, in the test's sandbox at its repository path (see BUILD).
UPSTREAM = Path("testdata/ibutsu-upstream")
MESSAGES: list[dict[str, Any]] = json.loads((UPSTREAM / "messages.json").read_text())
PLACEHOLDER = re.compile(r"<[a-z-]+>")

# The acceptance report upstream imported, as pytest writes it.
JUNIT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="2"
 tests="8" time="0.057" timestamp="2026-12-01T10:58:35.000000+00:00" hostname="ci">
<testcase classname="test_sample" name="test_login_ok" time="0.006"/>
<testcase classname="test_sample" name="test_login_locked" time="0.001"><failure
 message="assert 401 == 423">def test_login_locked():
&gt;       assert login("locked") == 423
E       assert 401 == 423</failure><system-out>login as locked</system-out></testcase>
<testcase classname="test_sample" name="test_rate_limit" time="0.001"><error
 message="failed on setup with &quot;RuntimeError: no redis&quot;">RuntimeError: no redis</error>
</testcase>
<testcase classname="test_sample" name="test_export_csv" time="0.000"><skipped type="pytest.skip"
 message="needs the reporting service">test_sample.py:26: needs the reporting service</skipped>
</testcase>
<testcase classname="test_sample" name="test_unicode_names" time="0.000"><skipped
 type="pytest.xfail" message="known bug"/></testcase>
<testcase classname="test_sample" name="test_xpass" time="0.000"/>
<testcase classname="test_sample" name="test_pagination[1]" time="0.000"/>
<testcase classname="test_sample" name="test_pagination[2]" time="0.000"/>
</testsuite></testsuites>"""


@dataclass
class Ibutsu:
    """Upstream's database, a real worker, a producer, and the values of the placeholders."""

    engine: Engine
    producer: Celery
    values: dict[str, str] = field(default_factory=dict)
    archive: bytes = b""

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def substitute(self, value: Any) -> Any:
        """A recorded argument with its placeholders replaced by this database's values."""
        if isinstance(value, dict) and value.get("__type__") == "datetime":
            return utcnow()  # Kombu encodes it back as {"__type__": "datetime", ...}
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda match: self.values[match.group(0)], value)
        return value

    def replay(self, phase: str, task: str) -> list[AsyncResult]:
        """Send the phase's recorded messages for ``task`` as upstream sent them."""
        sent = []
        for message in MESSAGES:
            if message["phase"] == phase and message["task"] == task:
                assert message["protocol"] == "v2" and message["queue"] == "celery"
                sent.append(
                    self.producer.send_task(
                        message["task"],
                        args=self.substitute(message["args"]),
                        kwargs=self.substitute(message["kwargs"]),
                        countdown=5 if message["countdown_set"] else None,
                    )
                )
        assert sent, (phase, task)
        return sent

    def store_import(self, filename: str, content: bytes, data: dict[str, Any]) -> str:
        """An upload stored as the API stores it, before it sends the import task."""
        with self.session() as session:
            record = Import(
                id=uuid.uuid4(),
                filename=filename,
                format="",
                data=data,
                status="pending",
                created=utcnow(),
            )
            session.add(record)
            session.flush()
            session.add(ImportFile(id=uuid.uuid4(), import_id=record.id, content=content))
            session.commit()
            return str(record.id)

    def finished(self, import_id: str) -> Import:
        def done() -> Import | None:
            with self.session() as session:
                record = session.get(Import, uuid.UUID(import_id))
                return record if record and record.status in ("done", "error") else None

        return wait_for(done, timeout=60)


def _recorded(phase: str, task: str) -> dict[str, Any]:
    return next(m for m in MESSAGES if m["phase"] == phase and m["task"] == task)


@pytest.fixture(scope="module")
def ibutsu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ibutsu]:
    prefix = f"ibutsu-contract-{uuid.uuid4().hex[:8]}:"
    with postgres_database() as name:
        psql(name, "-f", str(UPSTREAM / "schema.sql"))
        psql(name, "-c", f"INSERT INTO alembic_version VALUES ('{UPSTREAM_REVISION}')")
        env = service_env(name, prefix)
        settings = settings_for(env)
        assert settings.database is not None
        engine = make_engine(settings.database)
        log = tmp_path_factory.mktemp("contract") / "worker.log"
        with running_worker("ibutsu_server:worker_app", env, log):
            yield Ibutsu(engine, create_celery(settings))
        engine.dispose()
    clear_redis_prefix(prefix)


def test_junit_upload(ibutsu: Ibutsu) -> None:
    with ibutsu.session() as session:
        project = Project(id=uuid.uuid4(), name="acceptance", title="Acceptance")
        session.add(project)
        session.commit()
    recorded = _recorded("junit", "ibutsu_server.tasks.importers.run_junit_import")
    upload = recorded["args"][0]["metadata"]
    ibutsu.values["<project>"] = str(project.id)
    import_id = ibutsu.store_import("junit-pytest.xml", JUNIT, ibutsu.substitute(upload))
    ibutsu.values["<junit-import>"] = import_id
    ibutsu.replay("junit", "ibutsu_server.tasks.importers.run_junit_import")
    record = ibutsu.finished(import_id)

    # The import, as the API shows it: done, data.run_id a list, nothing else of ours needed.
    assert record.status == "done" and record.format == "junit"
    data = record.data or {}
    assert data["project_id"] == str(project.id) and data["source"] == "acceptance-junit"
    assert data["metadata"] == upload["metadata"]
    assert isinstance(data["run_id"], list) and len(data["run_id"]) == 1
    run_id = data["run_id"][0]
    ibutsu.values["<junit-run>"] = run_id
    with ibutsu.session() as session:
        run = session.get(Run, uuid.UUID(run_id))
        assert run is not None and run.project_id == project.id
        assert run.source == "acceptance-junit"
        assert run.start_time == datetime(2026, 12, 1, 10, 58, 35)  # the report's own
        assert run.summary is not None and set(run.summary) == set(SUMMARY_KEYS)
        assert run.summary == {
            "tests": 8, "failures": 1, "errors": 1, "skips": 1, "xfailures": 1, "xpasses": 0,
            "passes": 4, "pass_percent": 50, "collected": 8, "not_run": 0,
        }  # fmt: skip
        assert run.data == upload["metadata"]
        assert run.duration == pytest.approx(0.057)  # the suite's time, as upstream's
        results = {
            r.test_id: r for r in session.scalars(select(Result).where(Result.run_id == run.id))
        }
        recorded_rows = _recorded("query", "ibutsu_server.tasks.query.query_task")["meta"]["result"]
        expected_ids = {row["test_id"] for row in recorded_rows["results"]}
        assert set(results) == expected_ids  # history and compare views match upstream's runs
        for row in recorded_rows["results"]:
            ours = results[row["test_id"]]
            assert ours.project_id == project.id and ours.source == row["source"]
            assert ours.data is not None
            # fspath, line, run, the upload's metadata, skip_reason where skipped.
            assert {k: ours.data.get(k) for k in row["metadata"]} == {
                k: (run_id if k == "run" else v) for k, v in row["metadata"].items()
            }
            expected = {"test_sample.test_unicode_names": "xfailed"}.get(row["test_id"])
            assert ours.result == (expected or row["result"])  # an xfail stays one
        failed = results["test_sample.test_login_locked"]
        artifacts = session.execute(
            select(Artifact.filename, Artifact.data, Artifact.content).where(
                Artifact.result_id == failed.id
            )
        ).all()
        assert sorted(a.filename for a in artifacts) == ["system-out.log", "traceback.log"]
        for artifact in artifacts:  # stored once each, as the frontend's tabs read them
            assert artifact.data == {"contentType": "text/plain", "resultId": str(failed.id)}
        stored = session.scalar(select(ImportFile.content).where(ImportFile.import_id == record.id))
        assert stored is None
    # Upstream's worker then clears the file; ours already has, in the import's transaction.
    (cleared,) = ibutsu.replay("junit", "ibutsu_server.tasks.db.clear_import_file_content")
    assert cleared.get(timeout=30) == f"No content to clear for import {import_id}"


def _acceptance_archive(run_id: str) -> Sample:
    outcomes = ["passed", "passed", "passed", "failed", "error", "skipped", "xfailed", "xpassed"]
    results = [
        {
            "id": str(uuid.uuid4()),
            "test_id": f"test_archive_{n}",
            "result": outcome,
            "run_id": run_id,
            "start_time": f"2026-12-01T10:58:3{n}.819052",
            "duration": 0.002,
            "params": {},
            "metadata": {"fspath": "test_archive.py", "line": n, "run": run_id},
            "source": "acceptance-src",
        }
        for n, outcome in enumerate(outcomes)
    ]
    run = {
        "id": run_id,
        "component": "login",
        "env": "ci",
        "source": "acceptance-src",
        "start_time": "2026-12-01T10:58:35.819052",
        "duration": 0.0174,
        "metadata": {"component": "login", "env": "ci", "project": "acceptance"},
        "summary": {"collected": 8, "tests": 8},
    }
    failed = str(results[3]["id"])
    return Sample(run, results, {"session.log": b"8 collected"}, {failed: {"traceback.log": b"E"}})


@pytest.mark.parametrize(
    ("phase", "placeholder"),
    [("archive", "<archive-import>"), ("archive-reimport", "<archive-reimport>")],
)
def test_archive_upload_and_reupload(ibutsu: Ibutsu, phase: str, placeholder: str) -> None:
    run_id = ibutsu.values.setdefault("<archive-run>", str(uuid.uuid4()))
    # The same archive both times: upstream duplicated every result on the second upload.
    ibutsu.archive = ibutsu.archive or _acceptance_archive(run_id).archive()
    recorded = _recorded(phase, "ibutsu_server.tasks.importers.run_archive_import")
    upload = ibutsu.substitute(recorded["args"][0]["metadata"])
    import_id = ibutsu.store_import(f"{run_id}.tar.gz", ibutsu.archive, upload)
    ibutsu.values[placeholder] = import_id
    ibutsu.replay(phase, "ibutsu_server.tasks.importers.run_archive_import")
    record = ibutsu.finished(import_id)
    assert record.status == "done" and record.format == "archive"
    assert (record.data or {})["run_id"] == [run_id]
    with ibutsu.session() as session:
        run = session.get(Run, uuid.UUID(run_id))
        assert run is not None
        assert (run.component, run.env, run.source) == ("login", "ci", "acceptance-src")
        assert run.project_id == uuid.UUID(ibutsu.values["<project>"])
        # Imported twice, counted once: upstream's run shows tests 16 here.
        assert run.summary == {
            "tests": 8, "failures": 1, "errors": 1, "skips": 1, "xfailures": 1, "xpasses": 1,
            "passes": 3, "pass_percent": 37, "collected": 8, "not_run": 0,
        }  # fmt: skip
        assert run.data is not None and run.data["jenkins"] == upload["metadata"]["jenkins"]
        assert (
            session.scalar(select(func.count()).select_from(Result).where(Result.run_id == run.id))
            == 8
        )
        artifacts = session.scalar(
            select(func.count())
            .select_from(Artifact)
            .where(
                (Artifact.run_id == run.id)
                | Artifact.result_id.in_(select(Result.id).where(Result.run_id == run.id))
            )
        )
        assert artifacts == 2  # stored once, replaced on re-import
    # Upstream's worker sends these after an archive; the API depends on neither.
    ibutsu.replay(phase, "ibutsu_server.tasks.runs.update_run")
    (cleared,) = ibutsu.replay(phase, "ibutsu_server.tasks.db.clear_import_file_content")
    assert cleared.get(timeout=30).startswith("No content to clear")


def test_query_task_pages_in_the_shape_the_api_returns(ibutsu: Ibutsu) -> None:
    recorded = [m for m in MESSAGES if m["phase"] == "query"]
    results = ibutsu.replay("query", "ibutsu_server.tasks.query.query_task")
    for message, result in zip(recorded, results, strict=True):
        page = result.get(timeout=30)
        expected = message["meta"]["result"]
        table = message["args"][4]
        assert set(page) == set(expected) == {table, "pagination"}
        assert page["pagination"] == expected["pagination"]
        ours = {row["id"]: row for row in page[table]}
        assert len(ours) == len(expected[table])
        for row in page[table]:
            assert set(row) == set(expected[table][0])  # the API's serialisation, key for key
            assert isinstance(row["start_time"], datetime)
        if table == "runs":
            assert all(set(SUMMARY_KEYS) <= set(row["summary"]) for row in page["runs"])


def _wait_for_summary(ibutsu: Ibutsu, run_id: uuid.UUID, tests: int) -> dict[str, Any]:
    def stored() -> dict[str, Any] | None:
        with ibutsu.session() as session:
            summary = session.scalar(select(Run.summary).where(Run.id == run_id))
            return summary if summary and summary.get("tests") == tests else None

    return wait_for(stored, timeout=60)


def _api_run(ibutsu: Ibutsu, results: int, **fields: Any) -> uuid.UUID:
    """A run posted through the API: its client's summary, then its results."""
    with ibutsu.session() as session:
        start = utcnow() - timedelta(minutes=10)
        return add_run(session, ["passed"] * results, start=start, **fields)


def test_a_run_posted_through_the_api_is_updated_after_five_seconds(ibutsu: Ibutsu) -> None:
    run_id = _api_run(ibutsu, 3, summary={"collected": 5})
    ibutsu.values["<api-run>"] = str(run_id)
    (message,) = ibutsu.replay("run-api", "ibutsu_server.tasks.runs.update_run")
    summary = _wait_for_summary(ibutsu, run_id, 3)
    assert (summary["collected"], summary["not_run"], summary["pass_percent"]) == (5, 2, 100)
    assert message.state in ("PENDING", "SUCCESS")  # update_run stores no result


@pytest.mark.parametrize(
    "task",
    [
        "ibutsu_server.tasks.runs.update_run",
        "ibutsu_server.tasks.results.add_result_start_time",
        "ibutsu_server.tasks.runs.sync_aborted_runs",
        "ibutsu_server.tasks.db.prune_old_import_files",
        "ibutsu_server.tasks.db.prune_old_files",
        "ibutsu_server.tasks.db.prune_old_results",
        "ibutsu_server.tasks.db.prune_old_runs",
    ],
)
def test_the_admin_pages_run_task_sends_keywords(ibutsu: Ibutsu, task: str) -> None:
    phase = f"run-task:{task.rsplit('.', 1)[1]}"
    stale = old_import = None
    if task.endswith("update_run"):
        # update_run stores no result (as upstream's, whose result is always None): its
        # effect is the summary, broken here on purpose and repaired by the task.
        junit_run = uuid.UUID(ibutsu.values["<junit-run>"])
        with ibutsu.session() as session:
            run = session.get(Run, junit_run)
            assert run is not None
            run.summary = {"tests": 0}
            session.commit()
        ibutsu.replay(phase, task)
        _wait_for_summary(ibutsu, junit_run, 8)
        return
    if task.endswith("sync_aborted_runs"):
        stale = _api_run(ibutsu, 4, summary={"tests": 1})
        ibutsu.values["<stale-run>"] = str(stale)
    if task.endswith("prune_old_import_files"):
        old_import = ibutsu.store_import("old.xml", b"<testsuite/>", {})
        with ibutsu.session() as session:
            record = session.get(Import, uuid.UUID(old_import))
            assert record is not None
            record.created = utcnow() - timedelta(days=30)
            session.commit()
    (result,) = ibutsu.replay(phase, task)
    outcome = result.get(timeout=60)
    # The API's GET /api/task/{id} merges a result into its answer: a dict, or nothing.
    assert outcome is None or isinstance(outcome, dict)
    if stale is not None:
        assert isinstance(outcome, dict) and outcome["enqueued"] >= 1
        _wait_for_summary(ibutsu, stale, 4)  # update_run, sent with upstream's countdown
    if old_import is not None:
        assert isinstance(outcome, dict) and outcome["deleted"] == {"import_files": 1, "imports": 1}
    assert result.state == "SUCCESS"


def test_a_query_that_cannot_be_answered_stores_its_reason_and_no_traceback(
    ibutsu: Ibutsu,
) -> None:
    result = ibutsu.producer.send_task(
        "ibutsu_server.tasks.query.query_task",
        args=[["password=secret"], 1, 600, True, "results"],
    )
    assert result.get(timeout=30) == {
        "error": "results cannot be filtered on 'password'; allowed: id, project_id, run_id, "
        "test_id, result, params, duration, start_time, source, env, component, metadata.*"
    }
    meta = result.backend.get_task_meta(result.id)
    assert meta["status"] == "SUCCESS" and meta.get("traceback") is None
