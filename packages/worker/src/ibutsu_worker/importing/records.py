"""What parsers produce: plain records, independent of the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class ParsedResult:
    """One test result as read from a report."""

    test_id: str
    result: str
    start_time: datetime | None = None
    duration: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid.uuid4)
