"""``ibutsu-tasks`` as a user runs it: the demo on the embedded default, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.models import Import, Project
from ibutsu_server.settings import DatabaseSettings
from ibutsu_testing.services import clean_environ, settings_for
from ibutsu_worker_tests.corpus import REFUSED, SAMPLE_SUMMARY, corpus_files, expected_count

KEYS = {"file", "import_id", "status", "message", "run_id", "summary"}


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


def test_unreachable_broker_fails_the_import_instead_of_leaving_it_pending(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    report = tmp_path / "r.xml"
    report.write_text('<testsuite name="s"><testcase name="t"/></testsuite>')
    closed = "redis://:broker-s3cret@127.0.0.1:1/0"  # nothing listens on port 1
    env = {**service_environ, "CELERY_BROKER_URL": closed}
    assert _cli("db", "upgrade", **env).returncode == 0
    done = _cli("import", str(report), "--json", **env)
    assert done.returncode == 1
    assert "cannot queue r.xml: the broker is unreachable" in done.stderr
    assert "Traceback" not in done.stderr and "broker-s3cret" not in done.stderr
    settings = settings_for(service_environ)
    assert settings.database is not None
    engine = make_engine(settings.database)
    with engine.connect() as connection:
        rows: list[Any] = list(connection.execute(select(Import.status, Import.data)))
    engine.dispose()
    assert [(status, data["error"]) for status, data in rows] == [
        ("error", "could not be queued: the broker is unreachable")
    ]


def test_importing_the_same_file_again_never_imports_it_twice(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    report = tmp_path / "r.xml"
    report.write_text('<testsuite name="s"><testcase name="t"/></testsuite>')
    assert _cli("db", "upgrade", **service_environ).returncode == 0
    first = _cli("import", str(report), "--json", **service_environ)
    again = _cli("import", str(report), "--json", **service_environ)
    forced = _cli("import", str(report), "--json", "--again", **service_environ)
    assert (first.returncode, again.returncode, forced.returncode) == (0, 0, 0), again.stderr
    first_line, again_line, forced_line = (
        json.loads(done.stdout.strip()) for done in (first, again, forced)
    )
    assert first_line["new"] and not again_line["new"] and forced_line["new"]
    assert again_line["import_id"] == first_line["import_id"] != forced_line["import_id"]
    said = _cli("import", str(report), **service_environ)
    assert f"already imported as {forced_line['import_id']} (pending)" in said.stdout  # newest


def test_project_create_prints_the_id_that_import_then_names(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    env = service_environ
    assert _cli("db", "upgrade", **env).returncode == 0
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
    report = tmp_path / "r.xml"
    report.write_text('<testsuite name="s"><testcase name="t"/></testsuite>')
    queued = _cli("import", str(report), "--project", "acme", "--json", **env)
    assert queued.returncode == 0, queued.stderr
    engine = make_engine(_database(env))
    with engine.connect() as connection:
        data: dict[str, Any] = connection.execute(select(Import.data)).scalar_one()
        projects = connection.execute(select(Project.id, Project.name, Project.title)).all()
    engine.dispose()
    assert data["project_id"] == project_id
    assert [tuple(row) for row in projects] == [(uuid.UUID(project_id), "acme", "ACME Corp")]


def test_project_create_refuses_what_upstream_could_not_look_up(
    service_environ: dict[str, str],
) -> None:
    assert _cli("db", "upgrade", **service_environ).returncode == 0
    for args, said in [
        (["9b2e6d0a-4c1f-4e55-9a51-2f0c3b7d8e61"], "is read as a project id by Ibutsu's API"),
        ([""], "a project name must not be empty"),
        (["acme", "--owner", "nobody@example.com"], "no user with e-mail 'nobody@example.com'"),
    ]:
        done = _cli("project", "create", *args, **service_environ)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert done.stderr.startswith("ibutsu-tasks: ") and said in done.stderr
        assert done.stderr.count("\n") == 1
    engine = make_engine(_database(service_environ))
    with engine.connect() as connection:
        assert connection.execute(select(Project.id)).all() == []
    engine.dispose()


def test_project_create_needs_the_schema(tmp_path: Path) -> None:
    done = _cli("project", "create", "acme", IBUTSU_EMBEDDED_DIR=str(tmp_path))
    assert done.returncode == 1
    assert "run `ibutsu-tasks db upgrade`" in done.stderr
