"""The worker's /metrics, /healthz and /readyz, scraped from a real prefork worker."""

from __future__ import annotations

import base64
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ibutsu_testing.services import running_worker, settings_for, wait_for
from ibutsu_worker.cli import Operator

CREDENTIALS = "prometheus:scrape-password-1"
UPDATE_RUN = "ibutsu_server.tasks.runs.update_run"
IMPORT = "ibutsu_server.tasks.importers.import_results"


def _get(port: int, path: str, credentials: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except urllib.error.URLError:
        return 0, ""


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str
) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == metric and set(labels.items()) <= set(sample_labels)
    )


def test_metrics_count_every_child_once(service_environ: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {
        **service_environ,
        "IBUTSU_METRICS_PORT": str(port),
        "IBUTSU_METRICS_BASIC_AUTH": CREDENTIALS,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    operator = Operator(settings_for(service_environ))
    operator.upgrade()
    sample = tmp_path / "sample.xml"
    sample.write_text('<testsuite name="s"><testcase name="a"/><testcase name="b"/></testsuite>')
    # Two children, each replaced after every task: counts must survive their children.
    with running_worker(
        "ibutsu_server:worker_app",
        env,
        tmp_path / "worker.log",
        "--concurrency=2",
        "--max-tasks-per-child=1",
    ):
        wait_for(lambda: _get(port, "/healthz")[0] == 200, timeout=30)
        assert _get(port, "/readyz")[0] == 200
        assert _get(port, "/metrics")[0] == 401
        assert _get(port, "/metrics", "prometheus:wrong-password")[0] == 401
        imports = [operator.submit(sample, project="m") for _ in range(3)]
        for _ in range(4):
            operator.celery.send_task(UPDATE_RUN, args=[str(uuid.uuid4())])
        operator.wait(imports, timeout=60, progress=None)

        def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            status, text = _get(port, "/metrics", CREDENTIALS)
            samples = _samples(text) if status == 200 else {}
            updates = _value(samples, "celery_task_succeeded_total", name=UPDATE_RUN)
            imported = _value(samples, "celery_task_succeeded_total", name=IMPORT)
            return samples if (updates, imported) == (4, 3) else {}

        samples = wait_for(scraped, timeout=60)
    assert _value(samples, "celery_task_received_total", name=IMPORT) == 3
    assert _value(samples, "celery_task_started_total", name=IMPORT) == 3
    assert _value(samples, "celery_task_succeeded_total", name=IMPORT) == 3
    assert _value(samples, "celery_task_runtime_count", name=IMPORT) == 3
    assert _value(samples, "celery_task_failed_total") == 0
    assert _value(samples, "celery_worker_up") == 1
    assert _value(samples, "celery_worker_tasks_active") == 0
    assert ("celery_queue_length", frozenset({("queue_name", "celery")})) in samples
    assert _value(samples, "ibutsu_imports_total", format="junit", outcome="done") == 3
    assert _value(samples, "ibutsu_results_imported_total") == 6
    assert _value(samples, "ibutsu_summary_updates_total", outcome="missing") == 4
    operator.db.engine.dispose()
