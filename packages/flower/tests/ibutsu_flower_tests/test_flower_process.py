"""A real Flower process against the real Redis and a real worker."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from celery import Celery

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.services import clean_environ, running_worker, settings_for, wait_for

CREDENTIALS = "admin:correct-horse-battery"
TASK = "ibutsu_server.tasks.runs.update_run"


def _get(port: int, path: str, credentials: str | None = CREDENTIALS) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except urllib.error.URLError:
        return 0, b""


def test_flower_sees_workers_and_tasks_and_guards_everything(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    settings = settings_for(service_environ)
    assert settings.database is not None
    engine = make_engine(settings.database)
    upgrade(engine)
    engine.dispose()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
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
                return _get(port, "/healthcheck", None)[0] == 200

            wait_for(flower_up, timeout=60)
            assert _get(port, "/", None)[0] == 401
            assert _get(port, "/api/workers", "admin:wrong-password-12")[0] == 401
            assert _get(port, "/metrics", None)[0] == 401

            def worker_seen() -> bool:
                status, body = _get(port, "/api/workers?refresh=1")
                return status == 200 and any(name.startswith("test-") for name in json.loads(body))

            wait_for(worker_seen, timeout=60, interval=1)
            producer: Celery = create_celery(settings)
            producer.send_task(TASK, args=[str(uuid.uuid4())])

            def task_seen() -> bool:
                status, body = _get(port, "/api/tasks")
                return status == 200 and any(
                    t.get("name") == TASK for t in json.loads(body).values()
                )

            wait_for(task_seen, timeout=60, interval=1)
            status, metrics = _get(port, "/metrics")
            assert status == 200
            assert TASK.encode() in metrics
    finally:
        flower.terminate()
        flower.wait(timeout=30)
        log.close()
