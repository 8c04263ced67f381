"""Filtered, paged queries over results or runs, scoped to one project and bounded in size.

Filters are (field, operator, value) triples checked against an allow-list, so no request
can reach a column, operator or SQL it was not meant to.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from ibutsu_server.db.models import Project, Result, Run

MAX_PAGE_SIZE = 1000
MAX_FILTERS = 20
MAX_PAYLOAD_BYTES = 1024 * 1024
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_FIELDS: dict[str, dict[str, InstrumentedAttribute[Any]]] = {
    "results": {
        "id": Result.id,
        "run_id": Result.run_id,
        "test_id": Result.test_id,
        "result": Result.result,
        "start_time": Result.start_time,
        "duration": Result.duration,
        "component": Result.component,
        "env": Result.env,
        "source": Result.source,
    },
    "runs": {
        "id": Run.id,
        "start_time": Run.start_time,
        "created": Run.created,
        "duration": Run.duration,
        "component": Run.component,
        "env": Run.env,
        "source": Run.source,
    },
}
_MODELS: dict[str, type[Result] | type[Run]] = {"results": Result, "runs": Run}
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


class QueryError(ValueError):
    """A query that is not allowed or not well-formed; the message says which part."""


@dataclass(frozen=True)
class Page:
    """One page of a query, as stored in the result backend."""

    items: list[dict[str, Any]]
    page: int
    page_size: int
    total: int
    total_is_estimate: bool
    truncated: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "page": self.page,
            "page_size": self.page_size,
            "total": self.total,
            "total_is_estimate": self.total_is_estimate,
            "truncated": self.truncated,
        }


def _column(kind: str, field: str) -> ColumnElement[Any]:
    if field.startswith("metadata."):
        key = field.removeprefix("metadata.")
        if not _METADATA_KEY.match(key):
            raise QueryError(f"bad metadata key {key!r}: letters, digits, '_', '.', '-' only")
        metadata: ColumnElement[Any] = _MODELS[kind].data[key].as_string()
        return metadata
    column = _FIELDS[kind].get(field)
    if column is None:
        allowed = ", ".join(sorted(_FIELDS[kind]))
        raise QueryError(f"{kind} cannot be filtered on {field!r}; allowed: {allowed}, metadata.*")
    return column.expression


def _value(column: ColumnElement[Any], operator: str, value: Any) -> Any:
    if operator == "in":
        if not isinstance(value, list) or not value or len(value) > MAX_PAGE_SIZE:
            raise QueryError(f"'in' needs a list of 1 to {MAX_PAGE_SIZE} values")
        return [_scalar(column, item) for item in value]
    return _scalar(column, value)


def _scalar(column: ColumnElement[Any], value: Any) -> Any:
    python_type = getattr(column.type, "python_type", str)
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise QueryError(f"filter values must be strings or numbers, got {value!r}")
    try:
        if python_type is datetime:
            return datetime.fromisoformat(str(value))
        if python_type is uuid.UUID:
            return uuid.UUID(str(value))
        if python_type is float:
            return float(value)
    except ValueError as exc:
        raise QueryError(f"bad value {value!r}: {exc}") from None
    return str(value)


def build_query(kind: str, project_id: uuid.UUID, filters: Sequence[Sequence[Any]]) -> Select[Any]:
    """The SELECT for ``filters`` within one project; QueryError for anything not allowed."""
    if kind not in _MODELS:
        raise QueryError(f"unknown kind {kind!r}: use 'results' or 'runs'")
    if len(filters) > MAX_FILTERS:
        raise QueryError(f"at most {MAX_FILTERS} filters")
    model = _MODELS[kind]
    query = select(model).where(model.project_id == project_id)
    for item in filters:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise QueryError(f"a filter is [field, operator, value], got {item!r}")
        field, operator, value = item
        if operator not in _OPERATORS:
            raise QueryError(f"unknown operator {operator!r}; allowed: {', '.join(_OPERATORS)}")
        column = _column(kind, str(field))
        if operator == "contains" and getattr(column.type, "python_type", str) is not str:
            raise QueryError(f"'contains' works on text fields only, not on {field!r}")
        query = query.where(_OPERATORS[operator](column, _value(column, operator, value)))
    return query


def _resolve_project(session: Session, project: str) -> uuid.UUID:
    if not project:
        raise QueryError("a project is required: queries are always scoped to one project")
    try:
        key = uuid.UUID(project)
    except ValueError:
        found = session.scalar(select(Project.id).where(Project.name == project))
    else:
        found = session.scalar(select(Project.id).where(Project.id == key))
    if found is None:
        raise QueryError(f"no project {project!r}")
    return found


def _estimate(session: Session, query: Select[Any]) -> int | None:
    """The planner's row estimate on PostgreSQL; None elsewhere."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    compiled = query.compile(session.get_bind())
    # Bound by the driver, never pasted into the SQL text.
    plan: list[dict[str, Any]] = (
        session.connection()
        .exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params)
        .scalar_one()
    )
    return int(plan[0]["Plan"]["Plan Rows"])


def _row(item: Result | Run) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS["results" if isinstance(item, Result) else "runs"]:
        value = getattr(item, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    out["metadata"] = item.data
    if isinstance(item, Run):
        out["summary"] = item.summary
    else:
        out["params"] = item.params
    return {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in out.items()}


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
    """One page (newest first) of ``kind`` matching ``filters`` in ``project``; the page is
    cut so its JSON stays under MAX_PAYLOAD_BYTES (``truncated`` says so)."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise QueryError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")
    if page < 1:
        raise QueryError(f"page must be 1 or more, got {page}")
    query = build_query(kind, _resolve_project(session, project), filters)
    model = _MODELS[kind]
    total = _estimate(session, query) if estimate else None
    is_estimate = total is not None
    if total is None:
        total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    ordered = query.order_by(model.start_time.desc().nulls_last(), model.id)
    rows = session.scalars(ordered.offset((page - 1) * page_size).limit(page_size)).all()
    items, size, truncated = [], 2, False
    for row in rows:
        item = _row(row)
        size += len(json.dumps(item, default=str)) + 1
        if size > MAX_PAYLOAD_BYTES:
            truncated = True
            break
        items.append(item)
    return Page(items, page, page_size, total, is_estimate, truncated)
