"""What the scheduler loads to start: its app (built by create_flask_celery_app, as the
architecture has it) and its scheduler class, never Flask or the ORM (beat runs no task and
opens no session; they would cost a third of its cold start)."""

from __future__ import annotations

from ibutsu_testing.services import run_python, service_env

HEAVY = ("flask", "werkzeug", "jinja2", "sqlalchemy.orm", "alembic")
PROBE = f"""
import sys
import ibutsu_server
app = ibutsu_server.scheduler_app
import ibutsu_scheduler.scheduler
print(type(app).__name__)
print(" ".join(module for module in {HEAVY!r} if module in sys.modules))
"""


def test_the_scheduler_loads_no_flask_and_no_orm() -> None:
    done = run_python(PROBE, **service_env("ibutsu", "ibutsu-test-startup:"))
    assert done.returncode == 0, done.stderr
    kind, *loaded = done.stdout.splitlines()
    assert kind == "FlaskCelery"
    assert loaded == [""]
