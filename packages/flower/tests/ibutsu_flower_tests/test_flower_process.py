"""A real Flower process against the real Redis and a real worker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.task_names import UPDATE_RUN
from ibutsu_testing.services import (
    celery_process,
    free_port,
    http_get,
    running_worker,
    settings_for,
    wait_for,
)

CREDENTIALS = "admin:correct-horse-battery"


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
    flower = celery_process(
        "ibutsu_server:flower_app",
        ["flower", f"--port={port}", "--address=127.0.0.1"],
        {**broker_only, "FLOWER_BASIC_AUTH": CREDENTIALS},
        tmp_path / "flower.log",
        ready=lambda: http_get(port, "/healthcheck")[0] == 200,
    )
    with flower, running_worker("ibutsu_server:worker_app", service_environ, tmp_path / "w.log"):
        assert http_get(port, "/")[0] == 401
        assert http_get(port, "/api/workers", "admin:wrong-password-12")[0] == 401
        assert http_get(port, "/metrics")[0] == 401

        def worker_seen() -> bool:
            status, body = http_get(port, "/api/workers?refresh=1", CREDENTIALS)
            return status == 200 and any(name.startswith("test-") for name in json.loads(body))

        wait_for(worker_seen, timeout=60, interval=1)
        create_celery(settings).send_task(UPDATE_RUN, args=[str(uuid.uuid4())])

        def task_seen() -> bool:
            status, body = http_get(port, "/api/tasks", CREDENTIALS)
            return status == 200 and any(
                t.get("name") == UPDATE_RUN for t in json.loads(body).values()
            )

        wait_for(task_seen, timeout=60, interval=1)
        status, metrics = http_get(port, "/metrics", CREDENTIALS)
        assert status == 200
        assert UPDATE_RUN in metrics
