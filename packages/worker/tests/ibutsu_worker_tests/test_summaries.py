"""Run summaries: SQL aggregates, coalesced updates, and finding stale runs."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Result, Run, RunUpdateRequest, utcnow
from ibutsu_worker.summaries import (
    UpdateOutcome,
    coalesced_update,
    stale_runs,
    update_requested,
    update_run_summary,
)
from ibutsu_worker_tests.dbsession import migrated_session

OUTCOMES = ["passed"] * 5 + ["failed"] * 2 + ["error", "skipped", "xfailed", "xpassed", "manual"]


def _run_with_results(session: Session, **run_fields: object) -> uuid.UUID:
    run = Run(**run_fields)
    session.add(run)
    session.flush()
    start = utcnow() - timedelta(hours=1)
    for n, outcome in enumerate(OUTCOMES):
        session.add(
            Result(
                run_id=run.id,
                test_id=f"t{n}",
                result=outcome,
                duration=0.5,
                start_time=start + timedelta(seconds=n),
                component="ui",
                env="stage",
            )
        )
    session.commit()
    return run.id


def test_summary_counts_and_fills_empty_run_fields(session: Session) -> None:
    run_id = _run_with_results(session, component="api")
    summary = update_run_summary(session, run_id)
    session.commit()
    assert summary == {
        "tests": 12,
        "passes": 5,
        "failures": 2,
        "errors": 1,
        "skips": 1,
        "xfailures": 1,
        "xpasses": 1,
        "collected": 12,
        "not_run": 1,
    }
    run = session.get(Run, run_id, populate_existing=True)
    assert run is not None
    assert run.summary == summary
    assert run.duration == pytest.approx(6.0)
    assert run.start_time is not None
    assert run.component == "api"  # already set: kept
    assert run.env == "stage"  # empty: filled from the results


def test_stale_runs_in_one_query(session: Session) -> None:
    fresh = _run_with_results(session)
    update_run_summary(session, fresh)
    wrong = _run_with_results(session, summary={"tests": 12, "passes": 12})
    never = _run_with_results(session)
    empty = Run()
    old = _run_with_results(session, created=utcnow() - timedelta(days=30))
    session.add(empty)
    session.commit()
    found = set(stale_runs(session, utcnow() - timedelta(hours=24)))
    assert found == {wrong, never, empty.id}
    assert old not in found
    for run_id in found:
        update_run_summary(session, run_id)
    session.commit()
    assert stale_runs(session, utcnow() - timedelta(hours=24)) == []


def test_update_of_a_missing_run(session: Session) -> None:
    assert coalesced_update(session, uuid.uuid4()) is UpdateOutcome.MISSING


def test_requests_during_an_update_become_exactly_one_more(tmp_path: Path) -> None:
    with migrated_session("postgresql", tmp_path) as holder:
        run_id = _run_with_results(holder)
        assert coalesced_update(holder, run_id) is UpdateOutcome.UPDATED  # holds the row
        assert holder.bind is not None
        with Session(holder.bind) as second, Session(holder.bind) as third:
            assert coalesced_update(second, run_id) is UpdateOutcome.COALESCED
            assert coalesced_update(third, run_id) is UpdateOutcome.COALESCED
            requests = second.scalars(select(RunUpdateRequest.run_id)).all()
            assert requests == [run_id]  # two requests, one pending update
        holder.commit()
        assert update_requested(holder, run_id)
        holder.commit()
        # The one more update consumes the request.
        assert coalesced_update(holder, run_id) is UpdateOutcome.UPDATED
        holder.commit()
        assert not update_requested(holder, run_id)
