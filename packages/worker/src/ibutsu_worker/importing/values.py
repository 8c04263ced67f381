"""Reading the values reports carry: timestamps and durations, the same way for every format."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

_SPACE_AFTER_T = re.compile(r"T\s+")


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
    """Seconds from a ``time`` attribute ("1,234.5" too); None when missing, negative,
    infinite or malformed."""
    if not value:
        return None
    try:
        seconds = float(value.strip().replace(",", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
