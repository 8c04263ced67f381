"""The landing keeps every character, on PostgreSQL (COPY) and SQLite (INSERT)."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from ibutsu_server.db.models import Artifact, Result, Run
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.landing import Upload, land
from ibutsu_worker.importing.records import ArtifactRecord, Record, ResultRecord, RunRecord
from ibutsu_worker_tests.dbsession import migrated_session

AWKWARD = 'tab\there, new\nline, back\\slash, cr\r, quote " and \\N, ünïcode ✓'


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_awkward_text_and_bytes_survive_the_write(dialect: str, tmp_path: Path) -> None:
    start = datetime(2026, 1, 2, 3, 4, 5)
    upload = Upload(uuid.uuid4(), None, "ci", {"note": AWKWARD}, datetime(2026, 6, 1))
    results = [
        ResultRecord(
            test_id=f"{AWKWARD} {n}",
            result="failed",
            start_time=start,
            duration=1.5,
            params={"p": AWKWARD},
            metadata={"short_tb": AWKWARD},
            component=AWKWARD,
            artifacts=[ArtifactRecord("traceback.log", AWKWARD.encode() + bytes(range(256)))],
        )
        for n in range(3)
    ]
    records: list[Record] = [RunRecord(start_time=start), *results]
    with migrated_session(dialect, tmp_path) as session:
        landed = land(session, upload, records, Budget(ImportLimits(), upload_bytes=10_000))
        session.commit()
        assert landed.results == 3
        rows = session.scalars(select(Result).order_by(Result.test_id)).all()
        assert [r.test_id for r in rows] == [f"{AWKWARD} {n}" for n in range(3)]
        assert {r.id for r in rows} == {r.id for r in results}
        for row in rows:
            assert row.component == AWKWARD and row.env is None and row.source == "ci"
            assert row.params == {"p": AWKWARD}
            assert row.data == {"run": str(landed.run_id), "short_tb": AWKWARD, "note": AWKWARD}
            assert row.duration == 1.5 and row.start_time == start
        contents = session.scalars(select(Artifact.content)).all()
        assert contents == [AWKWARD.encode() + bytes(range(256))] * 3
        run = session.get(Run, landed.run_id)
        assert run is not None and run.source == "ci" and run.start_time == start
