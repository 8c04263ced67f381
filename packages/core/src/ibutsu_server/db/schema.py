"""Ibutsu's schema as upstream's backend creates it: Alembic head ``d18de2b3253f`` of
ibutsu-server 3.1.1, table by table, column by column, with its constraint and index names.

The schema belongs to Ibutsu's backend; the workers are guests in it and need no table or
column of their own. These tables serve two purposes: the models map onto them, and the
``ibutsu-tasks`` migration creates exactly them on an empty database (embedded default,
tests, benchmarks, standalone use). Upstream's PostgreSQL-only indexes (JSON expressions, GIN)
are created on PostgreSQL only, as upstream's migrations do.

Timestamps are ``timestamp without time zone`` holding UTC, as upstream stores them.
"""

from __future__ import annotations

import uuid

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

#: The upstream Alembic revision these tables reproduce.
UPSTREAM_REVISION = "d18de2b3253f"

# PostgreSQL's own default names, which upstream's tables carry.
metadata = MetaData(
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "fk": "%(table_name)s_%(column_0_name)s_fkey",
        "ix": "ix_%(column_0_label)s",
    }
)
JSONType = JSON().with_variant(JSONB(), "postgresql")


def _id() -> Column[object]:
    # A Python-side default only: upstream's DDL has none.
    return Column("id", Uuid(), primary_key=True, default=uuid.uuid4)


def _fk(name: str, target: str, **kwargs: object) -> Column[object]:
    return Column(name, Uuid(), ForeignKey(target, **kwargs), index=True)  # type: ignore[arg-type]


def _pg_index(name: str, *expressions: str, using: str = "btree") -> Index:
    """An index upstream creates on PostgreSQL only (JSON expressions, GIN)."""
    return Index(name, *(text(e) for e in expressions), postgresql_using=using).ddl_if(
        dialect="postgresql"
    )


users = Table(
    "users",
    metadata,
    _id(),
    Column("email", Text, nullable=False, index=True, unique=True),
    Column("_password", Text),
    Column("name", Text),
    Column("activation_code", Text),
    Column("is_superadmin", Boolean, nullable=False),
    Column("is_active", Boolean, nullable=False),
    _fk("group_id", "groups.id"),
)

groups = Table(
    "groups",
    metadata,
    _id(),
    Column("name", Text, index=True),
    Column("data", JSONType),
)

projects = Table(
    "projects",
    metadata,
    _id(),
    Column("name", Text, index=True),
    Column("title", Text, index=True),
    _fk("owner_id", "users.id"),
    _fk("group_id", "groups.id"),
    Column(
        "default_dashboard_id",
        Uuid(),
        ForeignKey("dashboards.id", use_alter=True, name="fk_project_default_dashboard"),
    ),
)

users_projects = Table(
    "users_projects",
    metadata,
    Column("user_id", Uuid(), ForeignKey("users.id"), primary_key=True),
    Column("project_id", Uuid(), ForeignKey("projects.id"), primary_key=True),
)

dashboards = Table(
    "dashboards",
    metadata,
    _id(),
    Column("title", Text, index=True),
    Column("description", Text),
    Column("filters", Text),
    Column(
        "project_id",
        Uuid(),
        ForeignKey("projects.id", name="fk_dashboards_project_id"),
        index=True,
    ),
    _fk("user_id", "users.id"),
)

widget_configs = Table(
    "widget_configs",
    metadata,
    _id(),
    _fk("project_id", "projects.id"),
    _fk("dashboard_id", "dashboards.id"),
    Column("title", Text, index=True),
    Column("type", Text, index=True),
    Column("weight", Integer, index=True),
    Column("widget", Text, index=True),
    Column("params", JSONType),
    Column("navigable", Boolean, index=True),
)

tokens = Table(
    "tokens",
    metadata,
    _id(),
    Column("name", Text, nullable=False),
    Column("token", Text, nullable=False),
    Column("expires", DateTime),
    _fk("user_id", "users.id"),
)

runs = Table(
    "runs",
    metadata,
    _id(),
    _fk("project_id", "projects.id"),
    Column("data", JSONType),
    Column("env", Text, index=True),
    Column("component", Text, index=True),
    Column("source", Text, index=True),
    Column("start_time", DateTime, nullable=False, index=True),
    Column("duration", Float, index=True),
    Column("summary", JSONType),
    Column("created", DateTime, nullable=False, index=True),
    _pg_index("ix_runs_jenkins_build_number", "((data -> 'jenkins') ->> 'build_number')"),
    _pg_index("ix_runs_jenkins_job_name", "((data -> 'jenkins') ->> 'job_name')"),
    _pg_index(
        "ix_runs_jjn_jbn",
        "((data -> 'jenkins') ->> 'job_name')",
        "((data -> 'jenkins') ->> 'build_number')",
    ),
    _pg_index("ix_runs_pass_percent", "((summary ->> 'pass_percent')::integer)"),
    _pg_index("ix_runs_summary", "summary", using="gin"),
    _pg_index("ix_runs_tags", "(data -> 'tags')", using="gin"),
)

results = Table(
    "results",
    metadata,
    _id(),
    _fk("project_id", "projects.id"),
    _fk("run_id", "runs.id"),
    Column("test_id", Text, index=True),
    Column("result", Text, index=True),
    Column("data", JSONType),
    Column("params", JSONType),
    Column("duration", Float, index=True),
    Column("start_time", DateTime, nullable=False, index=True),
    Column("source", Text, index=True),
    Column("env", Text, index=True),
    Column("component", Text, index=True),
    _pg_index("ix_results_assignee", "(data ->> 'assignee')"),
    _pg_index("ix_results_classification", "(data ->> 'classification')"),
    _pg_index("ix_results_exception_name", "(data ->> 'exception_name')"),
    _pg_index("ix_results_jenkins_build_number", "((data -> 'jenkins') ->> 'build_number')"),
    _pg_index("ix_results_jenkins_job_name", "((data -> 'jenkins') ->> 'job_name')"),
    _pg_index(
        "ix_results_component_env_project", "component", "env", "project_id", "start_time DESC"
    ),
    _pg_index(
        "ix_results_component_start_time_result_project_id",
        "component",
        "start_time",
        "result",
        "project_id",
    ),
    _pg_index(
        "ix_results_result_satver_project_id_run_id_snapver",
        "result",
        "(data ->> 'SatelliteVersion')",
        "project_id",
        "run_id",
        "(data ->> 'SnapVersion')",
    ),
    _pg_index("ix_results_requirements", "(data -> 'requirements')", using="gin"),
    _pg_index("ix_results_tags", "(data -> 'tags')", using="gin"),
)

artifacts = Table(
    "artifacts",
    metadata,
    _id(),
    Column("content", LargeBinary),
    _fk("result_id", "results.id"),
    _fk("run_id", "runs.id"),
    Column("filename", Text, index=True),
    Column("data", JSONType),
    Column("upload_date", DateTime, nullable=False, index=True),
)

imports = Table(
    "imports",
    metadata,
    _id(),
    Column("filename", Text, index=True),
    Column("format", Text, index=True),
    Column("data", JSONType),
    Column("status", Text, index=True),
    Column("created", DateTime, nullable=False, index=True, server_default=func.now()),
)

import_files = Table(
    "import_files",
    metadata,
    _id(),
    Column(
        "import_id",
        Uuid(),
        ForeignKey("imports.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("content", LargeBinary),
)
