"""Batched result writes keep every character, on PostgreSQL (COPY) and SQLite (INSERT)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from ibutsu_server.db.models import Result, Run
from ibutsu_worker.importing.records import ParsedResult
from ibutsu_worker.importing.store import ResultWriter
from ibutsu_worker_tests.dbsession import migrated_session

AWKWARD = 'tab\there, new\nline, back\\slash, cr\r, quote " and \\N, ünïcode ✓'


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_awkward_text_survives_the_batch_write(dialect: str, tmp_path: Path) -> None:
    with migrated_session(dialect, tmp_path) as session:
        run = Run()
        session.add(run)
        session.flush()
        writer = ResultWriter(
            session, run_id=run.id, project_id=None, component=AWKWARD, env=None, source="ci"
        )
        start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        parsed = [
            ParsedResult(
                test_id=f"{AWKWARD} {n}",
                result="failed",
                start_time=start,
                duration=1.5,
                params={"p": AWKWARD},
                metadata={"short_tb": AWKWARD},
            )
            for n in range(3)
        ]
        writer.add_all(parsed)
        session.commit()
        assert writer.written == 3
        rows = session.scalars(select(Result).order_by(Result.test_id)).all()
        assert [r.test_id for r in rows] == [f"{AWKWARD} {n}" for n in range(3)]
        assert {r.id for r in rows} == {p.id for p in parsed}
        for row in rows:
            assert row.component == AWKWARD and row.env is None and row.source == "ci"
            assert row.params == {"p": AWKWARD} and row.data == {"short_tb": AWKWARD}
            assert row.duration == 1.5
            assert row.start_time is not None
            assert row.start_time.replace(tzinfo=UTC) == start
