"""Deleting old rows in short batches, children first, each batch its own transaction.

Batches walk the time index from the oldest row (keyset pagination), so no batch rescans
what earlier batches deleted, and no batch holds locks for long. Artifacts and results that
belong to a doomed row are deleted before it (upstream's foreign keys do not cascade), so a
newer row can never block the delete. The ages are upstream's: artifacts by upload date,
results and runs by start time, imports (with their files) by when they were created.

Each batch ends with a checkpoint of the caller's transaction; nothing else here commits.

What a batch of results costs (EXPLAIN ANALYZE, 10,000 results): about four fifths is the
foreign-key check of ``artifacts.result_id``, one index probe per deleted result (20-40 us
each), which one plain DELETE pays alike; the rest is the heap deletes and their WAL (one
record of 54 bytes per row; a DELETE adds no index entries, vacuum removes them later), the
batch's artifacts (a join, or through their index: Pruner._scan says which), the time index
walked for the next batch, and a commit that does not wait for its WAL flush (Pruner._commit
says why it need not). So batches cost about what one DELETE does, each holding its locks for
a fraction of a second; their size follows how long the last one's DELETE took
(BATCH_SECONDS), as a row costs several times more on a loaded server than on an idle one.
"""

from __future__ import annotations

import calendar
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    CursorResult,
    Select,
    Table,
    delete,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from ibutsu_server.db.models import Artifact, Base, Import, ImportFile, Result, Run, utcnow
from ibutsu_server.db.sessions import Transaction

log = logging.getLogger(__name__)

BATCH_SIZE = 10_000
RUN_BATCH_SIZE = 200
# Unless the caller fixes the size, a batch's DELETE grows or shrinks to last about
# BATCH_SECONDS: under a second on a loaded server (where a row may cost several times more),
# few commits on an idle one. Its commit is left out of the measure: a commit's flush costs the
# same for any size, so counting it would shrink batches into ever more commits on a slow disk.
# It at most doubles from one batch to the next, and shrinks at once.
BATCH_SECONDS = 0.5
MIN_BATCH, MAX_BATCH = 2000, 100_000
# Retention below these is far more likely a typo than a policy.
MIN_MONTHS = {"artifacts": 1, "results": 1, "runs": 1}
MIN_IMPORT_FILE_DAYS = 1


class RetentionRefused(ValueError):
    """A retention so short that pruning could delete live data; never retried."""


@dataclass
class PruneReport:
    """How many rows of each table went, in how many batches, and the longest batch."""

    cutoff: datetime
    deleted: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    longest_batch_seconds: float = 0.0

    def count(self, table: str, rows: int) -> None:
        """Add ``rows`` deleted from ``table``; tables nothing was deleted from stay out."""
        if rows:
            self.deleted[table] = self.deleted.get(table, 0) + rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "deleted": dict(self.deleted),
            "batches": self.batches,
            "longest_batch_seconds": round(self.longest_batch_seconds, 4),
        }


def months_ago(now: datetime, months: int) -> datetime:
    """The same day and time ``months`` calendar months before ``now`` (clamped to month end)."""
    index = now.year * 12 + (now.month - 1) - months
    year, month = divmod(index, 12)
    day = min(now.day, calendar.monthrange(year, month + 1)[1])
    return now.replace(year=year, month=month + 1, day=day)


def check_retention(what: str, value: object, unit: str, minimum: int) -> int:
    """``value`` as an int (a string of digits too, as the admin page may send it), or
    RetentionRefused if it is not a sane retention for ``what``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RetentionRefused(
            f"refusing to prune {what}: the retention must be a whole number of {unit}, "
            f"at least {minimum}; got {value!r}"
        )
    return value


def check_months(table: str, months: object) -> int:
    """``months`` as an int, or RetentionRefused if it is not a sane retention for ``table``."""
    return check_retention(table, months, "months", MIN_MONTHS[table])


def _columns(model: type[Base]) -> ReadOnlyColumnCollection[str, Column[Any]]:
    return cast(Table, model.__table__).c


class Pruner:
    """Deletes rows older than a cutoff in batches, each batch its own timed transaction."""

    def __init__(
        self, transaction: Transaction, cutoff: datetime, batch_size: int | None = None
    ) -> None:
        self.transaction = transaction
        self.session = transaction.session
        self.batch_size = batch_size or BATCH_SIZE
        self.adaptive = batch_size is None
        self.report = PruneReport(cutoff=cutoff)
        self.postgresql = self.session.get_bind().dialect.name == "postgresql"
        # Rows in each child table, as the planner's statistics estimate them (reltuples).
        self._table_rows: dict[str, float] = {}

    def by_time(
        self,
        column: ColumnElement[Any],
        key: Column[Any],
        children: Sequence[Column[Any]] = (),
        *,
        batch_size: int | None = None,
        before: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """Delete every row whose ``column`` is before the cutoff: oldest first, ``children``
        rows (foreign keys to ``key``) first. ``before`` runs on each batch's keys ahead of
        the delete, for work too big for one transaction."""
        size = batch_size or self.batch_size
        if before is None and self.postgresql:
            self._by_time_in_server(column, key, children, size, self.adaptive and not batch_size)
            return
        floor: datetime | None = None
        while True:
            started = time.perf_counter()
            query = self._oldest(select(key, column), column, floor, size)
            rows = self.session.execute(query).all()
            if not rows:
                return
            ids = [row[0] for row in rows]
            if before is not None:
                before(ids)
                started = time.perf_counter()
            self._delete(key, ids, children)
            self._commit(started)
            if len(rows) < size:
                return
            floor = rows[-1][1]

    def _oldest(
        self, query: Select[Any], column: ColumnElement[Any], floor: datetime | None, size: int
    ) -> Select[Any]:
        """``query`` narrowed to the next batch: rows older than the cutoff, from ``floor``
        on (keyset pagination: no batch rescans what an earlier one deleted), oldest first."""
        query = query.where(column < self.report.cutoff)
        if floor is not None:
            query = query.where(column >= floor)
        return query.order_by(column).limit(size)

    def _by_time_in_server(
        self,
        column: ColumnElement[Any],
        key: Column[Any],
        children: Sequence[Column[Any]],
        size: int,
        adaptive: bool,
    ) -> None:
        """by_time in one statement per batch (PostgreSQL's data-modifying WITH): the keys
        never travel to Python and back, so a batch costs little more than its share of one
        plain DELETE."""
        table = key.table
        assert isinstance(table, Table)
        floor: datetime | None = None
        while True:
            started = time.perf_counter()
            doomed = select(key.label("key"), literal_column("ctid").label("row"))
            batch = self._oldest(doomed, column, floor, size).cte("doomed")
            keys = func.array(select(batch.c.key).scalar_subquery())
            gone_children = [
                delete(child.table)
                .where(child == (batch.c.key if self._scan(child, size) else func.any(keys)))
                .returning(child)
                .cte(f"gone_{n}")
                for n, child in enumerate(children)
            ]
            # By physical row address (a TID scan), not through the primary-key index; the
            # cutoff is checked again in case a row changed since the batch was chosen.
            rows = func.array(select(batch.c.row).scalar_subquery())
            gone = (
                delete(table)
                .where(literal_column("ctid") == func.any(rows), column < self.report.cutoff)
                .returning(column.label("at"))
                .cte("gone")
            )
            counts = [select(func.count()).select_from(c).scalar_subquery() for c in gone_children]
            row = self.session.execute(
                select(func.count(), func.max(gone.c.at), *counts).select_from(gone)
            ).one()
            deleting = time.perf_counter() - started
            deleted = int(cast(int, row[0]))
            for child, count in zip(children, row[2:], strict=True):
                assert isinstance(child.table, Table)
                self.report.count(child.table.name, int(cast(int, count)))
            self.report.count(table.name, deleted)
            self._commit(started)
            if deleted < size:
                return
            floor = cast(datetime, row[1])
            if adaptive:
                size = max(
                    MIN_BATCH, min(MAX_BATCH, 2 * size, int(size * BATCH_SECONDS / deleting))
                )

    def _scan(self, child: Column[Any], size: int) -> bool:
        """Whether a batch of ``size`` keys finds its rows in ``child``'s table by scanning
        it whole (a join: the table hashed, every key looked up in the hash) rather than
        through ``child``'s index, key by key. A scanned row costs less than a probe, so the
        join wins while the table has fewer rows than the batch has keys: the usual case for
        artifacts, which only some results have. A bigger table is probed: scanning it whole
        at every batch would cost without bound. So is one of unknown size: never analysed
        (reltuples -1; 0 before PostgreSQL 14), or empty, where a probe costs nothing."""
        table = child.table
        assert isinstance(table, Table)
        if table.name not in self._table_rows:
            self._table_rows[table.name] = float(
                self.session.execute(
                    text("SELECT reltuples FROM pg_class WHERE oid = CAST(:table AS regclass)"),
                    {"table": table.name},
                ).scalar_one()
            )
        return 0 < self._table_rows[table.name] < size

    def by_query(
        self, key: Column[Any], ids_query: Select[Any], children: Sequence[Column[Any]] = ()
    ) -> None:
        """Delete the rows ``ids_query`` selects (it must yield ``key`` values), ``children``
        first, a batch at a time, until it yields none."""
        while True:
            started = time.perf_counter()
            ids = list(self.session.scalars(ids_query.limit(self.batch_size)))
            self._delete(key, ids, children)
            self._commit(started)
            if len(ids) < self.batch_size:
                return

    def _delete(
        self, key: Column[Any], ids: Sequence[Any], children: Sequence[Column[Any]]
    ) -> None:
        if not ids:
            return
        for column in (*children, key):
            table = column.table
            assert isinstance(table, Table)
            done = cast(
                CursorResult[Any], self.session.execute(delete(table).where(column.in_(ids)))
            )
            self.report.count(table.name, done.rowcount)

    def _commit(self, started: float) -> None:
        if self.postgresql:
            # A batch lost with a crash is only deleted again by the next run, so its commit
            # need not wait for the disk: PostgreSQL's asynchronous commit loses at most the
            # last few commits in a crash, never consistency, and spares a flush per batch.
            self.session.execute(text("SET LOCAL synchronous_commit TO off"))
        self.transaction.checkpoint("a pruning batch")
        elapsed = time.perf_counter() - started
        self.report.batches += 1
        self.report.longest_batch_seconds = max(self.report.longest_batch_seconds, elapsed)


def prune_artifacts(
    transaction: Transaction, months: object, batch_size: int | None = None
) -> PruneReport:
    """Delete artifacts uploaded more than ``months`` months ago."""
    cutoff = months_ago(utcnow(), check_months("artifacts", months))
    pruner = Pruner(transaction, cutoff, batch_size)
    artifacts = _columns(Artifact)
    pruner.by_time(artifacts.upload_date, artifacts.id)
    return _logged("artifacts", pruner.report)


def prune_results(
    transaction: Transaction, months: object, batch_size: int | None = None
) -> PruneReport:
    """Delete results that started more than ``months`` months ago, their artifacts first."""
    cutoff = months_ago(utcnow(), check_months("results", months))
    pruner = Pruner(transaction, cutoff, batch_size)
    results = _columns(Result)
    pruner.by_time(results.start_time, results.id, [_columns(Artifact).result_id])
    return _logged("results", pruner.report)


def prune_runs(
    transaction: Transaction, months: object, batch_size: int | None = None
) -> PruneReport:
    """Delete runs that started more than ``months`` months ago with their results and
    artifacts; a run's results go in batches first, so no transaction grows with a run."""
    cutoff = months_ago(utcnow(), check_months("runs", months))
    pruner = Pruner(transaction, cutoff, batch_size)
    artifacts, results, runs = _columns(Artifact), _columns(Result), _columns(Run)

    def results_first(run_ids: list[uuid.UUID]) -> None:
        doomed = select(results.id).where(results.run_id.in_(run_ids))
        pruner.by_query(results.id, doomed, [artifacts.result_id])

    pruner.by_time(
        runs.start_time,
        runs.id,
        [artifacts.run_id],
        batch_size=RUN_BATCH_SIZE,
        before=results_first,
    )
    return _logged("runs", pruner.report)


def prune_imports(
    transaction: Transaction, days: object, batch_size: int | None = None
) -> PruneReport:
    """Delete imports created more than ``days`` days ago, with their stored files."""
    days = check_retention("imports", days, "days", MIN_IMPORT_FILE_DAYS)
    cutoff = utcnow() - timedelta(days=days)
    pruner = Pruner(transaction, cutoff, batch_size)
    imports = _columns(Import)
    pruner.by_time(imports.created, imports.id, [_columns(ImportFile).import_id])
    return _logged("imports", pruner.report)


def _logged(what: str, report: PruneReport) -> PruneReport:
    deleted = ", ".join(f"{n} {table}" for table, n in sorted(report.deleted.items())) or "nothing"
    log.info(
        "pruned %s older than %s: %s in %d batches (longest %.3fs)",
        what,
        report.cutoff.isoformat(),
        deleted,
        report.batches,
        report.longest_batch_seconds,
    )
    return report
