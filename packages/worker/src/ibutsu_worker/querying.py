"""Paged queries over results or runs, bounded in what they load and store.

Two ways in. Upstream's API sends ``query_task`` its own filter strings (``"run_id=<uuid>"``,
``"metadata.jenkins.build_number>10"``; the operators of its ``util/query.py``) for pages over
500 rows, and stores the page in the shape its ``GET /api/task/{id}`` returns; the API scopes
the filters to what the user may see before it sends them. Our own ``query`` takes structured
``[field, operator, value]`` filters from an allow-list and always one project.

Either way only the table's own columns and its JSON documents can be named, values are bound
parameters, rows are streamed and the page stops at MAX_PAYLOAD_BYTES of JSON (``truncated``
says so).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Select, Text, Uuid, cast, func, select, text
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project, Result, Run
from ibutsu_worker.importing.values import parse_timestamp

MAX_PAGE_SIZE = 1000
MAX_TASK_PAGE_SIZE = 10_000
MAX_FILTERS = 20
MAX_PAYLOAD_BYTES = 1024 * 1024
# Below this many estimated rows, counting exactly is cheap (upstream's COUNT_ESTIMATE_LIMIT).
EXACT_COUNT_BELOW = 1000
STREAM_ROWS = 200
_JSON_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

MODELS: dict[str, type[Result] | type[Run]] = {"results": Result, "runs": Run}
# What the API serialises for each row (upstream's to_dict), "data" shown as "metadata".
COLUMNS: dict[str, tuple[str, ...]] = {
    "results": (
        "id", "project_id", "run_id", "test_id", "result", "data", "params", "duration",
        "start_time", "source", "env", "component",
    ),
    "runs": (
        "id", "project_id", "data", "env", "component", "source", "start_time", "duration",
        "summary", "created",
    ),
}  # fmt: skip
# Upstream's JSON paths that compare as numbers or as arrays (its constants.py).
NUMERIC_PATHS = frozenset(
    {
        "summary.failures",
        "summary.errors",
        "summary.pass_percent",
        "summary.passes",
        "summary.skips",
        "summary.tests",
        "summary.xfailures",
        "summary.xpasses",
    }
)
ARRAY_PATHS = frozenset({"metadata.tags", "metadata.markers", "metadata.annotations"})
_JSON_ROOTS = {"data": "data", "metadata": "data", "summary": "summary"}


class QueryError(ValueError):
    """A query that is not allowed or not well-formed; the message says which part."""


@dataclass(frozen=True)
class Page:
    """One page of a query: its rows (as the API serialises them) and how many there are."""

    kind: str
    rows: list[dict[str, Any]]
    page: int
    page_size: int
    total: int
    total_is_estimate: bool
    truncated: bool

    def as_task_result(self) -> dict[str, Any]:
        """The page in the shape upstream's ``GET /api/task/{id}`` returns."""
        result: dict[str, Any] = {
            self.kind: self.rows,
            "pagination": {
                "page": self.page,
                "pageSize": self.page_size,
                "totalItems": self.total,
                "totalPages": math.ceil(self.total / self.page_size),
            },
        }
        if self.truncated:
            result["truncated"] = True
        return result

    def as_dict(self) -> dict[str, Any]:
        """The page as our own ``query`` task stores it (JSON-ready)."""
        items = [
            {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
            for row in self.rows
        ]
        return {
            "items": items,
            "page": self.page,
            "page_size": self.page_size,
            "total": self.total,
            "total_is_estimate": self.total_is_estimate,
            "truncated": self.truncated,
        }


# --- columns and values ----------------------------------------------------------------------


def _json_path(kind: str, field: str) -> ColumnElement[Any] | None:
    root, _, path = field.partition(".")
    if root not in _JSON_ROOTS or (root == "summary" and kind != "runs"):
        return None
    parts = path.split(".") if path else []
    if not parts or not all(_JSON_KEY.match(part) for part in parts):
        raise QueryError(f"bad JSON path {field!r}: dot-separated letters, digits, '_' or '-'")
    column: Any = getattr(MODELS[kind], _JSON_ROOTS[root])
    element = column[tuple(parts)] if len(parts) > 1 else column[parts[0]]
    normalised = f"{'summary' if root == 'summary' else 'metadata'}.{path}"
    if normalised in NUMERIC_PATHS:
        return element.as_float()  # type: ignore[no-any-return]
    if normalised in ARRAY_PATHS:
        return element  # type: ignore[no-any-return]
    return element.as_string()  # type: ignore[no-any-return]


def _check_kind(kind: object) -> None:
    if kind not in MODELS:
        raise QueryError(f"unknown table {kind!r}: use 'results' or 'runs'")


def column_for(kind: str, field: str) -> ColumnElement[Any]:
    """The column or JSON element ``field`` names in ``kind``; QueryError for anything else."""
    _check_kind(kind)
    element = _json_path(kind, field)
    if element is not None:
        return element
    if field in COLUMNS[kind] and field != "data":
        return getattr(MODELS[kind], field).expression  # type: ignore[no-any-return]
    allowed = ", ".join(c for c in COLUMNS[kind] if c != "data")
    raise QueryError(f"{kind} cannot be filtered on {field!r}; allowed: {allowed}, metadata.*")


def _numeric(column: ColumnElement[Any]) -> bool:
    try:
        return column.type.python_type in (int, float)
    except NotImplementedError:
        return False


def _typed(column: ColumnElement[Any], value: Any) -> Any:
    """``value`` as the column's type wants it; QueryError when it cannot be."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise QueryError(f"filter values must be strings or numbers, got {value!r}")
    if isinstance(column.type, Uuid):
        try:
            return uuid.UUID(str(value))
        except ValueError:
            raise QueryError(f"bad value {value!r}: not a UUID") from None
    if isinstance(column.type, DateTime):
        parsed = parse_timestamp(str(value))
        if parsed is None:
            raise QueryError(f"bad value {value!r}: not an ISO 8601 date")
        return parsed
    if _numeric(column):
        try:
            return float(value)
        except ValueError:
            raise QueryError(f"bad value {value!r}: not a number") from None
    return str(value)


# --- upstream's filter strings (query_task) --------------------------------------------------

# Longest first: ">=" before ">". ")" and "(" are the frontend's URL-safe ">=" and "<=".
_UPSTREAM_OPERATORS = ("!", ">=", "<=", ">", ")", "<", "(", "~", "*", "%", "@", "=")
_FILTER = re.compile(
    r"^([a-zA-Z0-9._-]+)("
    + "|".join(re.escape(op) for op in sorted(_UPSTREAM_OPERATORS, key=len, reverse=True))
    + r")(.*)$",
    re.DOTALL,
)
_COMPARE: dict[str, Callable[[ColumnElement[Any], Any], ColumnElement[bool]]] = {
    "=": lambda column, value: column == value,
    "!": lambda column, value: column != value,
    ">=": lambda column, value: column >= value,
    ")": lambda column, value: column >= value,
    "<=": lambda column, value: column <= value,
    "(": lambda column, value: column <= value,
    ">": lambda column, value: column > value,
    "<": lambda column, value: column < value,
}


def filter_clause(kind: str, filter_string: str, dialect: str) -> ColumnElement[bool]:
    """One of upstream's filter strings as a WHERE clause over ``kind``."""
    match = _FILTER.match(filter_string) if isinstance(filter_string, str) else None
    if match is None:
        raise QueryError(f"not a filter: {str(filter_string)[:100]!r} (field, operator, value)")
    field, operator, raw = match.group(1), match.group(2), match.group(3).strip('"')
    column = column_for(kind, field)
    if operator == "@":
        present = raw[:1].lower() in ("y", "t", "1")
        return column.is_not(None) if present else column.is_(None)
    values = raw.split(";") if operator == "*" else [raw]
    root, _, path = field.partition(".")
    if root in _JSON_ROOTS and f"metadata.{path}" in ARRAY_PATHS:
        return _array_clause(field, operator, column, values, dialect)
    if operator == "~":
        if dialect != "postgresql":
            raise QueryError("regular expressions ('~') need PostgreSQL")
        target = cast(column, Text) if isinstance(column.type, Uuid) else column
        return target.op("~")(raw)
    if operator == "%":
        return cast(column, Text).ilike(f"%{raw}%", escape="\\")
    typed = [_upstream_value(column, value) for value in values]
    if operator == "*":
        return column.in_(typed)
    return _COMPARE[operator](column, typed[0])


def _array_clause(
    field: str, operator: str, column: ColumnElement[Any], values: list[str], dialect: str
) -> ColumnElement[bool]:
    """Upstream's array fields (metadata.tags...): '=' holds the value, '*' any of them."""
    if dialect != "postgresql":
        raise QueryError(f"filtering on the array {field!r} needs PostgreSQL")
    if operator == "=":
        return column.op("@>")(func.to_jsonb(values))
    if operator == "*":
        return column.op("?|")(array(values))
    raise QueryError(f"the array {field!r} takes '=' or '*' only")


def _upstream_value(column: ColumnElement[Any], value: str) -> Any:
    # Ids, dates and numbers are typed; everything else compares as the text it is.
    if isinstance(column.type, Uuid | DateTime) or _numeric(column):
        return _typed(column, value)
    return value


def task_query(
    session: Session,
    filters: Sequence[str] | None,
    page: int,
    page_size: int,
    estimate: bool,
    kind: str,
) -> Page:
    """``query_task``: a page of ``kind`` matching upstream's filter strings, newest first."""
    _check_kind(kind)
    if filters is not None and not isinstance(filters, list | tuple):
        raise QueryError("filters must be a list of filter strings")
    filters = list(filters or [])
    if len(filters) > MAX_FILTERS:
        raise QueryError(f"at most {MAX_FILTERS} filters")
    _check_paging(page, page_size, MAX_TASK_PAGE_SIZE)
    model = MODELS[kind]
    dialect = session.get_bind().dialect.name
    query = select(model).where(*(filter_clause(kind, f, dialect) for f in filters))
    return _page(session, kind, query, page, page_size, estimate, unfiltered=not filters)


# --- our structured filters (query) ----------------------------------------------------------

_OPERATORS: dict[str, Callable[[ColumnElement[Any], Any], ColumnElement[bool]]] = {
    "eq": lambda column, value: column == value,
    "ne": lambda column, value: column != value,
    "gt": lambda column, value: column > value,
    "gte": lambda column, value: column >= value,
    "lt": lambda column, value: column < value,
    "lte": lambda column, value: column <= value,
    "in": lambda column, value: column.in_(value),
    "contains": lambda column, value: column.contains(value, autoescape=True),
}


def _structured_value(column: ColumnElement[Any], operator: str, value: Any) -> Any:
    if operator == "in":
        if not isinstance(value, list) or not value or len(value) > MAX_PAGE_SIZE:
            raise QueryError(f"'in' needs a list of 1 to {MAX_PAGE_SIZE} values")
        return [_typed(column, item) for item in value]
    return _typed(column, value)


def build_query(kind: str, project_id: uuid.UUID, filters: Sequence[Sequence[Any]]) -> Select[Any]:
    """The SELECT for structured ``filters`` within one project; QueryError for anything else."""
    _check_kind(kind)
    if len(filters) > MAX_FILTERS:
        raise QueryError(f"at most {MAX_FILTERS} filters")
    model = MODELS[kind]
    query = select(model).where(model.project_id == project_id)
    for item in filters:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise QueryError(f"a filter is [field, operator, value], got {item!r}")
        field, operator, value = item
        if operator not in _OPERATORS:
            raise QueryError(f"unknown operator {operator!r}; allowed: {', '.join(_OPERATORS)}")
        column = column_for(kind, str(field))
        if operator == "contains" and getattr(column.type, "python_type", str) is not str:
            raise QueryError(f"'contains' works on text fields only, not on {field!r}")
        query = query.where(
            _OPERATORS[operator](column, _structured_value(column, operator, value))
        )
    return query


def _resolve_project(session: Session, project: str) -> uuid.UUID:
    if not project:
        raise QueryError("a project is required: queries are always scoped to one project")
    found = session.scalar(select(Project.id).where(Project.named(project)).limit(1))
    if found is None:
        raise QueryError(f"no project {project!r}")
    return found


def run_query(
    session: Session,
    *,
    kind: str,
    project: str,
    filters: Sequence[Sequence[Any]] = (),
    page: int = 1,
    page_size: int = 100,
    estimate: bool = False,
) -> Page:
    """One page (newest first) of ``kind`` matching structured ``filters`` in ``project``."""
    _check_paging(page, page_size, MAX_PAGE_SIZE)
    query = build_query(kind, _resolve_project(session, project), filters)
    return _page(session, kind, query, page, page_size, estimate, unfiltered=False)


# --- paging, counting, streaming ------------------------------------------------------------


def _check_paging(page: Any, page_size: Any, maximum: int) -> None:
    for name, value in (("page", page), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise QueryError(f"{name} must be a whole number, got {value!r}")
    if not 1 <= page_size <= maximum:
        raise QueryError(f"page_size must be between 1 and {maximum}, got {page_size}")
    if page < 1:
        raise QueryError(f"page must be 1 or more, got {page}")


def _count(
    session: Session, query: Select[Any], kind: str, estimate: bool, unfiltered: bool
) -> tuple[int, bool]:
    exact = select(func.count()).select_from(query.order_by(None).subquery())
    if not estimate or session.get_bind().dialect.name != "postgresql":
        return int(session.scalar(exact) or 0), False
    if unfiltered:
        rows = session.scalar(
            text("SELECT reltuples FROM pg_class WHERE relname = :name"), {"name": kind}
        )
        guess = max(int(rows or 0), 0)
    else:
        # Expanding parameters ("in" lists) rendered as plain ones: EXPLAIN takes any filter.
        compiled = query.compile(session.get_bind(), compile_kwargs={"render_postcompile": True})
        # Bound by the driver, never pasted into the SQL text.
        plan: list[dict[str, Any]] = (
            session.connection()
            .exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params)
            .scalar_one()
        )
        guess = int(plan[0]["Plan"]["Plan Rows"])
    if guess < EXACT_COUNT_BELOW:
        return int(session.scalar(exact) or 0), False
    return guess, True


def _serialise(kind: str, row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in COLUMNS[kind]:
        value = getattr(row, name)
        out["metadata" if name == "data" else name] = (
            str(value) if isinstance(value, uuid.UUID) else value
        )
    if out.get("metadata") is None:
        out["metadata"] = {}
    return out


def _stored_size(kind: str) -> ColumnElement[int]:
    """About how many characters a row of ``kind`` takes as JSON, computed by the database
    from the row's columns as text (a lower bound: JSON escapes some characters)."""
    model = MODELS[kind]
    sizes = [
        func.coalesce(func.length(cast(getattr(model, name), Text)), 0) for name in COLUMNS[kind]
    ]
    total: ColumnElement[int] = sizes[0]
    for size in sizes[1:]:
        total = total + size
    return total


def _page(
    session: Session,
    kind: str,
    query: Select[Any],
    page: int,
    page_size: int,
    estimate: bool,
    unfiltered: bool,
) -> Page:
    """The page, loading no more rows than its payload can hold: first each row's id and
    size, in order, up to MAX_PAYLOAD_BYTES; then only those rows. Memory follows what is
    returned, however big the rows it skips."""
    total, is_estimate = _count(session, query, kind, estimate, unfiltered)
    model = MODELS[kind]
    ordered = (
        query.order_by(model.start_time.desc(), model.id)
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    sizes = ordered.with_only_columns(model.id, _stored_size(kind)).execution_options(
        yield_per=STREAM_ROWS
    )
    chosen: list[Any] = []
    size, truncated = 2, False
    with contextlib.closing(session.execute(sizes)) as streamed:
        for row_id, row_size in streamed:
            size += int(row_size) + 1
            if size > MAX_PAYLOAD_BYTES:
                truncated = True
                break
            chosen.append(row_id)
    rows: list[dict[str, Any]] = []
    if chosen:
        columns = [getattr(model, name) for name in COLUMNS[kind]]
        loaded = {
            row.id: row for row in session.execute(select(*columns).where(model.id.in_(chosen)))
        }
        size = 2
        for row_id in chosen:
            item = _serialise(kind, loaded[row_id])
            size += len(json.dumps(item, default=str)) + 1
            if size > MAX_PAYLOAD_BYTES:
                truncated = True
                break
            rows.append(item)
    return Page(kind, rows, page, page_size, total, is_estimate, truncated)
