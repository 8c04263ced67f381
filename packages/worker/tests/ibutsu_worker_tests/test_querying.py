"""Structured, project-scoped, bounded queries on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project, Result, Run, utcnow
from ibutsu_worker.querying import MAX_PAGE_SIZE, MAX_PAYLOAD_BYTES, QueryError, run_query


@pytest.fixture
def session(session: Session) -> Session:
    """The shared migrated session, with two projects' runs and results in it."""
    acme, other = Project(name="acme"), Project(name="other")
    session.add_all([acme, other])
    session.flush()
    for project, count in ((acme, 30), (other, 10)):
        run = Run(project_id=project.id, component="ui")
        session.add(run)
        session.flush()
        session.add_all(
            Result(
                run_id=run.id,
                project_id=project.id,
                test_id=f"test_{n}",
                result="failed" if n % 3 == 0 else "passed",
                duration=float(n),
                start_time=utcnow() - timedelta(minutes=n),
                data={"jira": f"BUG-{n % 2}"},
            )
            for n in range(count)
        )
    session.commit()
    return session


def test_filters_are_scoped_to_the_project(session: Session) -> None:
    page = run_query(session, kind="results", project="acme", filters=[["result", "eq", "failed"]])
    assert page.total == 10 and len(page.items) == 10
    assert {item["result"] for item in page.items} == {"failed"}
    everything = run_query(session, kind="results", project="other")
    assert everything.total == 10  # never acme's rows


def test_operators_metadata_and_paging(session: Session) -> None:
    filters: list[list[object]] = [
        ["duration", "gte", 10],
        ["metadata.jira", "eq", "BUG-1"],
        ["test_id", "contains", "_1"],
    ]
    page = run_query(session, kind="results", project="acme", filters=filters, page_size=2)
    assert page.total == 5  # 11, 13, 15, 17, 19
    assert len(page.items) == 2
    second = run_query(
        session, kind="results", project="acme", filters=filters, page=2, page_size=2
    )
    assert {i["test_id"] for i in page.items}.isdisjoint({i["test_id"] for i in second.items})
    newest = run_query(session, kind="results", project="acme", page_size=1)
    assert newest.items[0]["test_id"] == "test_0"  # newest first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"project": ""}, "a project is required"),
        ({"project": "nope"}, "no project 'nope'"),
        ({"filters": [["password", "eq", "x"]]}, "cannot be filtered on 'password'"),
        ({"filters": [["result", "like", "x"]]}, "unknown operator 'like'"),
        ({"filters": [["metadata.a'b", "eq", "x"]]}, "bad metadata key"),
        ({"filters": [["duration", "gt", "soon"]]}, "bad value 'soon'"),
        ({"filters": [["result", "in", []]]}, "'in' needs a list"),
        ({"page_size": MAX_PAGE_SIZE + 1}, "page_size must be between"),
        ({"kind": "users"}, "unknown kind 'users'"),
        ({"filters": [["duration", "contains", "1"]]}, "'contains' works on text fields only"),
    ],
)
def test_bad_queries_are_refused_clearly(
    session: Session, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, Any] = {"kind": "results", "project": "acme", **kwargs}
    with pytest.raises(QueryError, match=message):
        run_query(session, **arguments)


def test_payload_is_capped(session: Session) -> None:
    project = Project(name="big")
    session.add(project)
    session.flush()
    blob = "x" * (MAX_PAYLOAD_BYTES // 4)
    session.add_all(
        Result(project_id=project.id, test_id=f"big_{n}", result="passed", data={"log": blob})
        for n in range(8)
    )
    session.commit()
    page = run_query(session, kind="results", project="big", page_size=8)
    assert page.truncated
    assert 0 < len(page.items) < 8
    assert page.total == 8


def test_runs_and_estimated_counts(session: Session) -> None:
    page = run_query(
        session, kind="runs", project="acme", filters=[["component", "eq", "ui"]], estimate=True
    )
    assert len(page.items) == 1
    assert page.total_is_estimate == (session.get_bind().dialect.name == "postgresql")
    assert page.total >= 1
