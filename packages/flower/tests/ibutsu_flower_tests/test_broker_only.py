"""The Flower entry point loads no Flask, SQLAlchemy or database driver."""

from __future__ import annotations

import json
import subprocess

from ibutsu_testing.services import REDIS_URL, run_python

PROBE = """
import json, sys
import ibutsu_server
app = ibutsu_server.flower_app
heavy = sorted(m for m in ("flask", "sqlalchemy", "psycopg2", "alembic") if m in sys.modules)
print(json.dumps({"main": app.main, "broker": app.conf.broker_url, "heavy": heavy}))
"""


def _probe(**env: str) -> subprocess.CompletedProcess[str]:
    return run_python(PROBE, **env)


def test_flower_app_loads_no_database_code() -> None:
    done = _probe(
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_RESULT_BACKEND=REDIS_URL,
        FLOWER_BASIC_AUTH="admin:correct-horse-battery",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["main"] == "ibutsu_flower"
    assert report["broker"] == REDIS_URL


def test_flower_refuses_to_start_without_credentials() -> None:
    done = _probe(CELERY_BROKER_URL="redis://:s3cret-password@127.0.0.1:6379/0")
    assert done.returncode == 2
    assert "FLOWER_BASIC_AUTH is not set" in done.stderr
    assert "CELERY_RESULT_BACKEND is not set" in done.stderr
    assert "s3cret-password" not in done.stderr
    assert "Traceback" not in done.stderr
