"""Rows for tests, written the way upstream's API writes them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project, Result, Run, utcnow
from ibutsu_worker.submission import Outcome

#: Stores a report as the API does and runs its import (the ``run_import`` fixture).
ImportRunner = Callable[..., Outcome]


def add_project(session: Session, name: str) -> uuid.UUID:
    """A project, as an admin creates it in Ibutsu."""
    project = Project(id=uuid.uuid4(), name=name, title=name)
    session.add(project)
    session.commit()
    return project.id


def add_run(
    session: Session,
    outcomes: Sequence[str] = (),
    *,
    start: datetime | None = None,
    duration: float = 0.5,
    result_fields: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
    **fields: Any,
) -> uuid.UUID:
    """A run and one result per outcome, a second apart from ``start`` (an hour ago);
    ``result_fields`` sets more columns of every result, or of the n-th (a function of n)."""
    start = start or utcnow() - timedelta(hours=1)
    run = Run(id=uuid.uuid4(), start_time=start, created=fields.pop("created", start), **fields)
    session.add(run)
    session.flush()
    more = result_fields if callable(result_fields) else lambda _: result_fields or {}
    session.add_all(
        Result(
            **{
                "id": uuid.uuid4(),
                "run_id": run.id,
                "project_id": run.project_id,
                "test_id": f"t{n}",
                "result": outcome,
                "duration": duration,
                "start_time": start + timedelta(seconds=n),
                **more(n),
            }
        )
        for n, outcome in enumerate(outcomes)
    )
    session.commit()
    return run.id
