"""Hostile input, as an attacker who can upload reports, query, reach the metrics port and
write to the broker sends it, through one real worker process.

Every case asserts its exact outcome (the import ends ``error`` with the reason, or a query
answers with it), that the worker is still alive, and that nothing was left behind (no run,
result or artifact written by a refused import). Limits are small so bombs stay cheap.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import resource
import signal
import socket
import string
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select, text

from ibutsu_server import task_names
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.db.models import Artifact, Result, Run, utcnow
from ibutsu_testing.services import (
    clean_environ,
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

T = TypeVar("T")

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


# --- amplification: what an upload costs, with the limits as deployed (issue 18) -------------

MB = 1_000_000
# No temporary file of the roomy worker may grow past this (RLIMIT_FSIZE: the kernel kills a
# process that writes beyond it), so a spool that grew with its input would fail the test.
MAX_FILE_BYTES = 128 * 1024 * 1024


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker with the default import limits, whose files may not pass MAX_FILE_BYTES."""
    prefix = f"ibutsu-roomy-{uuid.uuid4().hex[:8]}:"
    tmp = tmp_path_factory.mktemp("roomy")
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with postgres_database() as name, contextlib.ExitStack() as stack:
        env = service_env(
            name, prefix, IBUTSU_METRICS_PORT=str(port), IBUTSU_TEST_TMP=str(tmp), TMPDIR=str(tmp)
        )
        submitter = Submitter(settings_for(env))
        stack.callback(submitter.close)
        upgrade(submitter.db.engine)
        # Inherited by the worker as it starts; this process is limited only meanwhile.
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, hard))
        try:
            process = stack.enter_context(
                running_worker("ibutsu_server:worker_app", env, tmp / "worker.log")
            )
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        wait_for(lambda: http_get(port, "/healthz")[0] == 200, timeout=30)
        yield Worker(process, submitter, port, env)
    clear_redis_prefix(prefix)


def figure(row: int, text: str) -> None:
    """One of the issue's figures, printed (``-s`` shows them)."""
    print(f"\nrow {row}: {text}")


def _status(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def above_idle(worker: Worker, action: Callable[[], T]) -> tuple[T, float]:
    """``action``'s result and the pool child's peak memory above its idle size while it ran,
    in MB, as the import benchmark measures it: the idle child is replaced by a fresh one
    first (what earlier tests left in its heap would hide this action's growth), and its
    peak is reset (clear_refs), so only this action counts."""
    old = wait_for(lambda: _pool_child(worker), timeout=30)
    os.kill(old, signal.SIGKILL)
    child = wait_for(lambda: (found := _pool_child(worker)) != old and found, timeout=30)
    Path(f"/proc/{child}/clear_refs").write_text("5")
    idle = _status(child, "VmRSS")
    result = action()
    assert _pool_child(worker) == child  # the same process did the work
    return result, (_status(child, "VmHWM") - idle) / MB


def stored_bytes(worker: Worker, run_id: str | None) -> int:
    """What a run's rows hold, as text (the size PostgreSQL's COPY would carry)."""
    with worker.submitter.db.engine.connect() as connection:
        return int(
            connection.scalar(
                text(
                    "SELECT (SELECT octet_length(r::text) FROM runs r WHERE id = :run)"
                    " + (SELECT coalesce(sum(octet_length(r::text)), 0) FROM results r"
                    "    WHERE run_id = :run)"
                    " + (SELECT coalesce(sum(octet_length(a.content)"
                    "    + octet_length(a.filename) + octet_length(a.data::text)), 0)"
                    "    FROM artifacts a WHERE a.run_id = :run OR a.result_id IN"
                    "    (SELECT id FROM results WHERE run_id = :run))"
                ),
                {"run": run_id},
            )
            or 0
        )


def import_data(worker: Worker, outcome: Outcome) -> dict[str, Any]:
    with worker.submitter.db.engine.connect() as connection:
        data = connection.scalar(
            text("SELECT data FROM imports WHERE id = :id"), {"id": outcome.import_id}
        )
    return dict(data or {})


def test_row_1_a_suite_file_copied_into_every_case_is_cut_or_refused(roomy: Worker) -> None:
    report = b'<testsuite name="s" file="' + b"f" * 4 * MB + b'">' + b"<testcase/>" * 200
    report += b"</testsuite>"
    outcome = roomy.upload("file-attribute.xml", report)
    assert outcome.status == "done", outcome.message
    written = stored_bytes(roomy, outcome.run_id)
    figure(1, f"{len(report):,} B report, done, {written:,} B stored")
    assert written < 400_000  # was 796 MiB: 200 copies of the 4 MB file, now cut at 1 kB
    assert import_data(roomy, outcome)["stored_bytes"] < 400_000
    # The same 1 kB file over 200,000 empty cases would still store 100 times the report:
    # refused by the budget, nothing written.
    many = b'<testsuite name="s" file="' + b"f" * 1024 + b'">' + b"<testcase/>" * 200_000
    before = roomy.counts()
    outcome = roomy.upload("many-cases.xml", many + b"</testsuite>")
    assert outcome.status == "error" and outcome.message is not None
    assert "(IBUTSU_IMPORT_MAX_FOOTPRINT_RATIO)" in outcome.message
    assert roomy.counts() == before
    figure(1, f"{len(many):,} B report of 200,000 cases: error, 0 rows: {outcome.message}")


def test_row_2_json_documents_cost_memory_by_the_limits(roomy: Worker) -> None:
    archive = sample()
    documents = []
    for _ in range(8):
        result = {**archive.results[0], "id": str(uuid.uuid4())}
        result["metadata"] = {"flood": [{}] * 1_300_000}  # 4 MiB less a little
        documents.append(result)
    folder = archive.run_id
    extra = [
        file(f"{folder}/{doc['id']}/result.json", json.dumps(doc, separators=(",", ":")).encode())
        for doc in documents
    ]
    before = roomy.counts()
    outcome, peak = above_idle(roomy, lambda: roomy.upload("flood.tar.gz", archive.archive(extra)))
    assert outcome.status == "error" and outcome.message is not None
    assert "JSON documents hold at most 100000" in outcome.message
    assert roomy.counts() == before
    figure(2, f"8 x 4 MiB of {{}}: error, +{peak:.1f} MB above idle: {outcome.message}")
    assert peak < 60  # was +593 MiB
    # Documents as big as allowed, each just under the cap on values, are imported.
    archive = sample()
    for result in archive.results:
        result["metadata"]["padding"] = ["x" * 40] * 90_000
    outcome, peak = above_idle(roomy, lambda: roomy.upload("big.tar.gz", archive.archive()))
    assert outcome.status == "done", outcome.message
    figure(2, f"4 result.json of 90,000 values each: done, +{peak:.1f} MB above idle")
    assert peak < 150


def test_row_3_a_60_mib_failure_text_is_streamed(roomy: Worker) -> None:
    text_bytes = 60 * 1024 * 1024
    report = (
        b'<testsuite name="s"><testcase classname="c" name="t"><failure message="m">'
        + b"x" * text_bytes
        + b"</failure></testcase></testsuite>"
    )
    outcome, peak = above_idle(roomy, lambda: roomy.upload("long-failure.xml", report))
    assert outcome.status == "done", outcome.message
    written = stored_bytes(roomy, outcome.run_id)
    figure(3, f"done, +{peak:.1f} MB above idle, {written:,} B stored")
    assert peak < 60  # was +345 MiB
    assert text_bytes < written < text_bytes + 10_000  # the text once, as its artifact


def _tar_of_zeros(run_id: str, members: int, size: int) -> Iterator[bytes]:
    """A tar stream: a run.json, then ``members`` files of ``size`` zero bytes, made as it is
    read so that gigabytes never sit in memory."""
    run = json.dumps({"id": run_id}).encode()
    for name, length in [("run.json", len(run)), *((f"z{n}.bin", size) for n in range(members))]:
        info = tarfile.TarInfo(f"{run_id}/{name}")
        info.size = length
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        if name == "run.json":
            yield run + bytes(-length % tarfile.BLOCKSIZE)
            continue
        zeros = bytes(8 * 1024 * 1024)
        for _ in range(size // len(zeros)):
            yield zeros
    yield bytes(2 * tarfile.BLOCKSIZE)


def gzip_bomb(run_id: str, members: int, size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(packer.compress(piece) for piece in _tar_of_zeros(run_id, members, size)) + (
        packer.flush()
    )


def test_row_4_a_gzip_bomb_is_refused_having_spooled_and_written_nothing(roomy: Worker) -> None:
    limit = settings_for(roomy.env).import_limits.max_archive_bytes  # 2 GiB
    bomb = gzip_bomb(str(uuid.uuid4()), members=33, size=64 * 1024 * 1024)
    assert len(bomb) < 3 * MB
    before = roomy.counts()
    outcome, peak = above_idle(roomy, lambda: roomy.upload("bomb.tar.gz", bomb))
    assert outcome.status == "error"
    assert outcome.message == (
        f"the archive unpacks to more than {limit} bytes (IBUTSU_IMPORT_MAX_ARCHIVE_BYTES)"
    )
    assert roomy.counts() == before
    figure(4, f"{len(bomb):,} B bomb: error, +{peak:.1f} MB above idle, 0 rows: {outcome.message}")
    assert peak < 20  # was +225 MiB, and 2,040 MiB spooled (now none: RLIMIT_FSIZE holds)
    assert roomy.process.poll() is None


def test_row_5_slow_clients_never_fail_liveness(roomy: Worker) -> None:
    stop = threading.Event()
    closed_after: list[float] = []

    def trickle() -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", roomy.port)) as client:
            client.settimeout(0.2)
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100_000:
                try:
                    client.sendall(bytes([byte]))
                    if client.recv(1) == b"":
                        break
                except TimeoutError:
                    continue  # still open
                except OSError:
                    break
                if stop.is_set():
                    return
            closed_after.append(time.monotonic() - started)

    senders = [threading.Thread(target=trickle, daemon=True) for _ in range(100)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 60
    probes = 0
    try:
        # Liveness probed ten times a second until the last trickling client is cut.
        while len(closed_after) < 100:
            assert http_get(roomy.port, "/healthz") == (200, "ok\n")
            probes += 1
            assert time.monotonic() < deadline, "the trickling clients were not all cut"
            stop.wait(0.1)
        assert probes >= 10
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=5)
    figure(5, f"{probes} probes all 200; 100 trickling clients cut after {max(closed_after):.1f} s")
    assert max(closed_after) < 11.0  # the 10 s deadline, however they trickle (was 24 s)


def start_refused(env: dict[str, str]) -> str:
    """Start a worker with ``env``: it must refuse to start (status 2); its output."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ibutsu_server:worker_app", "worker"],
        env=clean_environ(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_row_6_a_password_with_a_semicolon_never_shows(worker: Worker) -> None:
    env = {**worker.env, "CELERY_BROKER_URL": "redis://:ab12;cd34@host:6379/11"}
    output = start_refused(env)
    figure(6, next(line for line in output.splitlines() if "CELERY_BROKER_URL" in line).strip())
    assert "redis://:***@host:6379/11" in output
    assert "ab12" not in output and "cd34" not in output  # was redis://:ab12;cd34:***@…


def test_row_7_a_huge_time_stores_no_infinity(worker: Worker) -> None:
    report = (
        b'<testsuite name="s"><testcase name="a" time="1.7e308"/>'
        b'<testcase name="b" time="1.7e308"/></testsuite>'
    )
    outcome = worker.upload("infinite.xml", report)
    assert outcome.status == "done"
    assert outcome.message == (
        "2 time= value(s) not a number of seconds from 0 to a year (the first: '1.7e308'): "
        "stored without one"
    )
    with worker.submitter.db.engine.connect() as connection:
        infinite = connection.scalar(
            text(
                "SELECT (SELECT count(*) FROM runs WHERE duration = 'Infinity'"
                " OR duration = 'NaN') + (SELECT count(*) FROM results"
                " WHERE duration = 'Infinity' OR duration = 'NaN')"
            )
        )
        duration = connection.scalar(
            text("SELECT duration FROM runs WHERE id = :id"), {"id": outcome.run_id}
        )
    figure(7, f"JUnit: done, runs.duration {duration}, {infinite} Infinity/NaN: {outcome.message}")
    assert infinite == 0 and duration == 0.0  # was Infinity
    archive = sample()
    archive.results[-1]["duration"] = 1.7e308
    refused(
        worker,
        "infinite.tar.gz",
        archive.archive(),
        "duration must be a number of seconds from 0 to a year, not 1.7e+308",
    )


def test_row_8_a_query_with_an_argument_it_does_not_take_answers_one_line(
    worker: Worker,
) -> None:
    sent = worker.submitter.celery.send_task(
        task_names.QUERY_TASK, args=[None, 1, 25, False, "results"], kwargs={"surprise": 1}
    )
    assert sent.get(timeout=60) == {
        "error": f"bad arguments for {task_names.QUERY_TASK}: got an unexpected keyword "
        "argument 'surprise'"
    }
    meta = sent.backend.get_task_meta(sent.id)
    figure(8, f"{meta['status']}, traceback {meta.get('traceback')}: {meta['result']}")
    assert meta["status"] == "SUCCESS" and meta.get("traceback") is None  # was a traceback


def test_row_9_numeric_settings_out_of_range_stop_the_worker(worker: Worker) -> None:
    env = {
        **worker.env,
        "CELERY_VISIBILITY_TIMEOUT": "99999999999999999999",
        "CELERY_WORKER_CONCURRENCY": "99999999",
        "IBUTSU_METRICS_PORT": "0",
    }
    output = start_refused(env)
    for problem in (
        "CELERY_WORKER_CONCURRENCY must be at least 1 and at most 256, got 99999999",
        "CELERY_VISIBILITY_TIMEOUT must be at least 10 and at most 86400, "
        "got 99999999999999999999",
        "IBUTSU_METRICS_PORT must be at least 1 and at most 65535, got 0",
    ):
        assert problem in output
    figure(9, " | ".join(line.strip() for line in output.splitlines() if "at most" in line))


def test_row_10_a_far_future_time_is_not_stored(worker: Worker) -> None:
    report = b'<testsuite name="s" timestamp="9999-12-31T00:00:00"><testcase name="t"/>'
    outcome = worker.upload("future.xml", report + b"</testsuite>")
    assert outcome.status == "done"
    assert outcome.message is not None
    assert "1 timestamp= value(s) not dates from 1970 to a day from now" in outcome.message
    with worker.submitter.db.engine.connect() as connection:
        start = connection.scalar(
            text("SELECT start_time FROM runs WHERE id = :id"), {"id": outcome.run_id}
        )
    figure(10, f"JUnit: done, run starts {start}: {outcome.message}")
    assert start < utcnow() + timedelta(days=1)  # the upload's time: pruned in its turn
    archive = sample()
    archive.results[-1]["start_time"] = "9999-12-31T00:00:00"
    refused(worker, "future.tar.gz", archive.archive(), "is not a date from 1970 to a day")


def test_row_11_metadata_naming_another_run_or_project_is_kept_apart(worker: Worker) -> None:
    victim = sample()
    assert worker.upload("victim.tar.gz", victim.archive(), project="victim").status == "done"
    attacker = sample()
    for result in attacker.results:
        result["metadata"] |= {"run": victim.run_id, "project": "victim"}
    outcome = worker.upload("claims.tar.gz", attacker.archive(), project="attacker")
    assert outcome.status == "done", outcome.message
    with worker.submitter.db.engine.connect() as connection:
        rows: list[tuple[dict[str, Any], uuid.UUID]] = [
            (row.data, row.run_id)
            for row in connection.execute(
                select(Result.data, Result.run_id).where(
                    Result.run_id == uuid.UUID(attacker.run_id)
                )
            )
        ]
    assert len(rows) == len(attacker.results)
    for data, run_id in rows:
        # What the API reads as the result's run and project: its own run, no project.
        assert data["run"] == str(run_id) == attacker.run_id and "project" not in data
        assert (data["reported_run"], data["reported_project"]) == (victim.run_id, "victim")
    figure(11, f"done; stored as {sorted(k for k in rows[0][0] if 'run' in k or 'proj' in k)}")


def test_row_12_suite_properties_are_stored_once(roomy: Worker) -> None:
    properties = b"".join(
        b'<property name="%s" value="%s"/>' % (b"%04d" % n + b"n" * 1020, b"v" * 4096)
        for n in range(1000)
    )
    report = (
        b'<testsuite name="s"><properties>'
        + properties
        + b"</properties>"
        + b"".join(b'<testcase classname="c" name="t%d"/>' % n for n in range(100))
        + b"</testsuite>"
    )
    assert len(report) > 5 * MB
    outcome = roomy.upload("properties.xml", report)
    assert outcome.status == "done", outcome.message
    written = stored_bytes(roomy, outcome.run_id)
    figure(12, f"{len(report):,} B report: done, {written:,} B stored")
    assert written < len(report)  # was 527 MB, 100 times the report
    assert import_data(roomy, outcome)["stored_bytes"] < len(report)


def test_row_13_a_tag_with_a_million_attributes_costs_no_memory(roomy: Worker) -> None:
    names = ("".join(letters) for letters in itertools.product(string.ascii_letters, repeat=4))
    attributes = b"".join(b' %s=""' % next(names).encode() for _ in range(1_000_000))
    report = b'<testsuite name="s"><testcase name="t"' + attributes + b"/></testsuite>"
    assert len(report) < MAX_TOKEN_BYTES
    before = roomy.counts()
    outcome, peak = above_idle(roomy, lambda: roomy.upload("attributes.xml", report))
    assert outcome.status == "error"
    assert outcome.message == (
        "refused: more than 100000 '=' in one tag or comment (a tag with that many attributes)"
    )
    assert roomy.counts() == before
    figure(13, f"{len(report):,} B report: error, +{peak:.1f} MB above idle: {outcome.message}")
    assert peak < 40  # was +221 MB


def test_row_14_a_query_costs_memory_by_what_it_returns(roomy: Worker) -> None:
    run_id = str(uuid.uuid4())
    with roomy.submitter.db.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO runs (id, start_time, created, data)"
                " VALUES (:run, now(), now(), '{}')"
            ),
            {"run": run_id},
        )
        # 1,000 results of 256 kB of metadata each (compressed on disk, not when read).
        connection.execute(
            text(
                "INSERT INTO results (id, run_id, test_id, result, start_time, data)"
                " SELECT gen_random_uuid(), :run, 't' || n, 'passed', now(),"
                " jsonb_build_object('blob', repeat('x', 262144))"
                " FROM generate_series(1, 1000) AS n"
            ),
            {"run": run_id},
        )

    def query() -> dict[str, Any]:
        sent = roomy.submitter.celery.send_task(
            task_names.QUERY_TASK, args=[[f"run_id={run_id}"], 1, 1000, False, "results"]
        )
        answer: dict[str, Any] = sent.get(timeout=120)
        return answer

    answer, peak = above_idle(roomy, query)
    assert len(answer["results"]) == 3 and answer["truncated"] is True
    assert answer["pagination"]["totalItems"] == 1000
    stored = len(json.dumps(answer, default=str))
    figure(
        14, f"{len(answer['results'])} items, truncated, {stored:,} B, +{peak:.1f} MB above idle"
    )
    assert peak < 30  # was +107 MB
