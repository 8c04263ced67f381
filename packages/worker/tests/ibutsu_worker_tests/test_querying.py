"""Paged, bounded queries: upstream's filter strings (query_task) and our structured,
project-scoped filters (query); on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project, Result, Run, utcnow
from ibutsu_worker.querying import (
    MAX_PAGE_SIZE,
    MAX_PAYLOAD_BYTES,
    QueryError,
    run_query,
    task_query,
)
from ibutsu_worker_tests.builders import add_project, add_run

RESULT_KEYS = {
    "id", "project_id", "run_id", "test_id", "result", "metadata", "params", "duration",
    "start_time", "source", "env", "component",
}  # fmt: skip
RUN_KEYS = {
    "id", "project_id", "metadata", "env", "component", "source", "start_time", "duration",
    "summary", "created",
}  # fmt: skip


@pytest.fixture
def populated(session: Session) -> Session:
    """The shared migrated session, with two projects' runs and results in it."""
    for name, count in (("acme", 30), ("other", 10)):
        start = utcnow()

        def result(n: int, start: datetime = start) -> dict[str, Any]:
            return {
                "test_id": f"test_{n}",
                "duration": float(n),
                "start_time": start - timedelta(minutes=n),
                "data": {"jira": f"BUG-{n % 2}", "tags": ["slow"] if n == 1 else []},
            }

        add_run(
            session,
            ["failed" if n % 3 == 0 else "passed" for n in range(count)],
            start=start,
            result_fields=result,
            project_id=add_project(session, name),
            component="ui",
            summary={"tests": count, "pass_percent": 66},
            data={"tags": ["nightly"], "jenkins": {"build_number": "12"}},
        )
    return session


def project_id(session: Session, name: str) -> str:
    return str(session.scalar(select(Project.id).where(Project.name == name)))


# --- query_task: upstream's filter strings ----------------------------------------------------


def test_task_page_has_the_shape_the_api_returns(populated: Session) -> None:
    acme = project_id(populated, "acme")
    page = task_query(populated, [f"project_id={acme}", "result=failed"], 1, 600, False, "results")
    result = page.as_task_result()
    assert set(result) == {"results", "pagination"}
    assert result["pagination"] == {"page": 1, "pageSize": 600, "totalItems": 10, "totalPages": 1}
    row = result["results"][0]
    assert set(row) == RESULT_KEYS
    assert isinstance(row["start_time"], datetime)  # Kombu encodes it as the API expects
    assert row["project_id"] == acme and row["result"] == "failed"
    runs = task_query(populated, None, 1, 600, False, "runs").as_task_result()
    assert set(runs["runs"][0]) == RUN_KEYS and runs["pagination"]["totalItems"] == 2


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["result!passed"], 10),
        (["duration>=10", "metadata.jira=BUG-1"], 10),
        (["duration)10", "duration(12"], 3),  # the frontend's URL-safe >= and <=
        (["duration>28"], 1),
        (["test_id~^test_1"], 11),
        (["test_id%ST_2"], 11),
        (["result*failed;error"], 10),
        (["metadata.jira@y"], 30),
        (["metadata.nothing@n"], 30),
    ],
)
def test_upstream_operators(populated: Session, filters: list[str], expected: int) -> None:
    if populated.get_bind().dialect.name == "sqlite" and any("~" in f for f in filters):
        with pytest.raises(QueryError, match="regular expressions"):
            task_query(populated, filters, 1, 1000, False, "results")
        return
    scoped = [f"project_id={project_id(populated, 'acme')}", *filters]
    assert task_query(populated, scoped, 1, 1000, False, "results").total == expected
    # The planner's estimate works with every operator ("in" lists included).
    estimated = task_query(populated, scoped, 1, 1000, True, "results")
    assert estimated.total == expected and not estimated.total_is_estimate  # small: exact


def test_upstream_json_paths_on_runs(populated: Session) -> None:
    found = task_query(
        populated, ["summary.pass_percent>=50", "component=ui"], 1, 600, False, "runs"
    )
    assert found.total == 2
    build = task_query(populated, ["metadata.jenkins.build_number=12"], 1, 600, False, "runs")
    assert build.total == 2
    if populated.get_bind().dialect.name == "postgresql":
        tags = task_query(populated, ["metadata.tags=nightly"], 1, 600, False, "runs")
        assert tags.total == 2
        slow = task_query(populated, ["metadata.tags*slow;fast"], 1, 600, False, "results")
        assert slow.total == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"filters": ["password=x"]}, "cannot be filtered on 'password'"),
        ({"filters": ["no operator"]}, "not a filter"),
        ({"filters": ["id=not-a-uuid"]}, "not a UUID"),
        ({"filters": ["start_time>soon"]}, "not an ISO 8601 date"),
        ({"filters": ["metadata..b=x"]}, "bad JSON path"),
        ({"filters": "result=passed"}, "must be a list"),
        ({"kind": "users"}, "unknown table 'users'"),
        ({"page": 0}, "page must be 1 or more"),
        ({"page_size": "600"}, "page_size must be a whole number"),
    ],
)
def test_bad_task_queries_are_refused_clearly(
    populated: Session, arguments: dict[str, Any], message: str
) -> None:
    call: dict[str, Any] = {"filters": None, "page": 1, "page_size": 600, "estimate": False}
    call.update(arguments)
    kind = call.pop("kind", "results")
    with pytest.raises(QueryError, match=message):
        task_query(populated, kind=kind, **call)


def test_estimates_fall_back_to_exact_counts_when_small(populated: Session) -> None:
    page = task_query(populated, None, 1, 600, True, "results")
    assert (page.total, page.total_is_estimate) == (40, False)
    page = task_query(populated, ["result=failed"], 1, 600, True, "results")
    assert (page.total, page.total_is_estimate) == (14, False)


# --- query: structured, one project -----------------------------------------------------------


def test_filters_are_scoped_to_the_project(populated: Session) -> None:
    page = run_query(
        populated, kind="results", project="acme", filters=[["result", "eq", "failed"]]
    )
    assert page.total == 10 and len(page.rows) == 10
    assert {row["result"] for row in page.rows} == {"failed"}
    everything = run_query(populated, kind="results", project="other")
    assert everything.total == 10  # never acme's rows


def test_operators_metadata_and_paging(populated: Session) -> None:
    filters: list[list[object]] = [
        ["duration", "gte", 10],
        ["metadata.jira", "eq", "BUG-1"],
        ["test_id", "contains", "_1"],
    ]
    page = run_query(populated, kind="results", project="acme", filters=filters, page_size=2)
    assert page.total == 5  # 11, 13, 15, 17, 19
    assert len(page.rows) == 2
    second = run_query(
        populated, kind="results", project="acme", filters=filters, page=2, page_size=2
    )
    assert {r["test_id"] for r in page.rows}.isdisjoint({r["test_id"] for r in second.rows})
    newest = run_query(populated, kind="results", project="acme", page_size=1)
    assert newest.as_dict()["items"][0]["test_id"] == "test_0"  # newest first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"project": ""}, "a project is required"),
        ({"project": "nope"}, "no project 'nope'"),
        ({"filters": [["password", "eq", "x"]]}, "cannot be filtered on 'password'"),
        ({"filters": [["result", "like", "x"]]}, "unknown operator 'like'"),
        ({"filters": [["metadata.a'b", "eq", "x"]]}, "bad JSON path"),
        ({"filters": [["duration", "gt", "soon"]]}, "bad value 'soon'"),
        ({"filters": [["result", "in", []]]}, "'in' needs a list"),
        ({"page_size": MAX_PAGE_SIZE + 1}, "page_size must be between"),
        ({"kind": "users"}, "unknown table 'users'"),
        ({"filters": [["duration", "contains", "1"]]}, "'contains' works on text fields only"),
    ],
)
def test_bad_queries_are_refused_clearly(
    populated: Session, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, Any] = {"kind": "results", "project": "acme", **kwargs}
    with pytest.raises(QueryError, match=message):
        run_query(populated, **arguments)


def test_payload_is_capped(populated: Session) -> None:
    big = add_project(populated, "big")
    start = utcnow()
    run = Run(id=uuid.uuid4(), project_id=big, start_time=start, created=start)
    populated.add(run)
    populated.flush()
    blob = "x" * (MAX_PAYLOAD_BYTES // 4)
    populated.add_all(
        Result(
            id=uuid.uuid4(),
            project_id=big,
            run_id=run.id,
            test_id=f"big_{n}",
            result="passed",
            start_time=start,
            data={"log": blob},
        )
        for n in range(8)
    )
    populated.commit()
    page = run_query(populated, kind="results", project="big", page_size=8)
    assert page.truncated and page.as_dict()["truncated"]
    assert 0 < len(page.rows) < 8
    assert page.total == 8
    upstream = task_query(populated, [f"project_id={big}"], 1, 600, False, "results")
    assert upstream.as_task_result()["truncated"] is True


def test_runs_and_estimated_counts(populated: Session) -> None:
    page = run_query(
        populated, kind="runs", project="acme", filters=[["component", "eq", "ui"]], estimate=True
    )
    assert len(page.rows) == 1 and page.total == 1
