"""What the scheduler loads to start: its app and its scheduler class, never Flask or the ORM
(beat runs no task and opens no session; they would cost a third of its cold start)."""

from __future__ import annotations

from ibutsu_testing.services import run_python, service_env

HEAVY = ("flask", "werkzeug", "jinja2", "sqlalchemy.orm", "alembic")
PROBE = f"""
import sys
import ibutsu_server
ibutsu_server.scheduler_app
import ibutsu_scheduler.scheduler
print(" ".join(module for module in {HEAVY!r} if module in sys.modules))
"""


def test_the_scheduler_loads_no_flask_and_no_orm() -> None:
    done = run_python(PROBE, **service_env("ibutsu", "ibutsu-test-startup:"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
