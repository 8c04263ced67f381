"""Every task by its wire name, called with apply() in the test's process on a real
PostgreSQL database; follow-ups go to the real Redis. Argument shapes are upstream's."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ibutsu_server import task_names
from ibutsu_server.db.models import Import, ImportFile, Project, Result, Run, User, utcnow
from ibutsu_server.db.schema import users_projects
from ibutsu_server.fleet import SIGHTING_GRACE_SECONDS
from ibutsu_testing.broker import keys_of, queued
from ibutsu_testing.services import REDIS_URL
from ibutsu_worker_tests.builders import add_project, add_run


def call(app: Celery, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run task ``name`` here and now; its exception, if any, is raised."""
    return app.tasks[name].apply(args=args, kwargs=kwargs).get()


def sent(app: Celery, queue: str = task_names.SHARED_QUEUE) -> list[dict[str, Any]]:
    """The messages waiting in one of the worker's queues, oldest first: task, args, eta."""
    return [
        {"task": message.task, "args": message.args, "eta": message.headers.get("eta")}
        for message in queued(app, queue)
    ]


def test_the_worker_registers_exactly_the_names_of_the_table(worker_app: Celery) -> None:
    # A task module renamed or moved can never rename a task: every name comes from the table.
    registered = {name for name in worker_app.tasks if not name.startswith("celery.")}
    assert registered == task_names.ALL
    assert task_names.UPSTREAM <= task_names.ALL


def test_names_only_ours_register_go_to_a_queue_only_ours_consume(worker_app: Celery) -> None:
    # Upstream's workers share the default queue during a rolling update and discard a name
    # they do not register: ours never reach them.
    for name in sorted(task_names.ALL):
        worker_app.send_task(name)
    shared = {m["task"] for m in sent(worker_app, task_names.SHARED_QUEUE)}
    own = {m["task"] for m in sent(worker_app, task_names.OWN_QUEUE)}
    assert (shared, own) == (set(task_names.UPSTREAM), set(task_names.OURS))
    # A worker started without -Q consumes every queue of the app: both.
    consumed = set(worker_app.amqp.queues.consume_from)
    assert consumed == {task_names.SHARED_QUEUE, task_names.OWN_QUEUE}


def test_update_run_by_keyword(worker_app: Celery, app_session: Session) -> None:
    run_id = add_run(app_session, ["passed", "failed", "passed"])
    call(worker_app, task_names.UPDATE_RUN, run_id=str(run_id))  # the admin page's form
    summary = app_session.scalar(select(Run.summary).where(Run.id == run_id))
    assert summary is not None and (summary["tests"], summary["passes"]) == (3, 2)
    assert summary["pass_percent"] == 66


def test_update_run_of_nothing(worker_app: Celery) -> None:
    assert call(worker_app, task_names.UPDATE_RUN, str(uuid.uuid4())) is None
    assert call(worker_app, task_names.UPDATE_RUN, "not-a-run") is None


def test_sync_aborted_runs_sends_update_run_in_five_seconds(
    worker_app: Celery, app_session: Session
) -> None:
    stale = add_run(app_session, ["passed"] * 4, summary={"tests": 1})
    fine = add_run(app_session, ["passed"])
    call(worker_app, task_names.UPDATE_RUN, str(fine))
    # Upstream sends no argument; a dict, since the API's task view merges it into a dict.
    assert call(worker_app, task_names.SYNC_ABORTED_RUNS) == {"enqueued": 1}
    (message,) = sent(worker_app)
    assert (message["task"], message["args"]) == (task_names.UPDATE_RUN, [str(stale)])
    assert message["eta"] is not None  # countdown=5, as upstream sends it


def test_prune_tasks_by_keyword_report_what_went(worker_app: Celery, app_session: Session) -> None:
    old = add_run(app_session, ["passed"] * 3, start=utcnow() - timedelta(days=500))
    kept = add_run(app_session, ["passed"], start=utcnow() - timedelta(days=2))
    report = call(worker_app, task_names.PRUNE_OLD_RUNS, months=12)
    assert report["deleted"] == {"results": 3, "runs": 1}
    assert app_session.get(Run, old) is None and app_session.get(Run, kept) is not None
    assert call(worker_app, task_names.PRUNE_OLD_RESULTS, 5)["deleted"] == {}
    assert call(worker_app, task_names.PRUNE_OLD_FILES, months=3)["deleted"] == {}
    assert call(worker_app, task_names.PRUNE_OLD_IMPORT_FILES, days=7)["deleted"] == {}


def test_dangerous_retention_fails_loudly_without_retry(
    worker_app: Celery, app_session: Session
) -> None:
    add_run(app_session, ["passed"] * 2, start=utcnow() - timedelta(days=90))
    outcome = worker_app.tasks[task_names.PRUNE_OLD_RESULTS].apply(args=[0])
    assert outcome.state == "FAILURE" and "refusing to prune results" in str(outcome.result)
    assert app_session.scalar(select(func.count()).select_from(Result)) == 2


def test_add_result_start_time_copies_the_old_field(
    worker_app: Celery, app_session: Session
) -> None:
    run_id = add_run(
        app_session, ["passed"] * 2, result_fields={"data": {"starttime": "2020-01-01T00:00"}}
    )
    assert call(worker_app, task_names.ADD_RESULT_START_TIME, run_id=str(run_id)) == {"updated": 2}
    data: list[Any] = list(app_session.scalars(select(Result.data).where(Result.run_id == run_id)))
    assert all(d is not None and d["start_time"] == "2020-01-01T00:00" for d in data)
    assert call(worker_app, task_names.ADD_RESULT_START_TIME, str(run_id)) == {"updated": 0}


def _stored_import(session: Session, status: str, content: bytes | None) -> uuid.UUID:
    record = Import(id=uuid.uuid4(), filename="r.xml", format="", status=status, data={})
    session.add(record)
    session.flush()
    session.add(ImportFile(id=uuid.uuid4(), import_id=record.id, content=content))
    session.commit()
    return record.id


def test_clear_import_file_content_as_upstream(worker_app: Celery, app_session: Session) -> None:
    done = _stored_import(app_session, "done", b"<testsuite/>")
    running = _stored_import(app_session, "running", b"<testsuite/>")
    clear = worker_app.tasks[task_names.CLEAR_IMPORT_FILE_CONTENT]
    assert clear.apply(args=[str(done)]).get() == (
        f"Cleared 12 bytes from import_file for import {done}"
    )
    assert clear.apply(args=[str(done)]).get() == f"No content to clear for import {done}"
    assert clear.apply(args=[str(running)]).get() == (
        f"Import {running} status is running, not clearing content"
    )
    missing = uuid.uuid4()
    assert clear.apply(kwargs={"import_id": str(missing)}).get() == f"Import {missing} not found"
    app_session.expire_all()
    stored = app_session.scalar(select(ImportFile.content).where(ImportFile.import_id == running))
    assert stored == b"<testsuite/>"


def test_seed_users_as_upstream(worker_app: Celery, app_session: Session) -> None:
    project_id = add_project(app_session, "my-project")
    projects = {
        "my-project": {
            "owner": "jdoe@example.com",
            "users": ["jdoe@example.com", "nf@example.com"],
        },
        "not-here": {"users": ["x@example.com"]},
    }
    report = call(worker_app, task_names.SEED_USERS, projects=projects)
    assert report["users_created"] == ["jdoe@example.com", "nf@example.com"]
    assert report["projects_missing"] == ["not-here"]
    assert call(worker_app, task_names.SEED_USERS, projects=projects)["memberships_added"] == 0
    users = dict(app_session.execute(select(User.email, User.name)).all())
    assert users == {"jdoe@example.com": "jdoe", "nf@example.com": "nf"}
    owner = app_session.scalar(select(Project.owner_id).where(Project.id == project_id))
    members = app_session.scalar(select(func.count()).select_from(users_projects))
    assert owner is not None and members == 2
    refused = worker_app.tasks[task_names.SEED_USERS].apply(kwargs={"projects": ["nope"]})
    assert refused.state == "FAILURE" and "must map project names" in str(refused.result)


@pytest.mark.parametrize("name", [task_names.RUN_JUNIT_IMPORT, task_names.RUN_ARCHIVE_IMPORT])
def test_import_tasks_take_the_api_record_by_position_or_keyword(
    worker_app: Celery, app_session: Session, name: str
) -> None:
    report = b'<testsuite name="s"><testcase classname="m" name="t"/></testsuite>'
    by_position, by_keyword = (_stored_import(app_session, "pending", report) for _ in range(2))
    record = {"id": str(by_position), "filename": "r.xml", "format": "", "status": "pending"}
    call(worker_app, name, {**record, "created": utcnow()})
    call(worker_app, name, import_={**record, "id": str(by_keyword)})
    statuses = app_session.scalars(select(Import.status)).all()
    assert statuses == ["done", "done"]


def test_import_results_takes_an_import_or_file_id(
    worker_app: Celery, app_session: Session
) -> None:
    report = b'<testsuite name="s"><testcase classname="m" name="t"/></testsuite>'
    first = _stored_import(app_session, "pending", report)
    second = _stored_import(app_session, "pending", report)
    file_id = app_session.scalar(select(ImportFile.id).where(ImportFile.import_id == second))
    call(worker_app, task_names.IMPORT_RESULTS, str(first))
    call(worker_app, task_names.IMPORT_RESULTS, file_id=str(file_id))
    assert app_session.scalars(select(Import.status)).all() == ["done", "done"]


def _aged_import(
    session: Session,
    status: str,
    age: timedelta,
    filename: str = "r.xml",
    content: bytes = b"<testsuite/>",
    **data: Any,
) -> uuid.UUID:
    record = Import(
        id=uuid.uuid4(),
        filename=filename,
        format="",
        status=status,
        created=utcnow() - age,
        data={"started": (utcnow() - age).isoformat(), **data},
    )
    session.add(record)
    session.flush()
    session.add(ImportFile(id=uuid.uuid4(), import_id=record.id, content=content))
    session.commit()
    return record.id


def test_recover_imports_requeues_what_nobody_will_finish(
    worker_app: Celery, app_session: Session
) -> None:
    orphan = _aged_import(app_session, "running", timedelta(minutes=3))
    held = _aged_import(app_session, "running", timedelta(minutes=3))
    young = _aged_import(app_session, "running", timedelta(seconds=5))
    hopeless = _aged_import(app_session, "running", timedelta(minutes=3), requeues=3)
    lost = _aged_import(
        app_session, "pending", timedelta(minutes=10), "r.tar.gz", b"\x1f\x8b...", source="ci"
    )
    waiting = _aged_import(app_session, "pending", timedelta(minutes=10))
    # Running, no lock, but its message is in the broker (a dead worker's, handed back): the
    # redelivery takes care of it.
    handed_back = _aged_import(app_session, "running", timedelta(minutes=3))
    for key in (waiting, handed_back):
        worker_app.send_task(task_names.RUN_JUNIT_IMPORT, args=[{"id": str(key)}])
    with Session(worker_app.database.engine) as other:  # a live worker holds this one
        other.get(Import, held, with_for_update=True)
        found = call(worker_app, task_names.RECOVER_IMPORTS)
        other.rollback()
    assert sorted(found["requeued"]) == sorted([str(orphan), str(lost)])
    assert (found["failed"], found["left_to_upstream"]) == ([str(hopeless)], [])
    app_session.expire_all()
    statuses = dict(app_session.execute(select(Import.id, Import.status)).all())
    assert statuses == {
        orphan: "pending", held: "running", young: "running", hopeless: "error",
        lost: "pending", waiting: "pending", handed_back: "running",
    }  # fmt: skip
    data = app_session.get(Import, orphan).data  # type: ignore[union-attr]
    assert (
        data is not None
        and data["requeues"] == 1
        and data["recovered"].startswith("its worker was lost")
    )
    # Queued again as the API queued them, on the queue every worker consumes: upstream's
    # workers run them too.
    requeued = {
        m["args"][0]["id"]: (m["task"], m["args"][0])
        for m in sent(worker_app)
        if m["args"][0]["id"] in (str(orphan), str(lost))
    }
    assert requeued[str(orphan)][0] == task_names.RUN_JUNIT_IMPORT
    task, record = requeued[str(lost)]
    assert task == task_names.RUN_ARCHIVE_IMPORT
    assert (record["filename"], record["status"], record["metadata"]["source"]) == (
        "r.tar.gz",
        "pending",
        "ci",
    )
    assert record["created"] is not None and set(record) == {
        "id", "filename", "format", "status", "created", "metadata",
    }  # fmt: skip
    assert sent(worker_app, task_names.OWN_QUEUE) == []
    error = app_session.get(Import, hopeless).data  # type: ignore[union-attr]
    assert error is not None and "its worker was lost 3 times" in error["error"]


def test_recover_imports_leaves_running_imports_alone_while_upstream_workers_are_about(
    worker_app: Celery, app_session: Session
) -> None:
    # Upstream's importer holds no lock and has acknowledged its message: a running import
    # without either may be one of theirs while their workers are seen.
    theirs = _aged_import(app_session, "running", timedelta(minutes=30))
    lost = _aged_import(app_session, "pending", timedelta(minutes=10))
    client = redis.Redis.from_url(REDIS_URL)
    sightings = keys_of(worker_app).sightings
    seen = time.time() - SIGHTING_GRACE_SECONDS + 60
    client.zadd(sightings, {"ibutsu-worker@upstream-1": seen})
    found = call(worker_app, task_names.RECOVER_IMPORTS)
    assert found == {"requeued": [str(lost)], "failed": [], "left_to_upstream": [str(theirs)]}
    # Once none has been seen for the grace period, it is judged as ours would be.
    client.zadd(sightings, {"ibutsu-worker@upstream-1": seen - 120})
    client.close()
    found = call(worker_app, task_names.RECOVER_IMPORTS)
    assert found == {"requeued": [str(theirs)], "failed": [], "left_to_upstream": []}


@pytest.mark.parametrize("name", sorted(task_names.ALL))
def test_arguments_a_task_does_not_take_are_answered_in_one_line(
    worker_app: Celery, name: str
) -> None:
    answer = call(worker_app, name, "a", "b", "c", "d", "e", "f", "g", surprise=1)
    assert answer["error"].startswith(f"bad arguments for {name}: ")
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
