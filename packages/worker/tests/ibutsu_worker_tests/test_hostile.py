"""Hostile input, as an attacker who can upload reports, query, reach the metrics port and
write to the broker sends it, through one real worker process.

Every case asserts its exact outcome (the import ends ``error`` with the reason, or a query
answers with it), that the worker is still alive, and that nothing was left behind (no run,
result or artifact written by a refused import). Limits are small so bombs stay cheap.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from ibutsu_server import task_names
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.db.models import Artifact, Result, Run
from ibutsu_testing.services import (
    clear_redis_prefix,
    free_port,
    http_get,
    postgres_database,
    running_worker,
    service_env,
    settings_for,
    wait_for,
)
from ibutsu_worker.importing.junit import MAX_DEPTH, MAX_PROPERTIES, MAX_TOKEN_BYTES
from ibutsu_worker.submission import Outcome, Submitter
from ibutsu_worker_tests.archives import HOSTILE, Sample, file, sample
from ibutsu_worker_tests.corpus import corpus_files

CREDENTIALS = "prometheus:scrape-password-1"
LIMITS = {
    "IBUTSU_IMPORT_MAX_RESULTS": "50",
    "IBUTSU_IMPORT_MAX_ARCHIVE_MEMBERS": "100",
    "IBUTSU_IMPORT_MAX_ARCHIVE_BYTES": "2000000",
    "IBUTSU_IMPORT_MAX_ARTIFACT_BYTES": "200000",
    "IBUTSU_IMPORT_MAX_UPLOAD_BYTES": str(MAX_TOKEN_BYTES * 2),
}


@dataclass
class Worker:
    """The worker under attack, its database and its metrics port."""

    process: subprocess.Popen[bytes]
    submitter: Submitter
    port: int
    env: dict[str, str]

    def counts(self) -> tuple[int, int, int]:
        with self.submitter.db.engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                int(connection.scalar(select(func.count()).select_from(model)) or 0)
                for model in (Run, Result, Artifact)
            )

    def upload(self, name: str, content: bytes, project: str | None = None) -> Outcome:
        path = Path(self.env["IBUTSU_TEST_TMP"]) / f"{uuid.uuid4().hex[:6]}-{name}"
        path.write_bytes(content)
        project_id = self.submitter.ensure_project(project) if project else None
        import_id = self.submitter.submit(path, project_id=project_id)
        (outcome,) = self.submitter.wait([import_id], timeout=120)
        return outcome


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    prefix = f"ibutsu-hostile-{uuid.uuid4().hex[:8]}:"
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    with postgres_database() as name:
        env = service_env(
            name,
            prefix,
            IBUTSU_METRICS_PORT=str(port),
            IBUTSU_METRICS_BASIC_AUTH=CREDENTIALS,
            IBUTSU_TEST_TMP=str(tmp),
            **LIMITS,
        )
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        with running_worker("ibutsu_server:worker_app", env, tmp / "worker.log") as process:
            wait_for(lambda: http_get(port, "/healthz")[0] == 200, timeout=30)
            yield Worker(process, submitter, port, env)
        submitter.close()
    clear_redis_prefix(prefix)


def refused(
    worker: Worker, name: str, content: bytes, reason: str, project: str | None = None
) -> None:
    """Upload ``content``: it must end ``error`` with ``reason``, leave nothing, and the worker
    must live on."""
    before = worker.counts()
    outcome = worker.upload(name, content, project)
    assert outcome.status == "error", outcome
    assert outcome.message is not None and reason in outcome.message, outcome.message
    assert len(outcome.message) < 400
    assert worker.counts() == before
    assert worker.process.poll() is None


# --- XML ------------------------------------------------------------------------------------

CASE = b'<testcase classname="m" name="t"/>'
XML_CASES: list[tuple[str, bytes, str]] = [
    (
        "billion-laughs",
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;'
        b'&a;&a;&a;&a;">]><testsuite name="&b;"/>',
        "declares a DTD or entities",
    ),
    (
        "xxe-file",
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<testsuite name="&x;"/>',
        "declares a DTD or entities",
    ),
    (
        "xxe-parameter-entity",
        next(p for p in corpus_files() if p.name == "testXxe-oob.xml").read_bytes(),
        "not a JUnit report or Ibutsu archive",
    ),
    ("html-root", b"<html><body>hello</body></html>", "the root element is <html>"),
    ("truncated", b'<testsuite name="s">' + CASE + b"<testcase name=", "malformed XML"),
    (
        "binary",
        os.urandom(2048).replace(b"\x1f\x8b", b"  ").replace(b"<", b" "),
        "not a JUnit report or Ibutsu archive",
    ),
    ("empty", b"", "not a JUnit report or Ibutsu archive"),
    ("zip", b"PK\x03\x04" + bytes(100), "not a JUnit report or Ibutsu archive"),
    ("nul-reference", b'<testsuite name="a&#0;b"/>', "reference to invalid character number"),
    (
        "surrogate-reference",
        b'<testsuite name="a&#xD800;b"/>',
        "reference to invalid character number",
    ),
    ("invalid-utf8", b'<testsuite name="\xff\xfe"/>', "not well-formed (invalid token)"),
    (
        "huge-comment",
        b'<testsuite name="s"><!--'
        + b"x" * (MAX_TOKEN_BYTES + 1024)
        + b"-->"
        + CASE
        + b"</testsuite>",
        f"refused: more than {MAX_TOKEN_BYTES} bytes without an element or text",
    ),
    (
        "deep-nesting",
        b"<testsuites>"
        + b'<testsuite name="s">' * MAX_DEPTH
        + b"</testsuite>" * MAX_DEPTH
        + b"</testsuites>",
        f"nest deeper than {MAX_DEPTH} levels",
    ),
    (
        "many-properties",
        b'<testsuite name="s"><testcase name="t"><properties>'
        + b"".join(b'<property name="p%d" value="v"/>' % n for n in range(MAX_PROPERTIES + 1))
        + b"</properties></testcase></testsuite>",
        f"more than {MAX_PROPERTIES} <property> elements",
    ),
    (
        "too-many-results",
        b'<testsuite name="s">' + CASE * 51 + b"</testsuite>",
        "the limit is 50 per import (IBUTSU_IMPORT_MAX_RESULTS)",
    ),
    ("no-suite", b"<testsuites></testsuites>", "no <testsuite> element"),
]


@pytest.mark.parametrize(("name", "content", "reason"), XML_CASES, ids=[c[0] for c in XML_CASES])
def test_hostile_xml(worker: Worker, name: str, content: bytes, reason: str) -> None:
    refused(worker, f"{name}.xml", content, reason)


def test_a_test_name_too_long_for_the_index_imports_shortened(worker: Worker) -> None:
    name = "test_" + "é" * 3000
    report = f'<testsuite name="s"><testcase classname="m" name="{name}"/></testsuite>'.encode()
    outcome = worker.upload("long.xml", report)
    assert outcome.status == "done", outcome.message
    with worker.submitter.db.engine.connect() as connection:
        stored = connection.scalar(
            select(Result.test_id).where(Result.run_id == uuid.UUID(str(outcome.run_id)))
        )
    assert stored is not None and len(stored.encode()) <= 1000 and stored.startswith("m.test_é")


# --- archives -------------------------------------------------------------------------------

# Each of these is refused under the archive tests' limits, which this worker shares.
ARCHIVE_CASES = [(name, build, reason) for name, build, limits, reason in HOSTILE if not limits]


@pytest.mark.parametrize(
    ("name", "build", "reason"), ARCHIVE_CASES, ids=[c[0] for c in ARCHIVE_CASES]
)
def test_hostile_archive(worker: Worker, name: str, build: object, reason: str) -> None:
    assert callable(build)
    refused(worker, f"{name}.tar.gz", build(sample()), reason)


def _with_files(archive: Sample, count: int, size: int) -> bytes:
    extra = [file(f"{archive.run_id}/f{n}.log", bytes(size)) for n in range(count)]
    return archive.archive(extra)


LIMIT_CASES = [
    (
        "too-many-members",
        lambda a: _with_files(a, 100, 1),
        "more than 100 members (IBUTSU_IMPORT_MAX_ARCHIVE_MEMBERS)",
    ),
    (
        "gzip-bomb",
        lambda a: _with_files(a, 15, 150_000),
        "more than 2000000 bytes (IBUTSU_IMPORT_MAX_ARCHIVE_BYTES)",
    ),
    (
        "artifact-too-big",
        lambda a: _with_files(a, 1, 200_001),
        "over the limit of 200000 bytes per file (IBUTSU_IMPORT_MAX_ARTIFACT_BYTES)",
    ),
    ("gzip-of-gzip", lambda a: gzip.compress(a.archive()), "not a readable tar.gz"),
]


@pytest.mark.parametrize(("name", "build", "reason"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_archive_over_a_limit(worker: Worker, name: str, build: object, reason: str) -> None:
    assert callable(build)
    refused(worker, f"{name}.tar.gz", build(sample()), reason)


def test_an_archive_cannot_reach_another_project(worker: Worker) -> None:
    victim = sample()
    assert worker.upload("victim.tar.gz", victim.archive(), project="victim").status == "done"
    # The victim's project named in the archive, uploaded for another project.
    named = sample()
    named.run["metadata"]["project"] = "victim"
    refused(worker, "named.tar.gz", named.archive(), "names project 'victim'", project="attacker")
    # The victim's run id, its project left out: the ids belong to another project.
    reused = sample()
    reused.run["id"] = victim.run_id
    for result in reused.results:
        result["run_id"] = victim.run_id
    refused(
        worker,
        "reused.tar.gz",
        reused.archive(),
        "already belong to another project",
        project="attacker",
    )
    # A result id of the victim's, in a run of the attacker's own.
    stolen = sample()
    stolen.results[0]["id"] = victim.results[0]["id"]
    refused(
        worker,
        "stolen.tar.gz",
        stolen.archive(),
        "already belong to another run",
        project="attacker",
    )


# --- queries --------------------------------------------------------------------------------

QUERY_CASES = [
    (["password=secret"], 1, 600, "cannot be filtered on 'password'"),
    (["result=passed'; DROP TABLE results; --"], 1, 600, None),  # a value, compared as text
    (["id=1 OR 1=1"], 1, 600, "not a UUID"),
    (["metadata..x=1"], 1, 600, "bad JSON path"),
    ("result=passed", 1, 600, "must be a list"),
    (None, -1, 600, "page must be 1 or more"),
    (None, 1, 10**9, "page_size must be between"),
    (None, "1", 600, "page must be a whole number"),
]


@pytest.mark.parametrize(("filters", "page", "page_size", "reason"), QUERY_CASES)
def test_hostile_query(
    worker: Worker, filters: object, page: object, page_size: object, reason: str | None
) -> None:
    sent = worker.submitter.celery.send_task(
        task_names.QUERY_TASK, args=[filters, page, page_size, True, "results"]
    )
    answer = sent.get(timeout=60)
    if reason is None:
        assert answer["pagination"]["totalItems"] == 0
    else:
        assert reason in answer["error"]
    assert sent.backend.get_task_meta(sent.id).get("traceback") is None
    with worker.submitter.db.engine.connect() as connection:
        assert connection.scalar(text("SELECT to_regclass('results') IS NOT NULL"))
    assert worker.process.poll() is None


# --- HTTP -----------------------------------------------------------------------------------


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as client:
        client.sendall(request)
        chunks = []
        while chunk := client.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\n\r\n", b" 401 "),
        (b"GET /metrics/../metrics HTTP/1.1\r\n\r\n", b" 404 "),
        (b"GET /%2e%2e/metrics HTTP/1.1\r\n\r\n", b" 404 "),
        (b"GET /metrics HTTP/1.1\r\nAuthorization: Basic " + b"A" * 70_000 + b"\r\n\r\n", b" 431 "),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b" 501 "),
        (b"GARBAGE\r\n\r\n", b" 400 "),
    ],
)
def test_hostile_http(worker: Worker, request_bytes: bytes, status: bytes) -> None:
    answer = _raw(worker.port, request_bytes)
    assert status in answer.split(b"\r\n", 1)[0]
    assert http_get(worker.port, "/healthz")[0] == 200
    assert worker.process.poll() is None


# --- the broker -----------------------------------------------------------------------------


def test_a_message_naming_no_import_is_dropped(worker: Worker) -> None:
    for argument in ("not-a-uuid", {"id": 42}, str(uuid.uuid4()), None, {"no": "id"}):
        worker.submitter.celery.send_task(task_names.RUN_JUNIT_IMPORT, args=[argument])
    # The queue moves on: an import sent after them is done.
    report = b'<testsuite name="s">' + CASE + b"</testsuite>"
    assert worker.upload("after.xml", report).status == "done"
    assert worker.process.poll() is None


def _pool_child(worker: Worker) -> int | None:
    children = [
        int(child)
        for path in Path(f"/proc/{worker.process.pid}/task").glob("*/children")
        for child in path.read_text().split()
    ]
    return children[0] if len(children) == 1 else None


def test_a_report_that_kills_its_worker_stops_after_three_deliveries(worker: Worker) -> None:
    """The pool child dies in the middle of every delivery (as when a report gets it
    OOM-killed), its connection with it: Celery redelivers the message at once; the third
    death ends the import with the reason, instead of killing worker after worker."""
    report = b'<testsuite name="s">' + CASE * 3 + b"</testsuite>"
    path = Path(worker.env["IBUTSU_TEST_TMP"]) / "poison.xml"
    path.write_bytes(report)
    before = worker.counts()
    record = worker.submitter.store(path)
    import_id = str(record.id)
    engine = worker.submitter.db.engine

    def deliveries() -> int:
        with engine.connect() as connection:
            data = connection.scalar(
                text("SELECT data FROM imports WHERE id = :id"), {"id": import_id}
            )
        return int(((data or {}).get("deliveries") or {}).get("count", 0))

    def stuck_backend() -> int | None:
        with engine.connect() as connection:
            pid: int | None = connection.scalar(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO runs%'"
                )
            )
        return pid

    with engine.connect() as holder:
        # The runs table held, so that each delivery stops inside the import: there it dies.
        held = holder.begin()
        holder.execute(text("LOCK TABLE runs IN EXCLUSIVE MODE"))
        worker.submitter.enqueue(record, b"<")
        for delivery in (1, 2, 3):
            wait_for(lambda d=delivery: deliveries() == d, timeout=60)  # type: ignore[misc]
            backend = wait_for(stuck_backend, timeout=60)
            os.kill(wait_for(lambda: _pool_child(worker), timeout=30), signal.SIGKILL)
            # The dead process's connection goes too (the server would notice at its next
            # read; it is waiting for a lock, so it is told now).
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        (outcome,) = worker.submitter.wait([import_id], timeout=60)
        held.rollback()
    assert outcome.status == "error"
    assert outcome.message == (
        "the worker died while importing it, 3 times; it was stopped so that it cannot take "
        "down more workers (IBUTSU_IMPORT_MAX_DELIVERIES)"
    )
    assert worker.counts() == before
    assert worker.process.poll() is None
