"""pytest-ibutsu archive imports: ids kept, artifacts stored, re-imports update, any member
order, hostile archives refused whole; on PostgreSQL and SQLite, and through a real worker."""

from __future__ import annotations

import dataclasses
import tarfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Artifact, Import, Project, Result, Run
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing import archive as archive_module
from ibutsu_worker.importing import artifact_spool, landing, row_writers
from ibutsu_worker.importing.archive import archive_records
from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.landing import Landed, Upload
from ibutsu_worker.importing.records import ArtifactRecord, Record, ResultRecord, RunRecord
from ibutsu_worker.importing.tar_reader import members
from ibutsu_worker.submission import Submitter
from ibutsu_worker_tests.archives import HOSTILE, Build, file, pack, sample, special
from ibutsu_worker_tests.builders import ImportRunner
from ibutsu_worker_tests.dbsession import migrated_session

LIMITS = ImportLimits(
    max_results=50,
    max_archive_members=100,
    max_archive_bytes=2_000_000,
    max_artifact_bytes=200_000,
)
# --- a database of each dialect for the module, emptied after every test ------------------------


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Session]:
    with migrated_session(request.param, tmp_path_factory.mktemp(request.param)) as session:
        yield session


@pytest.fixture()
def archive_session(database: Session) -> Iterator[Session]:
    """A session on the module's database (each dialect's), emptied after every test."""
    yield database
    database.rollback()
    for model in (Artifact, Result, Run, Project):
        database.execute(delete(model))
    database.commit()
    database.expunge_all()


def land(
    session: Session,
    archive: bytes,
    limits: ImportLimits = LIMITS,
    project_id: uuid.UUID | None = None,
    chunk: int = 997,
    **metadata: Any,
) -> Landed:
    """Import ``archive`` as the import job does: fed in chunks, committed, or rolled back."""
    upload = Upload(
        import_id=uuid.uuid4(),
        project_id=project_id,
        source=None,
        metadata=metadata,
        created=datetime(2026, 6, 1),
    )
    pieces = (archive[start : start + chunk] for start in range(0, len(archive), chunk))
    try:
        # As big as an archive may unpack to: its own limits are what these tests are about.
        budget = Budget(limits, limits.max_archive_bytes)
        landed = landing.land(session, upload, archive_records(pieces, limits), budget)
    except ReportError:
        session.rollback()
        raise
    session.commit()
    session.expire_all()
    return landed


def counts(session: Session) -> dict[str, int]:
    return {
        model.__table__.name: int(session.scalar(select(func.count()).select_from(model)) or 0)
        for model in (Run, Result, Artifact)
    }


def artifacts(session: Session) -> dict[str | None, tuple[Any, ...]]:
    rows = session.execute(
        select(Artifact.filename, Artifact.run_id, Artifact.result_id, Artifact.content)
    )
    return {name: (run_id, result_id, content) for name, run_id, result_id, content in rows}


def project(session: Session, name: str) -> Project:
    found = Project(id=uuid.uuid4(), name=name, title=name)
    session.add(found)
    session.commit()
    return found


# --- the reader alone, without a database ----------------------------------------------------


def read_archive(archive: bytes, limits: ImportLimits = LIMITS) -> list[Record]:
    return list(archive_records(iter([archive[:100], archive[100:]]), limits))


def test_reader_yields_checked_records_in_archive_order() -> None:
    archive = sample()
    records = read_archive(archive.archive())
    assert [type(r).__name__ for r in records] == [
        "RunRecord", "ArtifactRecord", "ResultRecord", "ResultRecord", "ArtifactRecord",
        "ResultRecord", "ResultRecord",
    ]  # fmt: skip
    run = records[0]
    assert isinstance(run, RunRecord)
    assert (run.id, run.component, run.start_time) == (
        uuid.UUID(archive.run_id),
        "billing",
        datetime(2026, 1, 2, 3, 0),
    )
    failed = records[3]
    assert isinstance(failed, ResultRecord)
    assert (str(failed.id), failed.result, failed.start_time) == (
        archive.results[1]["id"],
        "failed",
        datetime(2026, 1, 2, 3, 1),  # "05:01+02:00" in UTC
    )
    artifact = records[4]
    assert isinstance(artifact, ArtifactRecord)
    assert (artifact.filename, artifact.result_id) == ("traceback.log", failed.id)


def test_tar_members_are_checked_before_use() -> None:
    archive = sample()
    names = [m.name for m in members(iter([archive.archive()]), LIMITS)]
    assert names[:2] == [archive.run_id, f"{archive.run_id}/run.json"]
    with pytest.raises(ReportError, match="symbolic link"):
        list(members(iter([archive.archive([special("x/l", tarfile.SYMTYPE, "/")])]), LIMITS))


# --- landing --------------------------------------------------------------------------------------


def test_archive_lands_with_its_ids_and_artifacts(archive_session: Session) -> None:
    archive = sample()
    landed = land(archive_session, archive.archive(), env="staging", tags=["nightly"])
    run_id = uuid.UUID(archive.run_id)
    assert (landed.run_id, landed.results) == (run_id, 4)
    assert landed.summary == {
        "tests": 4, "failures": 1, "errors": 1, "skips": 1, "xfailures": 0, "xpasses": 0,
        "passes": 1, "pass_percent": 25, "collected": 0, "not_run": 0,
    }  # fmt: skip

    run = archive_session.get(Run, run_id)
    assert run is not None
    # The uploader's metadata wins over the archive's, as upstream merges them.
    assert (run.component, run.env, run.source) == ("billing", "staging", "jenkins")
    assert run.start_time == datetime(2026, 1, 2, 3, 0)
    assert run.duration == 2.5  # the sum of its results' durations
    assert run.data == {
        "project": None,
        "jenkins": {"job_name": "nightly", "build_number": "7"},
        "env": "staging",
        "tags": ["nightly"],
    }

    results = {
        r.id: r for r in archive_session.scalars(select(Result).where(Result.run_id == run_id))
    }
    assert set(results) == {uuid.UUID(r["id"]) for r in archive.results}
    for n, expected in enumerate(archive.results):
        result = results[uuid.UUID(expected["id"])]
        assert (result.test_id, result.result) == (expected["test_id"], expected["result"])
        assert result.params == {"n": n}
        assert result.data == {**expected["metadata"], "env": "staging", "tags": ["nightly"]}
        assert result.duration == expected["duration"]
        assert (result.source, result.component, result.env) == ("local", "billing", "staging")
        assert result.start_time == datetime(2026, 1, 2, 3, n)

    failed = uuid.UUID(archive.results[1]["id"])
    assert artifacts(archive_session) == {
        "session.log": (run_id, None, b"collected 4 items\n"),
        "traceback.log": (None, failed, b"AssertionError: 1 == 2\n"),
    }
    data: dict[Any, Any] = dict(
        archive_session.execute(select(Artifact.filename, Artifact.data)).all()
    )
    assert data == {
        "session.log": {"contentType": "text/plain", "runId": str(run_id)},
        "traceback.log": {"contentType": "text/plain", "resultId": str(failed)},
    }


def test_the_project_is_the_imports(archive_session: Session) -> None:
    uploader, other = project(archive_session, "uploader"), project(archive_session, "acme")
    for named in (None, "uploader", str(uploader.id)):
        archive = sample()
        archive.run["metadata"]["project"] = named
        land(archive_session, archive.archive(), project_id=uploader.id)
        run_project = select(Run.project_id).where(Run.id == uuid.UUID(archive.run_id))
        assert archive_session.scalar(run_project) == uploader.id
        results = select(Result.project_id).where(Result.run_id == uuid.UUID(archive.run_id))
        assert set(archive_session.scalars(results)) == {uploader.id}
    before = counts(archive_session)
    for named in ("acme", str(other.id), "not-on-this-server"):
        archive = sample()
        archive.run["metadata"]["project"] = named
        with pytest.raises(ReportError, match="names project .* but the import was submitted for"):
            land(archive_session, archive.archive(), project_id=uploader.id)
    archive = sample()
    archive.run["project_id"] = str(other.id)
    with pytest.raises(ReportError, match="submitted for no project"):
        land(archive_session, archive.archive())
    assert counts(archive_session) == before


def test_an_upload_cannot_take_over_another_runs_rows(archive_session: Session) -> None:
    victim = sample()
    land(archive_session, victim.archive())
    before = {
        r.id: (r.run_id, r.test_id, r.result) for r in archive_session.scalars(select(Result))
    }

    attacker = sample()  # a new run of its own, naming one of the victim's result ids
    stolen = victim.results[0]["id"]
    attacker.results[0] = {**attacker.results[0], "id": stolen, "test_id": "overwritten"}
    with pytest.raises(ReportError, match="already belong to another run"):
        land(archive_session, attacker.archive())
    archive_session.rollback()
    after = {r.id: (r.run_id, r.test_id, r.result) for r in archive_session.scalars(select(Result))}
    assert after == before

    other = project(archive_session, "other")
    renamed = sample()
    # The victim's run id, uploaded into another project.
    renamed.run["id"] = victim.run_id
    for result in renamed.results:
        result["run_id"] = victim.run_id
    with pytest.raises(ReportError, match="already belong to another project"):
        land(archive_session, renamed.archive(), project_id=other.id)


def test_reimport_updates_and_never_duplicates(archive_session: Session) -> None:
    archive = sample()
    land(archive_session, archive.archive())
    land(archive_session, archive.archive())
    assert counts(archive_session) == {"runs": 1, "results": 4, "artifacts": 2}

    # The same ids with new values: a run re-archived after a rerun.
    archive.run["env"] = "prod"
    archive.results[1]["result"] = "passed"
    archive.results[1]["metadata"]["rerun"] = True
    failed = archive.results[1]["id"]
    archive.result_artifacts[failed] = {"traceback.log": b"passed on rerun\n"}
    archive.run_artifacts = {"other.log": b"new"}
    land(archive_session, archive.archive())

    assert counts(archive_session) == {"runs": 1, "results": 4, "artifacts": 2}
    run = archive_session.get(Run, uuid.UUID(archive.run_id))
    assert run is not None and run.env == "prod"
    result = archive_session.get(Result, uuid.UUID(failed))
    assert result is not None and result.result == "passed"
    assert result.data is not None and result.data["rerun"] is True
    assert artifacts(archive_session) == {
        "other.log": (run.id, None, b"new"),
        "traceback.log": (None, result.id, b"passed on rerun\n"),
    }


def test_members_in_any_order_land_the_same(
    archive_session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spools go to disk after 100 bytes, and artifacts are written one per statement.
    monkeypatch.setattr(artifact_spool, "SPOOL_MEMORY", 100)
    monkeypatch.setattr(row_writers, "ARTIFACT_BATCH_ROWS", 1)
    archive = sample()
    # Artifacts first, then results, run.json last: the reverse of pytest-ibutsu's order.
    reversed_members = list(reversed(archive.members()))
    landed = land(archive_session, pack(reversed_members), chunk=7)
    assert landed.results == 4
    assert counts(archive_session) == {"runs": 1, "results": 4, "artifacts": 2}
    failed = uuid.UUID(archive.results[1]["id"])
    assert artifacts(archive_session)["traceback.log"] == (
        None,
        failed,
        b"AssertionError: 1 == 2\n",
    )
    run = archive_session.get(Run, uuid.UUID(archive.run_id))
    assert run is not None and run.component == "billing"


def test_a_run_without_results(archive_session: Session) -> None:
    archive = sample()
    archive.results = []
    assert land(archive_session, archive.archive()).results == 0
    assert counts(archive_session) == {"runs": 1, "results": 0, "artifacts": 1}


# --- refusals: each one names its reason and leaves nothing behind -------------------------------


@pytest.mark.parametrize(
    ("build", "limits", "reason"),
    [pytest.param(build, limits, reason, id=name) for name, build, limits, reason in HOSTILE],
)
def test_the_reader_refuses_with_a_reason(
    build: Build, limits: dict[str, int], reason: str
) -> None:
    with pytest.raises(ReportError) as caught:
        read_archive(build(sample()), dataclasses.replace(LIMITS, **limits))
    assert reason in str(caught.value)
    assert len(str(caught.value)) < 400  # names and values are shortened in messages


@pytest.mark.parametrize(
    ("build", "limits", "reason"),
    [pytest.param(build, limits, reason, id=name) for name, build, limits, reason in HOSTILE],
)
def test_refused_whole_with_a_reason(
    archive_session: Session,
    monkeypatch: pytest.MonkeyPatch,
    build: Build,
    limits: dict[str, int],
    reason: str,
) -> None:
    # Every result is written as soon as it is read, so a refusal must undo real rows.
    monkeypatch.setattr(row_writers, "BATCH_BYTES", 1)
    with pytest.raises(ReportError) as caught:
        land(archive_session, build(sample()), dataclasses.replace(LIMITS, **limits))
    assert reason in str(caught.value)
    assert counts(archive_session) == {"runs": 0, "results": 0, "artifacts": 0}


# --- through a real worker ------------------------------------------------------------------------


def test_archive_import_as_the_api_sends_it(
    run_import: ImportRunner, submitter: Submitter, tmp_path: Path
) -> None:
    archive = sample()
    path = tmp_path / f"{archive.run_id}.tar.gz"
    path.write_bytes(archive.archive())
    hostile = tmp_path / "hostile.tar.gz"
    hostile.write_bytes(archive.archive([special(f"{archive.run_id}/l", tarfile.SYMTYPE, "/")]))

    acme = submitter.ensure_project("acme")
    outcomes = [run_import(p, project_id=acme) for p in (path, path, hostile)]

    assert [o.status for o in outcomes[:2]] == ["done", "done"]
    for outcome in outcomes[:2]:
        assert outcome.run_id == archive.run_id and outcome.message is None
        assert outcome.summary is not None and outcome.summary["tests"] == 4
    assert outcomes[2].status == "error"
    assert outcomes[2].message is not None and "symbolic link" in outcomes[2].message
    with submitter.db.transaction() as session:
        record = session.get(Import, uuid.UUID(outcomes[0].import_id))
        assert record is not None and record.format == "archive"
        assert record.data is not None and record.data["result_count"] == 4
        assert record.data["run_id"] == [archive.run_id]
        assert counts(session) == {"runs": 1, "results": 4, "artifacts": 2}
        run = session.get(Run, uuid.UUID(archive.run_id))
        assert run is not None and run.project_id == acme


@pytest.mark.parametrize(("stated", "expected"), [(7.5, 7.5), (None, 2.5), (0, 2.5)])
def test_an_archives_run_lasts_what_its_run_json_says_else_its_results(
    run_import: ImportRunner,
    submitter: Submitter,
    tmp_path: Path,
    stated: float | None,
    expected: float,
) -> None:
    archive = sample()  # four results: 0.25 + 0.5 + 0.75 + 1 s
    if stated is None:
        del archive.run["duration"]
    else:
        archive.run["duration"] = stated
    path = tmp_path / f"{archive.run_id}.tar.gz"
    path.write_bytes(archive.archive())
    outcome = run_import(path, project_id=submitter.ensure_project("acme"))
    assert outcome.status == "done", outcome.message
    with submitter.db.transaction() as session:
        run = session.get(Run, uuid.UUID(archive.run_id))
        assert run is not None and run.duration == pytest.approx(expected)


def test_no_row_names_another_run_or_project_where_the_api_reads_them(
    archive_session: Session,
) -> None:
    uploader = project(archive_session, "uploader")
    archive = sample()
    elsewhere = str(uuid.uuid4())
    archive.results[0]["metadata"] |= {"run": elsewhere, "project": "victim"}
    archive.results[1]["metadata"] |= {"project": "uploader"}
    land(archive_session, archive.archive(), project_id=uploader.id)
    rows = {
        r.test_id: r.data or {}
        for r in archive_session.scalars(
            select(Result).where(Result.run_id == uuid.UUID(archive.run_id))
        )
    }
    first = rows[archive.results[0]["test_id"]]
    assert first["run"] == archive.run_id and first["reported_run"] == elsewhere
    assert first["reported_project"] == "victim" and "project" not in first
    # The import's own project, by id or by name, stays where it is.
    second = rows[archive.results[1]["test_id"]]
    assert second["project"] == "uploader" and "reported_project" not in second


def test_big_artifacts_stream_and_the_spool_is_written_as_it_fills(
    archive_session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_module, "ARTIFACT_IN_MEMORY", 1000)
    monkeypatch.setattr(artifact_spool, "SLICE_BYTES", 4096)
    monkeypatch.setattr(artifact_spool, "SPOOL_FLUSH_BYTES", 10_000)
    archive = sample()
    big = bytes(range(256)) * 200  # 51,200 bytes: streamed in slices, spool written each time
    first, last = archive.results[0]["id"], archive.results[-1]["id"]
    members = archive.members()
    # A file of the last result before its result.json: the spool waits for that result.
    early = file(f"{archive.run_id}/{last}/early.bin", big)
    members.insert(2, early)
    members.append(file(f"{archive.run_id}/{first}/late.bin", big[::-1]))
    land(archive_session, pack(members))
    stored = artifacts(archive_session)
    assert stored["early.bin"] == (None, uuid.UUID(last), big)
    assert stored["late.bin"] == (None, uuid.UUID(first), big[::-1])
    assert len(stored) == 4
    # Imported again: its artifacts replaced, not doubled.
    land(archive_session, pack(members))
    assert len(artifacts(archive_session)) == 4
    assert counts(archive_session)["artifacts"] == 4
