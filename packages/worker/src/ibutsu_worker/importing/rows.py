"""Records as rows: what a run, a result and an artifact record become in the database, with no
session (the landing, ``importing.landing``, writes them).

Names are cut to fit their indexes, long test ids are stored as a prefix and a hash, and every
row belongs to the import: in metadata, ``run`` and ``project`` are what the API and frontend
read as a result's run and a row's project (the run link, the project filter). ``run`` is always
the row's own run, and a ``project`` that is not the import's is kept as ``reported_project``
(likewise a report's own ``run`` as ``reported_run``), so no row reads as another's.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ibutsu_server.db.models import utcnow
from ibutsu_server.db.schema import artifacts as artifacts_table
from ibutsu_server.db.schema import results as results_table
from ibutsu_worker.importing.copy import copy_line
from ibutsu_worker.importing.records import ArtifactRecord, ResultRecord, RunRecord

# results.source, env and component are indexed, alone and together: names are cut to fit.
MAX_NAME = 255
# results.test_id is indexed; a B-tree entry holds about 2.7 kB. Longer ids are stored as a
# prefix, an ellipsis and a hash of the whole id, so distinct ids stay distinct.
MAX_TEST_ID_BYTES = 1000
_TEST_ID_HASH = 16
RESULT_COLUMNS = tuple(column.name for column in results_table.c)
ARTIFACT_COLUMNS = tuple(column.name for column in artifacts_table.c)

Row = dict[str, Any]


def stored_test_id(test_id: str) -> str:
    """``test_id`` as stored: unchanged up to MAX_TEST_ID_BYTES of UTF-8, else cut there with
    "…" and the first 16 hex digits of its SHA-256."""
    encoded = test_id.encode()
    if len(encoded) <= MAX_TEST_ID_BYTES:
        return test_id
    digest = hashlib.sha256(encoded).hexdigest()[:_TEST_ID_HASH]
    keep = encoded[: MAX_TEST_ID_BYTES - _TEST_ID_HASH - 4].decode(errors="ignore")
    return f"{keep}…{digest}"


def cut_name(value: str | None) -> str | None:
    """A source, env or component name as stored: at most MAX_NAME characters, "…" marking a
    cut."""
    if value is None or len(value) <= MAX_NAME:
        return value
    return value[: MAX_NAME - 1] + "…"


def result_line(row: Row) -> str:
    """A result row as the line PostgreSQL's COPY reads: what the row is charged, everywhere."""
    return copy_line(row[column] for column in RESULT_COLUMNS)


@dataclass(frozen=True)
class OpenRun:
    """The run being written, as its results and artifacts see it."""

    id: uuid.UUID
    id_text: str  # str(id), formatted once: every result's metadata names it
    keeps_ids: bool  # the report's ids are kept (an archive), so a re-import updates rows
    start_time: datetime
    env: str | None
    component: str | None
    source: str | None
    collected: int | None


@dataclass(frozen=True)
class RowMapper:
    """Maps one import's records to rows, with what the uploader gave: the project, a source
    and metadata that win over the report's, and when it was uploaded (a run's start time when
    the report has none). ``project_names`` gives the import's project as metadata may name it
    (its id and name); it is called only when metadata names a project."""

    project_id: uuid.UUID | None
    source: str | None
    metadata: dict[str, Any]
    created: datetime
    project_names: Callable[[], frozenset[str]]

    def run(self, record: RunRecord) -> tuple[OpenRun, Row]:
        """The run ``record`` opens, and its row: the uploader's metadata over the report's,
        owned; a fresh id unless the report keeps its own."""
        metadata = {**record.metadata, **self.metadata}
        if "project" in metadata or "run" in metadata:
            self.own(metadata, None)
        run_id = record.id or uuid.uuid4()
        run = OpenRun(
            id=run_id,
            id_text=str(run_id),
            keeps_ids=record.id is not None,
            start_time=record.start_time or self.created,
            env=cut_name(_text(metadata.get("env")) or record.env),
            component=cut_name(_text(metadata.get("component")) or record.component),
            source=cut_name(self.source or record.source or _text(metadata.get("source"))),
            collected=record.collected,
        )
        row: Row = {
            "id": run.id,
            "project_id": self.project_id,
            "data": metadata,
            "env": run.env,
            "component": run.component,
            "source": run.source,
            "start_time": run.start_time,
            "duration": record.duration,
            "created": utcnow(),
        }
        if record.collected is not None:
            row["summary"] = {"collected": record.collected}
        return run, row

    def result(self, record: ResultRecord, run: OpenRun) -> Row:
        """``record``'s row in ``run``: the uploader's metadata over the result's, owned; the
        run's start time, source, env and component where the result has none."""
        data = {**record.metadata, **self.metadata}
        if "project" in data or "run" in data:
            self.own(data, run.id_text)
        data["run"] = run.id_text
        return {
            "id": record.id,
            "project_id": self.project_id,
            "run_id": run.id,
            "test_id": stored_test_id(record.test_id),
            "result": record.result,
            "data": data,
            "params": record.params,
            "duration": record.duration,
            "start_time": record.start_time or run.start_time,
            "source": cut_name(self.source or record.source) or run.source,
            "env": cut_name(record.env) or run.env,
            "component": cut_name(record.component) or run.component,
        }

    def added_metadata(self, stored: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        """What of ``metadata``, learned after the run was opened, adds to the run's
        ``stored`` metadata (keys it has keep their value), owned."""
        added = {key: value for key, value in metadata.items() if key not in stored}
        self.own(added, None)
        return added

    def own(self, metadata: dict[str, Any], run_id: str | None) -> None:
        """Make ``metadata`` name no other run or project where the API reads them: a
        ``project`` that is not the import's becomes ``reported_project``; a result's ``run``
        (``run_id``) is its own run, another one kept as ``reported_run``."""
        project = metadata.get("project")
        if project is not None and str(project) not in self.project_names():
            metadata["reported_project"] = metadata.pop("project")
        reported = metadata.get("run")
        if run_id is not None and reported is not None and reported != run_id:
            metadata["reported_run"] = reported


def artifact_row(record: ArtifactRecord, run: OpenRun, uploaded: datetime) -> Row:
    """``record``'s row but its content (written apart, in slices): it belongs to its result,
    or without one to ``run``."""
    result_id = record.result_id
    owner = {"resultId": str(result_id)} if result_id else {"runId": run.id_text}
    return {
        "id": uuid.uuid4(),
        "content": None,
        "result_id": result_id,
        "run_id": None if result_id else run.id,
        "filename": record.filename,
        "data": {"contentType": record.content_type, **owner},
        "upload_date": uploaded,
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
