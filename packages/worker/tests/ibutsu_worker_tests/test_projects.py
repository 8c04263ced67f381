"""Projects created with the rules Ibutsu's API applies to their names, on real databases."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from ibutsu_server.app_factory import FlaskCelery
from ibutsu_server.db.models import Project, User
from ibutsu_server.db.schema import users_projects
from ibutsu_testing.services import wait_for
from ibutsu_worker.projects import Created, ProjectError, check_name, create_project

SOME_UUID = "9b2e6d0a-4c1f-4e55-9a51-2f0c3b7d8e61"


@pytest.mark.parametrize(
    "name",
    [
        SOME_UUID,
        SOME_UUID.upper(),
        SOME_UUID.replace("-", ""),
        "{" + SOME_UUID + "}",
        "urn:uuid:" + SOME_UUID,
    ],
)
def test_a_name_upstream_reads_as_an_id_is_refused(name: str) -> None:
    with pytest.raises(ProjectError, match="read as a project id by Ibutsu's API"):
        check_name(name)


@pytest.mark.parametrize(("name", "why"), [("", "must not be empty"), ("a\x00b", "NUL")])
def test_empty_names_and_nul_are_refused(name: str, why: str) -> None:
    with pytest.raises(ProjectError, match=why):
        check_name(name)


@pytest.mark.parametrize("name", ["acme", "my-project", "Äcme 2", "9b2e6d0a", "a" * 300])
def test_names_upstream_can_look_up_are_accepted(name: str) -> None:
    check_name(name)


def test_created_once_then_found_by_name_and_by_id(session: Session) -> None:
    first = create_project(session, "acme", "ACME Corp")
    again = create_project(session, "acme")
    same_title = create_project(session, "acme", "ACME Corp")
    session.commit()
    assert first.new and not again.new and not same_title.new
    assert first.id == again.id == same_title.id
    rows = session.execute(select(Project.name, Project.title, Project.owner_id)).all()
    assert [tuple(row) for row in rows] == [("acme", "ACME Corp", None)]
    for named in ("acme", str(first.id)):  # found by name and by id
        assert session.scalars(select(Project.id).where(Project.named(named))).all() == [first.id]
    assert create_project(session, "bare").title == "bare"  # the title defaults to the name


def test_a_different_title_or_owner_for_an_existing_name_is_an_error(session: Session) -> None:
    owner = User(id=uuid.uuid4(), email="jdoe@example.com", is_superadmin=False, is_active=True)
    session.add(owner)
    create_project(session, "acme", "ACME Corp")
    with pytest.raises(ProjectError, match=r"exists \(.*\) with title 'ACME Corp', not 'Other'"):
        create_project(session, "acme", "Other")
    with pytest.raises(ProjectError, match="with another owner than 'jdoe@example.com'"):
        create_project(session, "acme", owner_email="jdoe@example.com")


def test_the_owner_becomes_owner_and_member_as_the_api_does(session: Session) -> None:
    owner = User(id=uuid.uuid4(), email="jdoe@example.com", is_superadmin=False, is_active=True)
    session.add(owner)
    created = create_project(session, "acme", owner_email="jdoe@example.com")
    session.commit()
    project = session.get(Project, created.id)
    assert project is not None and project.owner_id == owner.id
    members = session.execute(select(users_projects.c.user_id, users_projects.c.project_id)).all()
    assert [tuple(row) for row in members] == [(owner.id, created.id)]
    with pytest.raises(ProjectError, match="no user with e-mail 'nobody@example.com'"):
        create_project(session, "other", owner_email="nobody@example.com")


def test_two_creations_of_one_name_at_once_make_one_project(worker_app: FlaskCelery) -> None:
    """Upstream's schema has no unique index on the name: the second creation waits for the
    first one's transaction (an advisory lock) and then finds its project."""
    engine = worker_app.database.engine
    results: list[Created | BaseException] = []
    with Session(engine) as first:
        created = create_project(first, "acme")
        holder = first.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()

        def second() -> None:
            with Session(engine) as other:
                try:
                    results.append(create_project(other, "acme"))
                    other.commit()
                except BaseException as exc:  # reported to the test's thread
                    results.append(exc)

        thread = threading.Thread(target=second)
        thread.start()

        def second_waits_for_the_lock() -> bool:
            with engine.connect() as watcher:
                return bool(
                    watcher.execute(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND NOT granted AND pid <> :holder"
                        ),
                        {"holder": holder},
                    ).scalar()
                )

        wait_for(second_waits_for_the_lock, timeout=30)
        assert not results  # still waiting: it has not read the projects yet
        first.commit()
    thread.join(timeout=30)
    assert results == [Created(created.id, "acme", "acme", new=False)]
    with Session(engine) as check:
        assert check.scalars(select(Project.id)).all() == [created.id]
