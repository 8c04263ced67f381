"""Projects: naming one and creating one with the rules Ibutsu's API applies (finding one by
id or name is ``Project.named``).

Upstream's API (``project_controller.add_project``, v3.1.1) stores whatever string it is given
as a project's ``name``; what makes a name usable is how the rest of upstream reads it:

- an upload names its project by ``util/projects.get_project``: a string that Python's
  ``uuid.UUID`` parses is looked up as an *id* only, so a project *named* like a UUID could
  never be named in an upload;
- the same lookup ends in ``scalar_one_or_none()``: two projects of one name make every upload
  naming it fail, so a name is never given to a second project;
- the admin page (``project-edit.js``) asks for a name and a title, neither empty.

PostgreSQL's ``text`` cannot hold a NUL character. Domain code: nothing here commits.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project, User
from ibutsu_server.db.schema import users_projects

# Namespaces the advisory lock that serialises creations of one name (no table of our own,
# and upstream's schema has no unique index on projects.name).
_LOCK_NAMESPACE = b"ibutsu-tasks project name\0"


class ProjectError(ValueError):
    """A project that cannot be created or found; the message says why, in one line."""


@dataclass(frozen=True)
class Created:
    """The project a creation came to, and whether it was there already."""

    id: uuid.UUID
    name: str
    title: str
    new: bool


def parses_as_uuid(value: str) -> bool:
    """Whether upstream reads ``value`` as a project's id rather than its name (as
    ``Project.named`` does)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def check_name(name: str) -> None:
    """ProjectError unless ``name`` is one upstream's API and uploads can use."""
    if not name:
        raise ProjectError("a project name must not be empty (Ibutsu's admin page requires one)")
    if "\x00" in name:
        raise ProjectError("a project name must not contain a NUL character")
    if parses_as_uuid(name):
        raise ProjectError(
            f"{name!r} is read as a project id by Ibutsu's API: an upload could never name a "
            "project called that; choose a name that is not a UUID"
        )


def _lock_name(session: Session, name: str) -> None:
    """Serialise creations of ``name`` until the transaction ends (PostgreSQL; SQLite already
    lets one writer at a time)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.sha256(_LOCK_NAMESPACE + name.encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    session.execute(select(func.pg_advisory_xact_lock(key)))


def create_project(
    session: Session, name: str, title: str | None = None, owner_email: str | None = None
) -> Created:
    """Create the project ``name`` (title ``title``, the name if not given), or find it if a
    project of that name exists with that title and owner; ProjectError when the name is
    unusable, the existing project's title or owner differs, or ``owner_email`` is nobody's.

    The owner, as upstream's API makes the user who creates a project, becomes its owner and
    one of its users. Call in a transaction the caller commits."""
    check_name(name)
    if title is not None and not title:
        raise ProjectError("a project title must not be empty (Ibutsu's admin page requires one)")
    if title is not None and "\x00" in title:
        raise ProjectError("a project title must not contain a NUL character")
    owner_id = None
    if owner_email is not None:
        owner_id = session.scalar(select(User.id).where(User.email == owner_email).limit(1))
        if owner_id is None:
            raise ProjectError(f"no user with e-mail {owner_email!r}")
    _lock_name(session, name)
    existing = session.scalar(
        select(Project).where(Project.name == name).order_by(Project.id).limit(1)
    )
    if existing is not None:
        if title is not None and existing.title != title:
            raise ProjectError(
                f"project {name!r} exists ({existing.id}) with title {existing.title!r}, "
                f"not {title!r}"
            )
        if owner_id is not None and existing.owner_id != owner_id:
            raise ProjectError(
                f"project {name!r} exists ({existing.id}) with another owner than "
                f"{owner_email!r}"
            )
        return Created(existing.id, name, existing.title or "", new=False)
    project = Project(id=uuid.uuid4(), name=name, title=title or name, owner_id=owner_id)
    session.add(project)
    session.flush()
    if owner_id is not None:
        session.execute(insert(users_projects).values(user_id=owner_id, project_id=project.id))
    return Created(project.id, name, project.title or "", new=True)
