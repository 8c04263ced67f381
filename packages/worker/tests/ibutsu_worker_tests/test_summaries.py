"""Run summaries: SQL aggregates as upstream's update_run defines them, coalesced updates,
and finding stale runs; on PostgreSQL and SQLite."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Result, Run, utcnow
from ibutsu_testing.services import wait_for
from ibutsu_worker.summaries import (
    UpdateOutcome,
    coalesced_update,
    pass_percent,
    stale_runs,
    update_summary,
)
from ibutsu_worker_tests.builders import add_run
from ibutsu_worker_tests.dbsession import migrated_session

OUTCOMES = ["passed"] * 5 + ["failed"] * 2 + ["error", "skipped", "xfailed", "xpassed", "manual"]


def test_summary_as_upstream_defines_it(session: Session) -> None:
    run_id = add_run(
        session,
        OUTCOMES,
        component="api",
        summary={"collected": 13, "tests": 99},
        data={"tags": ["mine"]},
        result_fields={"env": "stage", "data": {"jenkins": {"job_name": "j"}, "tags": ["x"]}},
    )
    summary = update_summary(session, run_id)
    session.commit()
    assert summary == {
        "tests": 12,
        "failures": 2,
        "errors": 1,
        "skips": 1,
        "xfailures": 1,
        "xpasses": 1,
        "passes": 6,  # what is left: manual counts as a pass, as upstream counts it
        "pass_percent": 50,
        "collected": 13,  # kept from the client
        "not_run": 1,
    }
    run = session.get(Run, run_id, populate_existing=True)
    assert run is not None and run.summary == summary
    assert run.duration == pytest.approx(6.0)
    assert run.component == "api"  # already set: kept
    assert run.env == "stage"  # empty: from the first result
    assert run.data == {"tags": ["mine"], "jenkins": {"job_name": "j"}}  # only what it lacked


def test_an_import_moves_its_run_back_to_its_first_result(session: Session) -> None:
    first = utcnow().replace(microsecond=0) - timedelta(hours=1)
    run_id = add_run(session, ["passed", "failed"], start=first)

    def started_at(when: datetime, *, start_at_first: bool) -> datetime:
        session.execute(update(Run).where(Run.id == run_id).values(start_time=when))
        update_summary(session, run_id, start_at_first=start_at_first)
        session.commit()
        return session.scalars(select(Run.start_time).where(Run.id == run_id)).one()

    later, earlier = first + timedelta(minutes=5), first - timedelta(minutes=5)
    assert started_at(later, start_at_first=False) == later  # update_run keeps the run's own
    assert started_at(later, start_at_first=True) == first  # an import: its first result's
    assert started_at(earlier, start_at_first=True) == earlier  # never later than the report's


@pytest.mark.parametrize(
    ("passes", "tests", "percent"),
    [(0, 0, 0), (1, 3, 33), (2, 3, 66), (3, 3, 100), (5, 3, 100), (-1, 3, 0)],
)
def test_pass_percent_is_floored_and_clamped(passes: int, tests: int, percent: int) -> None:
    assert pass_percent(passes, tests) == percent


def test_stale_runs_in_one_query(session: Session) -> None:
    fresh = add_run(session, OUTCOMES)
    update_summary(session, fresh)
    wrong = add_run(session, OUTCOMES, summary={"tests": 12, "failures": 0})
    never = add_run(session, OUTCOMES)
    empty = add_run(session, [])
    old = add_run(session, OUTCOMES, start=utcnow() - timedelta(days=30))
    session.commit()
    found = set(stale_runs(session, utcnow() - timedelta(hours=24)))
    assert found == {wrong, never, empty}
    assert old not in found
    for run_id in found:
        update_summary(session, run_id)
    session.commit()
    assert stale_runs(session, utcnow() - timedelta(hours=24)) == []


def test_update_of_a_missing_run(session: Session) -> None:
    assert coalesced_update(session, uuid.uuid4()) is UpdateOutcome.MISSING


def test_one_update_runs_one_waits_and_the_rest_are_covered(tmp_path: Path) -> None:
    """While an update holds the run, the next request waits for it and then runs; a request
    arriving meanwhile is covered by the waiting one, which then sees its results."""
    with migrated_session("postgresql", tmp_path) as running:
        run_id = add_run(running, ["passed"] * 3)
        assert coalesced_update(running, run_id) is UpdateOutcome.UPDATED  # holds the run
        assert running.bind is not None
        waiting, late = Session(running.bind), Session(running.bind)
        outcome: list[UpdateOutcome] = []
        waiter = threading.Thread(target=lambda: outcome.append(coalesced_update(waiting, run_id)))
        waiter.start()
        blocked = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        wait_for(lambda: late.scalar(blocked), timeout=30, interval=0.01)
        late.rollback()
        # A result lands after the waiting update asked; its own update request is covered.
        late.add(
            Result(
                id=uuid.uuid4(), run_id=run_id, test_id="late", result="failed", start_time=utcnow()
            )
        )
        late.commit()
        assert coalesced_update(late, run_id) is UpdateOutcome.COALESCED
        late.commit()
        running.commit()  # the running update ends: the waiting one runs
        waiter.join(timeout=30)
        assert outcome == [UpdateOutcome.UPDATED]
        waiting.commit()
        summary = late.scalar(select(Run.summary).where(Run.id == run_id))
        assert summary is not None and (summary["tests"], summary["failures"]) == (4, 1)
        waiting.close()
        late.close()
