"""A real Flower process against the real Redis and a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from celery import Celery

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.services import (
    clean_environ,
    free_port,
    http_get,
    running_worker,
    settings_for,
    wait_for,
)

CREDENTIALS = "admin:correct-horse-battery"
TASK = "ibutsu_server.tasks.runs.update_run"


def test_flower_sees_workers_and_tasks_and_guards_everything(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    settings = settings_for(service_environ)
    assert settings.database is not None
    engine = make_engine(settings.database)
    upgrade(engine)
    engine.dispose()
    port = free_port()
    broker_only = {k: v for k, v in service_environ.items() if not k.startswith("POSTGRESQL_")}
    flower_env = clean_environ(**broker_only, FLOWER_BASIC_AUTH=CREDENTIALS)
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "ibutsu_server:flower_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=flower_env,
    )
    try:
        with running_worker("ibutsu_server:worker_app", service_environ, tmp_path / "worker.log"):

            def flower_up() -> bool:
                if flower.poll() is not None:
                    raise AssertionError((tmp_path / "flower.log").read_text(errors="replace"))
                return http_get(port, "/healthcheck")[0] == 200

            wait_for(flower_up, timeout=60)
            assert http_get(port, "/")[0] == 401
            assert http_get(port, "/api/workers", "admin:wrong-password-12")[0] == 401
            assert http_get(port, "/metrics")[0] == 401

            def worker_seen() -> bool:
                status, body = http_get(port, "/api/workers?refresh=1", CREDENTIALS)
                return status == 200 and any(name.startswith("test-") for name in json.loads(body))

            wait_for(worker_seen, timeout=60, interval=1)
            producer: Celery = create_celery(settings)
            producer.send_task(TASK, args=[str(uuid.uuid4())])

            def task_seen() -> bool:
                status, body = http_get(port, "/api/tasks", CREDENTIALS)
                return status == 200 and any(
                    t.get("name") == TASK for t in json.loads(body).values()
                )

            wait_for(task_seen, timeout=60, interval=1)
            status, metrics = http_get(port, "/metrics", CREDENTIALS)
            assert status == 200
            assert TASK in metrics
    finally:
        flower.terminate()
        flower.wait(timeout=30)
        log.close()
