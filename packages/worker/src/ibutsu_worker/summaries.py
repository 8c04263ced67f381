"""Run summaries computed by SQL aggregates, never by loading results into Python."""

from __future__ import annotations

import uuid
from typing import Any

from ibutsu_server.db.models import Result, Run, empty_summary
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

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
    run = session.get(Run, run_id, with_for_update=True)
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
