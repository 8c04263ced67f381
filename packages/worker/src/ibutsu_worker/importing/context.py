"""What every format's importer receives, and what it reports back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from ibutsu_server.settings import ImportLimits


@dataclass(frozen=True)
class ImportContext:
    """One import in progress: its transaction, its id, what the uploader said, the limits."""

    session: Session
    import_id: uuid.UUID
    project_id: uuid.UUID | None
    info: dict[str, Any]
    limits: ImportLimits


@dataclass(frozen=True)
class Landed:
    """The run an importer wrote (in the caller's transaction) and how many results."""

    run_id: uuid.UUID
    results: int
