"""Writing parsed results in batches: COPY on PostgreSQL, multi-row INSERT elsewhere, and
multi-row upserts (INSERT ... ON CONFLICT (id) DO UPDATE) for imports that keep their ids."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Base, Result
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.records import ParsedResult

BATCH_SIZE = 5000
COPY_READ_SIZE = 256 * 1024
COLUMNS = (
    "id",
    "run_id",
    "project_id",
    "test_id",
    "result",
    "start_time",
    "duration",
    "component",
    "env",
    "source",
    "params",
    "data",
)
# ORM bulk INSERTs leave out None values unless asked, which splits a batch into one
# statement per pattern of missing values.
BULK_OPTIONS = {"render_nulls": True}
_COPY_SQL = f"COPY results ({', '.join(COLUMNS)}) FROM STDIN"
_JSON = json.JSONEncoder(separators=(",", ":"))


def _copy_text(value: str) -> str:
    """``value`` escaped for COPY's text format (chained replaces beat str.translate here)."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _copy_field(value: Any) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, dict):
        return _copy_text(_JSON.encode(value))
    if isinstance(value, datetime):
        return value.isoformat()
    return _copy_text(str(value))


def dialect_insert(session: Session, model: type[Base]) -> Any:
    """An INSERT with ON CONFLICT support for the session's database (PostgreSQL, SQLite)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


def upsert(session: Session, model: type[Base], rows: list[dict[str, Any]], owner: str) -> None:
    """Insert ``rows`` of ``model``, replacing the rows whose id already exists, but only
    where the existing row has the same ``owner`` column (a result its run, a run its
    project): an upload can never take over somebody else's rows by naming their ids.

    Every row must have the same keys, "id" and ``owner`` among them. PostgreSQL and SQLite.
    """
    if not rows:
        return
    statement = dialect_insert(session, model)
    # With RETURNING, SQLAlchemy sends the rows as multi-row VALUES pages ("insertmanyvalues");
    # without it, it would send an upsert row by row.
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={key: statement.excluded[key] for key in rows[0] if key != "id"},
        where=statement.table.c[owner].is_not_distinct_from(statement.excluded[owner]),
    ).returning(statement.table.c.id)
    # ON CONFLICT may touch a row only once per statement: the last copy of an id wins.
    unique = list({row["id"]: row for row in rows}.values())
    written = len(session.execute(statement, unique, execution_options=BULK_OPTIONS).all())
    if written < len(unique):
        raise ReportError(
            f"{len(unique) - written} {model.__tablename__} id(s) of this upload already belong "
            f"to another {owner.removesuffix('_id')}; ids are kept, so they cannot be reused"
        )


class _LineReader(io.TextIOBase):
    """A file that psycopg2's COPY reads, filled from an iterator of lines on demand, so the
    report is never formatted whole in memory."""

    def __init__(self, lines: Iterator[str]) -> None:
        super().__init__()
        self._lines = lines
        self._rest = ""
        #: What the lines' producer raised; psycopg2 only reports that reading failed.
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        parts, length = [self._rest], len(self._rest)
        while size is None or size < 0 or length < size:
            try:
                line = next(self._lines, None)
            except BaseException as exc:
                self.error = exc
                raise
            if line is None:
                break
            parts.append(line)
            length += len(line)
        text = "".join(parts)
        if size is None or size < 0:
            self._rest = ""
            return text
        self._rest = text[size:]
        return text[:size]


class ResultWriter:
    """Buffers results of one run and writes them BATCH_SIZE at a time, in the caller's
    transaction, so an import that fails leaves nothing behind. With ``upsert``, results whose
    id exists are replaced instead of duplicated (slower than COPY, so only when ids are kept).
    """

    def __init__(
        self,
        session: Session,
        *,
        run_id: uuid.UUID,
        project_id: uuid.UUID | None,
        component: str | None,
        env: str | None,
        source: str | None,
        upsert: bool = False,
    ) -> None:
        self.session = session
        self.fixed = {
            "run_id": run_id,
            "project_id": project_id,
            "component": component,
            "env": env,
            "source": source,
        }
        self.buffer: list[dict[str, Any]] = []
        self.written = 0
        self.upsert = upsert
        # On PostgreSQL, new results stream through one COPY; the run-wide columns are
        # formatted once.
        self.copying = session.get_bind().dialect.name == "postgresql" and not upsert
        self._run_columns = "\t".join(map(_copy_field, (run_id, project_id)))
        self._origin_columns = "\t".join(map(_copy_field, (component, env, source)))

    def add(self, parsed: ParsedResult, **columns: Any) -> None:
        """Buffer one result, writing a batch when the buffer is full; ``columns`` override the
        run-wide component, env or source for this result."""
        self.buffer.append(
            {
                **self.fixed,
                **columns,
                "id": parsed.id,
                "test_id": parsed.test_id,
                "result": parsed.result,
                "start_time": parsed.start_time,
                "duration": parsed.duration,
                "params": parsed.params,
                "data": parsed.metadata,
            }
        )
        if len(self.buffer) >= BATCH_SIZE:
            self.flush()

    def add_all(self, results: Iterable[ParsedResult]) -> None:
        """Write every result: on PostgreSQL as one streamed COPY, so the server stores rows
        while the parser reads on; elsewhere in batches."""
        if self.copying:
            self._copy_all(results)
            return
        for parsed in results:
            self.add(parsed)
        self.flush()

    def _copy_line(self, parsed: ParsedResult) -> str:
        self.written += 1
        return (
            f"{parsed.id}\t{self._run_columns}\t{_copy_text(parsed.test_id)}\t"
            f"{_copy_text(parsed.result)}\t{_copy_field(parsed.start_time)}\t"
            f"{_copy_field(parsed.duration)}\t{self._origin_columns}\t"
            f"{_copy_field(parsed.params)}\t{_copy_field(parsed.metadata)}\n"
        )

    def _copy_all(self, results: Iterable[ParsedResult]) -> None:
        dbapi_connection: Any = self.session.connection().connection.dbapi_connection
        source = _LineReader(map(self._copy_line, results))
        # psycopg2's COPY: several times faster than any INSERT form. An error raised while
        # reading (bad input) aborts the COPY, and the caller's rollback removes its rows.
        with dbapi_connection.cursor() as cursor:
            try:
                cursor.copy_expert(_COPY_SQL, source, size=COPY_READ_SIZE)
            except Exception:
                if source.error is not None:
                    raise source.error from None
                raise

    def flush(self) -> None:
        """Write what is buffered."""
        if not self.buffer:
            return
        if self.upsert:
            upsert(self.session, Result, self.buffer, owner="run_id")
        else:
            self.session.execute(insert(Result), self.buffer, execution_options=BULK_OPTIONS)
        self.written += len(self.buffer)
        self.buffer = []
