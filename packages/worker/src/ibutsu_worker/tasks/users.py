"""Users: seed them into projects, as upstream's admin task does."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ibutsu_server import task_names
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker.seeding import seed_users as seed


@shared_task(bind=True, name=task_names.SEED_USERS)
def seed_users(self: IbutsuTask, projects: Any = None) -> dict[str, Any]:
    """Create users and add them to projects (upstream's admin task)."""
    return seed(self.session, projects).as_dict()
