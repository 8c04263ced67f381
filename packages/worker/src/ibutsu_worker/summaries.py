"""Run summaries computed by SQL aggregates, never by loading results into Python.

What a summary holds is upstream's ``update_run``: counts by outcome (SUMMARY_COUNTERS), every
result in ``tests``, ``passes`` what is left, ``pass_percent`` floored and clamped, ``collected``
kept from the client, ``not_run`` the collected tests that did not run; the run's ``duration``
is the sum of its results'; the first result (by start time) lends the run its ``jenkins`` and
``tags`` metadata and its start time, env, component, project and source where the run lacks
them. Domain code: nothing here commits.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import SUMMARY_COUNTERS, Result, Run

METADATA_TO_COPY = ("jenkins", "tags")
COLUMNS_TO_COPY = ("start_time", "env", "component", "project_id", "source")


def pass_percent(passes: int, tests: int) -> int:
    """floor(passes·100 / tests) clamped to 0..100; 0 without tests (upstream's formula)."""
    if tests <= 0:
        return 0
    return max(min(passes * 100 // tests, 100), 0)


def build_summary(counts: dict[str, int], tests: int, collected: int) -> dict[str, int]:
    """A full summary from the per-counter ``counts`` of a run's ``tests`` results."""
    summary = {"tests": tests, **{key: counts.get(key, 0) for key in SUMMARY_COUNTERS.values()}}
    summary["passes"] = tests - sum(summary[key] for key in SUMMARY_COUNTERS.values())
    summary["pass_percent"] = pass_percent(summary["passes"], tests)
    summary["collected"] = collected
    summary["not_run"] = max(collected - tests, 0)
    return summary


def update_summary(
    session: Session, run_id: uuid.UUID, *, collected: int | None = None
) -> dict[str, int] | None:
    """Recompute and store the run's summary (``collected`` replaces the stored one when
    given). Returns the summary, or None when the run does not exist.

    The run's row is locked first, so a summary is never computed from a snapshot older than a
    transaction (an import) that still holds the run."""
    run = session.get(Run, run_id, with_for_update={"key_share": True}, populate_existing=True)
    if run is None:
        return None
    counts: dict[str, int] = {}
    tests, duration, first = 0, 0.0, None
    rows = session.execute(
        select(Result.result, func.count(), func.sum(Result.duration), func.min(Result.start_time))
        .where(Result.run_id == run_id)
        .group_by(Result.result)
    )
    for outcome, count, seconds, earliest in rows:
        tests += count
        duration += seconds or 0.0
        first = earliest if first is None or earliest < first else first
        key = SUMMARY_COUNTERS.get(outcome or "")
        if key:
            counts[key] = counts.get(key, 0) + count
    if collected is None:
        collected = int((run.summary or {}).get("collected") or 0)
    run.summary = build_summary(counts, tests, collected)
    run.duration = duration
    if first is not None:
        _copy_from_first_result(session, run, first)
    return run.summary


def _copy_from_first_result(session: Session, run: Run, started: datetime) -> None:
    metadata = dict(run.data or {})
    wanted_keys = [key for key in METADATA_TO_COPY if not metadata.get(key)]
    wanted_columns = [column for column in COLUMNS_TO_COPY if not getattr(run, column)]
    if not wanted_keys and not wanted_columns:
        return
    # By its start time, which the aggregate found: the start-time index finds the row at
    # once, where ordering the run's results would read them all.
    first = session.execute(
        select(Result.data, *(getattr(Result, column) for column in wanted_columns))
        .where(Result.run_id == run.id, Result.start_time == started)
        .limit(1)
    ).first()
    if first is None:
        return
    data = first[0] or {}
    for key in wanted_keys:
        if data.get(key):
            metadata[key] = data[key]
    if metadata != (run.data or {}):
        run.data = metadata
    for column, value in zip(wanted_columns, first[1:], strict=True):
        if value:
            setattr(run, column, value)


class UpdateOutcome(enum.Enum):
    """What a request to update a run's summary came to."""

    UPDATED = "updated"
    COALESCED = "coalesced"  # an update already waits to run after the current one
    MISSING = "missing"


def _lock_keys(run_id: uuid.UUID) -> tuple[int, int]:
    """Two 64-bit advisory lock keys of a run: "an update waits" and "an update runs"."""
    value = run_id.int
    waiting, running = value >> 64, value & (2**64 - 1)
    return waiting - 2**63, running - 2**63


def coalesced_update(session: Session, run_id: uuid.UUID) -> UpdateOutcome:
    """Update the run's summary, at most one update running and one waiting per run.

    On PostgreSQL two advisory locks of the run coordinate the updates, with no table of our
    own: a request that finds another update already waiting is covered by it (that one reads
    the results only after it stops waiting, so it sees everything committed before this
    request) and returns at once; otherwise it waits for the running update and then runs.
    No request is ever dropped. SQLite serialises writers anyway: every request runs."""
    if session.get_bind().dialect.name != "postgresql":
        return UpdateOutcome.UPDATED if update_summary(session, run_id) else UpdateOutcome.MISSING
    waiting, running = _lock_keys(run_id)
    if not session.scalar(select(func.pg_try_advisory_lock(waiting))):
        return UpdateOutcome.COALESCED
    # Session-level, released as soon as this update runs; should an error come in between,
    # the engine releases it when the connection goes back to the pool.
    session.execute(select(func.pg_advisory_xact_lock(running)))
    session.execute(select(func.pg_advisory_unlock(waiting)))
    return UpdateOutcome.UPDATED if update_summary(session, run_id) else UpdateOutcome.MISSING


def stale_runs(session: Session, since: datetime) -> list[uuid.UUID]:
    """Runs started since ``since`` whose stored summary disagrees with their results, in
    one query (a grouped count per counter joined to the runs)."""
    recent = select(Run.id).where(Run.start_time >= since)
    counters = {key: _outcomes(key) for key in dict.fromkeys(SUMMARY_COUNTERS.values())}
    counts = (
        select(
            Result.run_id.label("run_id"),
            func.count().label("tests"),
            *(
                func.count().filter(Result.result.in_(outcomes)).label(key)
                for key, outcomes in counters.items()
            ),
        )
        .where(Result.run_id.in_(recent))
        .group_by(Result.run_id)
        .subquery()
    )
    disagree: list[ColumnElement[bool]] = [
        func.coalesce(Run.summary[key].as_integer(), -1) != func.coalesce(counts.c[key], 0)
        for key in ("tests", *counters)
    ]
    query = (
        select(Run.id)
        .outerjoin(counts, counts.c.run_id == Run.id)
        .where(and_(Run.start_time >= since, or_(*disagree)))
    )
    return list(session.scalars(query))


def _outcomes(counter: str) -> list[str]:
    return [outcome for outcome, key in SUMMARY_COUNTERS.items() if key == counter]
