"""Pruning in batches, children first, with retention guards, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Artifact, Import, ImportFile, Result, Run, utcnow
from ibutsu_server.db.sessions import SessionTransaction
from ibutsu_worker import pruning
from ibutsu_worker.pruning import (
    RetentionRefused,
    months_ago,
    prune_artifacts,
    prune_imports,
    prune_results,
    prune_runs,
)
from ibutsu_worker_tests.builders import add_run

OLD = utcnow() - timedelta(days=800)
RECENT = utcnow() - timedelta(days=1)


def _run(session: Session, when: datetime, results: int, artifact_date: datetime) -> uuid.UUID:
    """A run started ``when`` with ``results`` results, each with an artifact."""
    run_id = add_run(session, ["passed"] * results, start=when, result_fields={"start_time": when})
    session.add_all(
        Artifact(
            id=uuid.uuid4(),
            result_id=result_id,
            run_id=run_id,
            filename="log.txt",
            content=b"x",
            upload_date=artifact_date,
        )
        for result_id in session.scalars(select(Result.id).where(Result.run_id == run_id))
    )
    session.commit()
    return run_id


def _count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_old_results_go_even_when_a_newer_artifact_points_at_them(session: Session) -> None:
    _run(session, OLD, results=7, artifact_date=utcnow())  # newer artifacts on old results
    _run(session, RECENT, results=2, artifact_date=RECENT)
    report = prune_results(SessionTransaction(session), 5, batch_size=3)
    assert report.deleted == {"artifacts": 7, "results": 7}
    # Seven rows with the same start time, three at a time: ties cross batch boundaries.
    assert report.batches == 3
    assert (_count(session, Result), _count(session, Artifact)) == (2, 2)
    assert _count(session, Run) == 2  # runs are pruned by their own task


def test_old_runs_go_with_their_results_and_artifacts(session: Session) -> None:
    old = _run(session, OLD, results=5, artifact_date=OLD)
    session.add(
        Artifact(
            id=uuid.uuid4(), run_id=old, filename="run.log", content=b"y", upload_date=utcnow()
        )
    )
    session.commit()
    recent = _run(session, RECENT, results=3, artifact_date=RECENT)
    report = prune_runs(SessionTransaction(session), 12, batch_size=2)
    assert report.deleted == {"artifacts": 6, "results": 5, "runs": 1}
    assert session.scalars(select(Run.id)).all() == [recent]
    assert (_count(session, Result), _count(session, Artifact)) == (3, 3)
    assert report.longest_batch_seconds > 0


def test_old_artifact_files_go_alone(session: Session) -> None:
    _run(session, RECENT, results=4, artifact_date=OLD)
    _run(session, RECENT, results=1, artifact_date=RECENT)
    report = prune_artifacts(SessionTransaction(session), 3)
    assert report.deleted == {"artifacts": 4}
    assert (_count(session, Result), _count(session, Artifact)) == (5, 1)


def test_old_imports_go_with_their_files(session: Session) -> None:
    for status, created in (("done", OLD), ("error", OLD), ("pending", OLD), ("done", RECENT)):
        record = Import(id=uuid.uuid4(), filename="r.xml", status=status, created=created)
        session.add(record)
        session.flush()
        session.add(ImportFile(id=uuid.uuid4(), import_id=record.id, content=b"<testsuite/>"))
    session.commit()
    report = prune_imports(SessionTransaction(session), 7)
    # By when they were created, as upstream prunes them; the files go first.
    assert report.deleted == {"import_files": 3, "imports": 3}
    assert (_count(session, ImportFile), _count(session, Import)) == (1, 1)


def test_nothing_to_prune_reports_zero(session: Session) -> None:
    _run(session, RECENT, results=1, artifact_date=RECENT)
    assert prune_runs(SessionTransaction(session), 12).deleted == {}


@pytest.mark.parametrize("months", [0, -1, "0", "three", 2.5, True, None])
def test_dangerous_retention_is_refused(session: Session, months: object) -> None:
    _run(session, OLD, results=1, artifact_date=OLD)
    for prune in (prune_results, prune_runs, prune_artifacts, prune_imports):
        with pytest.raises(RetentionRefused, match="refusing to prune"):
            prune(SessionTransaction(session), months)
    assert _count(session, Result) == 1


def test_a_retention_given_as_text_counts(session: Session) -> None:
    # The admin page may send the form's text; upstream accepts it too.
    _run(session, OLD, results=1, artifact_date=OLD)
    assert prune_results(SessionTransaction(session), "5").deleted == {"artifacts": 1, "results": 1}


def test_months_ago_clamps_to_month_end() -> None:
    assert months_ago(datetime(2026, 3, 31), 1) == datetime(2026, 2, 28)
    assert months_ago(datetime(2026, 1, 15), 13) == datetime(2024, 12, 15)


def test_batches_shrink_when_they_take_long_unless_their_size_is_fixed(
    postgresql_session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = postgresql_session  # batches adapt where they run in the server: PostgreSQL
    ticks = iter(range(10_000))  # every reading of the clock one second later: slow batches
    monkeypatch.setattr(pruning, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(pruning, "BATCH_SIZE", 4)
    monkeypatch.setattr(pruning, "MIN_BATCH", 1)
    _run(session, OLD, results=7, artifact_date=OLD)
    report = prune_results(SessionTransaction(session), 5)
    # Each DELETE takes a second, twice BATCH_SECONDS: each batch is half the one before.
    assert report.deleted == {"artifacts": 7, "results": 7}
    assert report.batches == 4  # 4, 2, 1, then none left
    _run(session, OLD, results=7, artifact_date=OLD)
    assert prune_results(SessionTransaction(session), 5, batch_size=4).batches == 2


@dataclass
class _WatchedCommits(SessionTransaction):
    """A SessionTransaction that notes the session's synchronous_commit at each checkpoint."""

    seen: list[str] = field(default_factory=list)

    def checkpoint(self, reason: str) -> None:
        self.seen.append(str(self.session.scalar(text("SHOW synchronous_commit"))))
        super().checkpoint(reason)


def test_a_batch_commits_without_waiting_for_the_disk_and_only_the_batch(
    postgresql_session: Session,
) -> None:
    session = postgresql_session
    # The tests' own servers run with synchronous_commit off; this database commits durably.
    database = session.scalar(text("SELECT current_database()"))
    session.execute(text(f'ALTER DATABASE "{database}" SET synchronous_commit TO on'))
    session.commit()
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    engine.dispose()  # what connections the pool holds predate the setting
    _run(session, OLD, results=5, artifact_date=OLD)
    transaction = _WatchedCommits(session)
    report = prune_results(transaction, 5, batch_size=2)
    assert report.deleted == {"artifacts": 5, "results": 5}
    assert transaction.seen == ["off"] * report.batches
    # The setting went with each batch's transaction: the connection commits as before.
    assert session.scalar(text("SHOW synchronous_commit")) == "on"


@dataclass
class _WatchedStatements(SessionTransaction):
    """A SessionTransaction that notes each statement the session's connection runs."""

    statements: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        engine = self.session.get_bind()
        assert isinstance(engine, Engine)
        event.listen(engine, "before_cursor_execute", self._note)

    def _note(self, _conn: object, _cursor: object, statement: str, *_args: object) -> None:
        self.statements.append(" ".join(statement.split()))

    def children_found_by(self) -> set[str]:
        """How each batch found its artifacts: by joining the batch, or through the index."""
        found = set()
        for statement in self.statements:
            if statement.startswith("WITH doomed"):
                found.add("join" if "DELETE FROM artifacts USING doomed" in statement else "index")
        return found


@pytest.mark.parametrize(
    ("analysed", "batch_size", "found_by"),
    [(False, 10, "index"), (True, 4, "index"), (True, 10, "join")],
    ids=["never-analysed", "table-bigger-than-a-batch", "table-smaller-than-a-batch"],
)
def test_a_batch_finds_its_artifacts_by_a_join_only_when_the_table_is_smaller_than_the_batch(
    postgresql_session: Session, analysed: bool, batch_size: int, found_by: str
) -> None:
    session = postgresql_session
    _run(session, OLD, results=6, artifact_date=RECENT)  # kept artifacts on doomed results
    _run(session, RECENT, results=3, artifact_date=RECENT)
    if analysed:  # the planner's statistics now know the table holds 9 artifacts
        session.execute(text("ANALYZE artifacts"))
    transaction = _WatchedStatements(session)
    report = prune_results(transaction, 5, batch_size=batch_size)
    assert report.deleted == {"artifacts": 6, "results": 6}
    assert (_count(session, Result), _count(session, Artifact)) == (3, 3)
    # Unknown size or more rows than keys: probed, at most one probe a key; fewer: hashed.
    assert transaction.children_found_by() == {found_by}
