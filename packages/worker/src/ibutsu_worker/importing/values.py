"""Reading the values reports carry: timestamps and durations, the same way for every format,
and whether they are in a sane range.

A time must be from 1970 on and at most a day ahead of the worker's clock (a run from the
future is never pruned); a duration must be a finite number of seconds from 0 to a year. An
archive with a value out of range is refused; a JUnit report keeps its results without it
and the import says so (real producers write negative times now and then, and one bad
attribute must not lose a whole report).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

_SPACE_AFTER_T = re.compile(r"T\s+")
EARLIEST = datetime(1970, 1, 1)
FUTURE_SLACK = timedelta(days=1)
MAX_DURATION = 366 * 24 * 3600.0
TIMESTAMP_RANGE = "from 1970 to a day from now"
DURATION_RANGE = "a number of seconds from 0 to a year"


def parse_timestamp(value: str | None) -> datetime | None:
    """A naive UTC datetime (upstream's columns store naive UTC) from the ISO 8601 forms real
    tools write; a time without an offset is taken as UTC. None when missing or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(_SPACE_AFTER_T.sub("T", value.strip()))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return None
    return parsed


def parse_duration(value: str | None) -> float | None:
    """Seconds from a ``time`` attribute ("1,234.5" too); None when missing, malformed or out
    of range (see :func:`sane_duration`)."""
    if not value:
        return None
    try:
        seconds = float(value.strip().replace(",", ""))
    except ValueError:
        return None
    return seconds if sane_duration(seconds) else None


def sane_timestamp(value: datetime, now: datetime) -> bool:
    """Whether ``value`` (naive UTC) is from 1970 on and at most a day ahead of ``now``."""
    return EARLIEST <= value <= now + FUTURE_SLACK


def sane_duration(seconds: float) -> bool:
    """Whether ``seconds`` is finite, not negative and at most a year."""
    return math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION
