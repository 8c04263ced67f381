"""``ibutsu-tasks`` as a user runs it: the demo on the embedded default, and its errors."""

from __future__ import annotations

import argparse
import json
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.models import Import, Project
from ibutsu_server.settings import DatabaseSettings, Role, load_settings
from ibutsu_testing.private import PrivateRedis
from ibutsu_testing.services import clean_environ, free_port, running_worker, settings_for
from ibutsu_worker.cli import build_parser
from ibutsu_worker.process.metrics_dir import MULTIPROC_VAR
from ibutsu_worker.submission import PUBLISH_PATIENCE_SECONDS
from ibutsu_worker_tests.corpus import REFUSED, SAMPLE_SUMMARY, corpus_files, expected_count

KEYS = {"file", "import_id", "status", "message", "run_id", "summary"}


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A JUnit report of one passing case, named r.xml."""
    path = tmp_path / "r.xml"
    path.write_text('<testsuite name="s"><testcase name="t"/></testsuite>')
    return path


@pytest.fixture
def upgraded(service_environ: dict[str, str]) -> dict[str, str]:
    """``service_environ``, its database given the schema by `ibutsu-tasks db upgrade`."""
    assert _cli("db", "upgrade", **service_environ).returncode == 0
    return service_environ


def _database(env: dict[str, str]) -> DatabaseSettings:
    settings = settings_for(env)
    assert settings.database is not None
    return settings.database


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ibutsu_worker.cli", *args],
        env=clean_environ(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    done = _cli("demo", "--json", IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "running embedded" in done.stderr
    (line,) = done.stdout.strip().splitlines()
    report = json.loads(line)
    assert set(report) == KEYS
    assert report["status"] == "done"
    assert report["summary"] == SAMPLE_SUMMARY
    assert (tmp_path / "ibutsu.sqlite3").exists()


def test_demo_imports_the_whole_corpus(tmp_path: Path) -> None:
    files = corpus_files()
    done = _cli("demo", "--json", *map(str, files), IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(reports) == len(files)
    for path, report in zip(files, reports, strict=True):
        assert report["file"] == path.name
        if path.name in REFUSED:
            assert report["status"] == "error" and report["message"]
        else:
            assert report["status"] == "done", report
            assert report["summary"]["tests"] == expected_count(path)


def test_configuration_errors_are_listed_without_a_traceback() -> None:
    done = _cli(
        "status",
        "00000000-0000-0000-0000-000000000000",
        POSTGRESQL_HOST="db",
        POSTGRESQL_PASSWORD="pg-s3cret",
    )
    assert done.returncode == 2
    assert "CELERY_BROKER_URL is not set" in done.stderr
    assert "POSTGRESQL_USER is not set" in done.stderr
    assert "Traceback" not in done.stderr and "pg-s3cret" not in done.stderr


def test_missing_schema_and_unknown_import_are_one_line_errors(tmp_path: Path) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    done = _cli("status", unknown, IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert done.returncode == 1
    assert "run `ibutsu-tasks db upgrade`" in done.stderr
    upgraded = _cli("db", "upgrade", IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert upgraded.returncode == 0, upgraded.stderr
    assert "managed by ibutsu-tasks (revision 0001)" in upgraded.stdout
    done = _cli("status", unknown, IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert done.returncode == 1
    assert f"ibutsu-tasks: no import {unknown}" in done.stderr
    assert "Traceback" not in done.stderr


def test_unreachable_broker_is_waited_for_a_minute_then_the_import_is_named_as_error(
    upgraded: dict[str, str], report: Path
) -> None:
    closed = "redis://:broker-s3cret@127.0.0.1:1/0"  # nothing listens on port 1
    env = {**upgraded, "CELERY_BROKER_URL": closed}
    started = time.monotonic()
    done = _cli("import", str(report), "--json", **env)
    waited = time.monotonic() - started
    assert done.returncode == 1
    assert waited >= PUBLISH_PATIENCE_SECONDS  # as the README promises, not Kombu's 4 s
    assert "the broker at 127.0.0.1:1 does not answer (" in done.stderr
    assert f"trying again for up to {PUBLISH_PATIENCE_SECONDS:.0f} s" in done.stderr
    assert "Traceback" not in done.stderr and "broker-s3cret" not in done.stderr
    (line,) = done.stdout.strip().splitlines()
    printed = json.loads(line)
    assert (printed["file"], printed["status"]) == (str(report), "error")
    assert (
        "cannot queue r.xml: the broker at 127.0.0.1:1 is unreachable" in done.stderr
        and f"import {printed['import_id']} marked error" in done.stderr
    )
    engine = make_engine(_database(upgraded))
    with engine.connect() as connection:
        rows: list[Any] = list(connection.execute(select(Import.id, Import.status, Import.data)))
    engine.dispose()
    assert [(str(id_), status, data["error"]) for id_, status, data in rows] == [
        (printed["import_id"], "error", "could not be queued: the broker is unreachable")
    ]


def test_a_broker_that_comes_up_while_waited_for_gets_the_import(
    upgraded: dict[str, str], report: Path, tmp_path: Path
) -> None:
    broker = PrivateRedis(free_port(), tmp_path, durable=False)
    env = {**upgraded, "CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": broker.url}
    with _Running(["import", str(report)], env) as running:
        running.wait_for_line(f"the broker at 127.0.0.1:{broker.port} does not answer")
        # Still trying after Kombu's own 4 s, and saying so: only now does the broker start.
        running.wait_for_line("still does not answer after", timeout=30)
        broker.start()
        try:
            assert running.finish(timeout=60) == 0, running.stderr()
            queued = redis.Redis.from_url(broker.url).llen(
                f"{upgraded['IBUTSU_REDIS_KEY_PREFIX']}celery"
            )
        finally:
            broker.stop()
    assert "queued as import" in running.stdout
    assert queued == 1


def test_import_wait_says_when_no_worker_consumes_the_queue_and_shows_progress(
    upgraded: dict[str, str], report: Path, tmp_path: Path
) -> None:
    with _Running(["import", str(report), "--wait"], upgraded) as running:
        running.wait_for_stdout("queued as import", timeout=60)
        # Within 10 s of queuing, not after --timeout (600 s).
        running.wait_for_line("no worker consumes queue 'celery' on 127.0.0.1:", timeout=10)
        running.wait_for_line("waiting 5 s: 1 pending", timeout=10)
        with running_worker("ibutsu_server:worker_app", upgraded, tmp_path / "w.log"):
            assert running.finish(timeout=120) == 0, running.stderr()
    assert "[1/1] r.xml: done" in running.stderr()
    assert "r.xml: done (run " in running.stdout


class _Running:
    """``ibutsu-tasks`` running in the background, its standard error read line by line as it
    comes, so a test can wait for a line with a deadline."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.stdout = ""

    def __enter__(self) -> _Running:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ibutsu_worker.cli", *self.args],
            env=clean_environ(**self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.reader = threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True)
        self.reader.start()
        return self

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float = 30) -> str:
        """The first line of standard error holding ``text``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in self.seen if text in line), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {text!r} within {timeout} s:\n{self.stderr()}")
            try:
                self.seen.append(self.lines.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                continue

    def wait_for_stdout(self, text: str, timeout: float) -> None:
        """Standard output's first line holds ``text`` (read as it comes)."""
        assert self.process.stdout is not None
        line = _readline(self.process.stdout, timeout)
        self.stdout += line
        assert text in line, line

    def finish(self, timeout: float) -> int:
        """The exit status, once the command has exited and its output is all read."""
        assert self.process.stdout is not None
        self.process.wait(timeout=timeout)
        self.stdout += self.process.stdout.read()
        self.reader.join(timeout=10)  # standard error read to its end
        return self.process.returncode

    def stderr(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)

    def __exit__(self, *_exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _readline(stream: Any, timeout: float) -> str:
    got: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: got.put(stream.readline()), daemon=True).start()
    try:
        return got.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line on standard output within {timeout} s") from None


def test_importing_the_same_file_again_never_imports_it_twice(
    upgraded: dict[str, str], report: Path
) -> None:
    first = _cli("import", str(report), "--json", **upgraded)
    again = _cli("import", str(report), "--json", **upgraded)
    forced = _cli("import", str(report), "--json", "--again", **upgraded)
    assert (first.returncode, again.returncode, forced.returncode) == (0, 0, 0), again.stderr
    first_line, again_line, forced_line = (
        json.loads(done.stdout.strip()) for done in (first, again, forced)
    )
    assert first_line["new"] and not again_line["new"] and forced_line["new"]
    assert again_line["import_id"] == first_line["import_id"] != forced_line["import_id"]
    said = _cli("import", str(report), **upgraded)
    assert f"already imported as {forced_line['import_id']} (pending)" in said.stdout  # newest


def test_project_create_prints_the_id_that_import_then_names(
    upgraded: dict[str, str], report: Path
) -> None:
    env = upgraded
    created = _cli("project", "create", "acme", "--title", "ACME Corp", **env)
    assert created.returncode == 0, created.stderr
    project_id = created.stdout.strip()
    assert str(uuid.UUID(project_id)) == project_id  # the id alone on standard output
    assert f"project 'acme' ('ACME Corp') created: {project_id}" in created.stderr
    again = _cli("project", "create", "acme", **env)
    assert (again.returncode, again.stdout.strip()) == (0, project_id)
    assert "exists" in again.stderr
    conflict = _cli("project", "create", "acme", "--title", "Other", **env)
    assert conflict.returncode == 1
    assert conflict.stderr.count("\n") == 1 and "Traceback" not in conflict.stderr
    assert "with title 'ACME Corp', not 'Other'" in conflict.stderr
    queued = _cli("import", str(report), "--project", "acme", "--json", **env)
    assert queued.returncode == 0, queued.stderr
    engine = make_engine(_database(env))
    with engine.connect() as connection:
        data: dict[str, Any] = connection.execute(select(Import.data)).scalar_one()
        projects = connection.execute(select(Project.id, Project.name, Project.title)).all()
    engine.dispose()
    assert data["project_id"] == project_id
    assert [tuple(row) for row in projects] == [(uuid.UUID(project_id), "acme", "ACME Corp")]


def test_project_create_refuses_what_upstream_could_not_look_up(upgraded: dict[str, str]) -> None:
    for args, said in [
        (["9b2e6d0a-4c1f-4e55-9a51-2f0c3b7d8e61"], "is read as a project id by Ibutsu's API"),
        ([""], "a project name must not be empty"),
        (["acme", "--owner", "nobody@example.com"], "no user with e-mail 'nobody@example.com'"),
    ]:
        done = _cli("project", "create", *args, **upgraded)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert done.stderr.startswith("ibutsu-tasks: ") and said in done.stderr
        assert done.stderr.count("\n") == 1
    engine = make_engine(_database(upgraded))
    with engine.connect() as connection:
        assert connection.execute(select(Project.id)).all() == []
    engine.dispose()


def test_project_create_needs_the_schema(tmp_path: Path) -> None:
    done = _cli("project", "create", "acme", IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert done.returncode == 1
    assert "run `ibutsu-tasks db upgrade`" in done.stderr


class _Recording(Mapping[str, str]):
    """An environment that remembers every variable looked up in it."""

    def __init__(self, values: dict[str, str]) -> None:
        self.given, self.read = values, set[str]()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.given[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.given)

    def __len__(self) -> int:
        return len(self.given)


def test_help_names_every_variable_the_commands_read() -> None:
    """What `ibutsu-tasks --help` lists is exactly what the worker's settings read (on the
    embedded default and on real services, metrics on), plus the metric files' folder the
    demo's worker reads: a variable added to the settings fails this until it is listed."""
    read: set[str] = set()
    configured = {
        "CELERY_BROKER_URL": "redis://redis:6379/0",
        "CELERY_RESULT_BACKEND": "redis://redis:6379/0",
        "POSTGRESQL_HOST": "db",
        "POSTGRESQL_USER": "ibutsu",
        "POSTGRESQL_DATABASE": "ibutsu",
        "IBUTSU_METRICS_PORT": "9808",
    }
    for values in ({}, configured):
        environ = _Recording(values)
        load_settings(Role.WORKER, environ=environ)
        read |= environ.read
    listed = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", build_parser().format_help()))
    assert listed == read | {MULTIPROC_VAR}


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_says_what_it_does_and_its_default() -> None:
    parsers = list(_parsers(build_parser()))
    assert len(parsers) == 8  # the top, demo, db, db upgrade, project, create, import, status
    for parser in parsers:
        assert parser.description, parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, (parser.prog, action.dest)
            if action.option_strings:
                assert "(default: " in action.help, (parser.prog, action.dest)
            if action.type is float:  # a number of something: the unit is named
                assert action.metavar == "SECONDS", (parser.prog, action.dest)
