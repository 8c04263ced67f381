"""Run summaries computed by SQL aggregates, never by loading results into Python (or, for a
run an import is creating, tallied from the rows as they are written).

What a summary holds is upstream's ``update_run``: counts by outcome (SUMMARY_COUNTERS), every
result in ``tests``, ``passes`` what is left, ``pass_percent`` floored and clamped, ``collected``
kept from the client, ``not_run`` the collected tests that did not run; the run's ``duration``
is the sum of its results'; the first result (by start time) lends the run its ``jenkins`` and
``tags`` metadata and its start time, env, component, project and source where the run lacks
them. An import passes the report's own total time instead (upstream's importers keep it;
upstream's ``update_run`` sums the results, as ours does). Domain code: nothing here commits.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from ibutsu_server.db.engine import will_take_session_locks
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


@dataclass
class Tally:
    """A run's results counted by summary counter, their total duration and earliest start."""

    counts: dict[str, int] = field(default_factory=dict)
    tests: int = 0
    duration: float = 0.0
    first: datetime | None = None

    def add(
        self, outcome: str | None, count: int, seconds: float | None, started: datetime | None
    ) -> bool:
        """Count ``count`` results of ``outcome``; True when ``started`` is the earliest yet."""
        self.tests += count
        self.duration += seconds or 0.0
        key = SUMMARY_COUNTERS.get(outcome or "")
        if key:
            self.counts[key] = self.counts.get(key, 0) + count
        if started is not None and (self.first is None or started < self.first):
            self.first = started
            return True
        return False


@dataclass(frozen=True)
class FirstResult:
    """What the run's first result (by start time) can lend the run."""

    data: dict[str, Any]
    columns: dict[str, Any]  # some of COLUMNS_TO_COPY


def summarise(
    run: Run,
    tally: Tally,
    first: FirstResult | None,
    *,
    collected: int | None = None,
    start_at_first: bool = False,
    reported_duration: float | None = None,
) -> dict[str, int]:
    """Store on ``run`` the summary and duration of its ``tally``, and what it lacks of its
    ``first`` result; ``collected`` replaces the stored count when given, ``start_at_first``
    moves the run's start back to its first result's when that is earlier, and a
    ``reported_duration`` (the report's own total, if not 0) wins over the results' sum."""
    if collected is None:
        collected = int((run.summary or {}).get("collected") or 0)
    if first is not None:
        metadata = dict(run.data or {})
        for key in METADATA_TO_COPY:
            if not metadata.get(key) and first.data.get(key):
                metadata[key] = first.data[key]
        if metadata != (run.data or {}):
            run.data = metadata
        for column, value in first.columns.items():
            if value and not getattr(run, column):
                setattr(run, column, value)
    first_start = tally.first
    if start_at_first and first_start is not None:
        run.start_time = min(run.start_time or first_start, first_start)
    run.summary = build_summary(tally.counts, tally.tests, collected)
    run.duration = reported_duration or tally.duration
    return run.summary


def update_summary(
    session: Session,
    run_id: uuid.UUID,
    *,
    collected: int | None = None,
    start_at_first: bool = False,
    reported_duration: float | None = None,
) -> dict[str, int] | None:
    """Recompute and store the run's summary from its results (see :func:`summarise`).
    Returns the summary, or None when the run does not exist.

    The run's row is locked first, so a summary is never computed from a snapshot older than a
    transaction (an import) that still holds the run. Everything read comes first and the run
    is changed last, so the run is written by one UPDATE."""
    run = session.get(Run, run_id, with_for_update={"key_share": True}, populate_existing=True)
    if run is None:
        return None
    tally = Tally()
    rows = session.execute(
        select(Result.result, func.count(), func.sum(Result.duration), func.min(Result.start_time))
        .where(Result.run_id == run_id)
        .group_by(Result.result)
    )
    for outcome, count, seconds, earliest in rows:
        tally.add(outcome, count, seconds, earliest)
    first = _first_result(session, run, tally.first) if tally.first is not None else None
    return summarise(
        run,
        tally,
        first,
        collected=collected,
        start_at_first=start_at_first,
        reported_duration=reported_duration,
    )


def _first_result(session: Session, run: Run, started: datetime) -> FirstResult | None:
    """What the run lacks, from the result that started first; None when it lacks nothing."""
    wanted_keys = [key for key in METADATA_TO_COPY if not (run.data or {}).get(key)]
    wanted_columns = [column for column in COLUMNS_TO_COPY if not getattr(run, column)]
    if not wanted_keys and not wanted_columns:
        return None
    # By its start time, which the aggregate found: the start-time index finds the row at
    # once, where ordering the run's results would read them all.
    row = session.execute(
        select(Result.data, *(getattr(Result, column) for column in wanted_columns))
        .where(Result.run_id == run.id, Result.start_time == started)
        .limit(1)
    ).first()
    if row is None:
        return None
    return FirstResult(row[0] or {}, dict(zip(wanted_columns, row[1:], strict=True)))


class UpdateOutcome(enum.Enum):
    """What a request to update a run's summary came to."""

    UPDATED = "updated"
    COALESCED = "coalesced"  # an update already waits to run after the current one
    MISSING = "missing"


def lock_keys(run_id: uuid.UUID) -> tuple[int, int]:
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
    waiting, running = lock_keys(run_id)
    will_take_session_locks(session)
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
