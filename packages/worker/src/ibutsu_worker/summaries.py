"""Run summaries computed by SQL aggregates, never by loading results into Python."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Result, Run, RunUpdateRequest, empty_summary

# results.result -> the summary counter it adds to (besides "tests").
COUNTERS = {
    "passed": "passes",
    "failed": "failures",
    "error": "errors",
    "skipped": "skips",
    "xfailed": "xfailures",
    "xpassed": "xpasses",
    "manual": "not_run",
    "blocked": "not_run",
}


def compute_summary(session: Session, run_id: uuid.UUID) -> dict[str, int]:
    """The summary of a run from one GROUP BY over its results."""
    summary = empty_summary()
    rows = session.execute(
        select(Result.result, func.count()).where(Result.run_id == run_id).group_by(Result.result)
    )
    for outcome, count in rows:
        summary["tests"] += count
        key = COUNTERS.get(outcome)
        if key:
            summary[key] += count
    summary["collected"] = summary["tests"]
    return summary


def update_run_summary(session: Session, run_id: uuid.UUID) -> dict[str, Any] | None:
    """Store the run's summary and fill its empty start time, duration, component, env and
    source from its results. Returns the summary, or None when the run does not exist."""
    run = session.get(Run, run_id, with_for_update={"key_share": True})
    if run is None:
        return None
    summary = compute_summary(session, run_id)
    fill = session.execute(
        select(
            func.min(Result.start_time),
            func.sum(Result.duration),
            func.min(Result.component),
            func.min(Result.env),
            func.min(Result.source),
        ).where(Result.run_id == run_id)
    ).one()
    values: dict[str, Any] = {"summary": summary}
    for column, value in zip(
        ("start_time", "duration", "component", "env", "source"), fill, strict=True
    ):
        if getattr(run, column) is None and value is not None:
            values[column] = value
    session.execute(update(Run).where(Run.id == run_id).values(**values))
    return summary


class UpdateOutcome(enum.Enum):
    """What a request to update a run's summary came to."""

    UPDATED = "updated"
    COALESCED = "coalesced"  # another update was running; it will run one more
    MISSING = "missing"


def _lock(session: Session, run_id: uuid.UUID) -> bool | None:
    """Lock the run's row: True when locked, False when another transaction holds it,
    None when the run does not exist. Only PostgreSQL can skip a held lock; SQLite
    serialises writers anyway."""
    query = select(Run.id).where(Run.id == run_id)
    if session.get_bind().dialect.name != "postgresql":
        return True if session.scalar(query) is not None else None
    # NO KEY UPDATE: inserting a request (a foreign key to the run) must not wait for it.
    if session.scalar(query.with_for_update(skip_locked=True, key_share=True)) is not None:
        return True
    return False if session.scalar(query) is not None else None


def coalesced_update(session: Session, run_id: uuid.UUID) -> UpdateOutcome:
    """Update the run's summary, or, when another update holds the run, leave a request
    that the running update turns into exactly one more update. Never drops a request."""
    state = _lock(session, run_id)
    if state is False:
        session.execute(pg_insert(RunUpdateRequest).values(run_id=run_id).on_conflict_do_nothing())
        session.commit()
        # The holder may have finished before it could see the request: then it is ours.
        state = _lock(session, run_id)
        if state is False:
            return UpdateOutcome.COALESCED
    if state is None:
        return UpdateOutcome.MISSING
    session.execute(delete(RunUpdateRequest).where(RunUpdateRequest.run_id == run_id))
    update_run_summary(session, run_id)
    return UpdateOutcome.UPDATED


def update_requested(session: Session, run_id: uuid.UUID) -> bool:
    """True when a request arrived during the update that just committed."""
    return (
        session.scalar(select(RunUpdateRequest.run_id).where(RunUpdateRequest.run_id == run_id))
        is not None
    )


def stale_runs(session: Session, since: datetime) -> list[uuid.UUID]:
    """Runs created since ``since`` whose stored summary disagrees with their results, in
    one query (a grouped count per outcome joined to the runs)."""
    recent = select(Run.id).where(Run.created >= since)
    counts = (
        select(
            Result.run_id.label("run_id"),
            func.count().label("tests"),
            *(
                func.count().filter(Result.result.in_(outcomes)).label(key)
                for key, outcomes in _OUTCOMES_BY_COUNTER.items()
            ),
        )
        .where(Result.run_id.in_(recent))
        .group_by(Result.run_id)
        .subquery()
    )
    disagree = or_(
        *(
            func.coalesce(Run.summary[key].as_integer(), -1) != func.coalesce(counts.c[key], 0)
            for key in ("tests", *_OUTCOMES_BY_COUNTER)
        )
    )
    query = (
        select(Run.id)
        .outerjoin(counts, counts.c.run_id == Run.id)
        .where(Run.created >= since, disagree)
    )
    return list(session.scalars(query))


_OUTCOMES_BY_COUNTER: dict[str, tuple[str, ...]] = {}
for _outcome, _counter in COUNTERS.items():
    _OUTCOMES_BY_COUNTER[_counter] = (*_OUTCOMES_BY_COUNTER.get(_counter, ()), _outcome)
