"""``seed_users``: create users and add them to projects, as upstream's admin task does.

Input, as the admin page sends it::

    {"my-project": {"owner": "jdoe@example.com", "users": ["jdoe@example.com", ...]}, ...}

A project that does not exist is skipped (and reported); a user that does not exist is
created active, without a password (they log in through the configured identity provider),
named after the part of the address before the "@". Domain code: nothing here commits.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project, User
from ibutsu_server.db.schema import users_projects

log = logging.getLogger(__name__)


class SeedError(ValueError):
    """The request is not a mapping of project names to owners and users."""


@dataclass
class SeedReport:
    """What seeding did."""

    users_created: list[str] = field(default_factory=list)
    memberships_added: int = 0
    owners_set: int = 0
    projects_missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "users_created": self.users_created,
            "memberships_added": self.memberships_added,
            "owners_set": self.owners_set,
            "projects_missing": self.projects_missing,
        }


def _emails(project: str, info: dict[str, Any]) -> tuple[str | None, list[str]]:
    owner = info.get("owner")
    users = info.get("users", [])
    if owner is not None and not (isinstance(owner, str) and "@" in owner):
        raise SeedError(f"project {project!r}: owner must be an e-mail address")
    if not isinstance(users, list) or not all(isinstance(u, str) and "@" in u for u in users):
        raise SeedError(f"project {project!r}: users must be a list of e-mail addresses")
    return owner, users


def seed_users(session: Session, projects: Any) -> SeedReport:
    """Create missing users and add them (and owners) to the named projects."""
    report = SeedReport()
    if not projects:
        return report
    if not isinstance(projects, dict):
        raise SeedError("projects must map project names to {'owner': ..., 'users': [...]}")
    for name, info in projects.items():
        if not isinstance(info, dict):
            raise SeedError(f"project {name!r}: expected {{'owner': ..., 'users': [...]}}")
        owner, users = _emails(name, info)
        project = session.scalar(select(Project).where(Project.name == name).limit(1))
        if project is None:
            log.warning("seed_users: no project named %r; skipped", name)
            report.projects_missing.append(name)
            continue
        if owner is not None:
            project.owner_id = _user(session, owner, report).id
            report.owners_set += 1
        for email in users:
            user = _user(session, email, report)
            member = session.execute(
                select(users_projects).where(
                    users_projects.c.user_id == user.id,
                    users_projects.c.project_id == project.id,
                )
            ).first()
            if member is None:
                session.execute(
                    insert(users_projects).values(user_id=user.id, project_id=project.id)
                )
                report.memberships_added += 1
    return report


def _user(session: Session, email: str, report: SeedReport) -> User:
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(
            id=uuid.uuid4(),
            email=email,
            name=email.split("@")[0],
            is_active=True,
            is_superadmin=False,
        )
        session.add(user)
        session.flush()
        report.users_created.append(email)
    return user
