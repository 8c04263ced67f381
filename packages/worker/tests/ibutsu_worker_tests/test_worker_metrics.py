"""The worker's /metrics, /healthz and /readyz, scraped from a real prefork worker."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from ibutsu_server.db.migrate import upgrade
from ibutsu_server.task_names import RUN_JUNIT_IMPORT as IMPORT
from ibutsu_server.task_names import UPDATE_RUN
from ibutsu_testing.broker import keys_of
from ibutsu_testing.services import (
    REDIS_URL,
    free_port,
    http_get,
    running_worker,
    settings_for,
    wait_for,
)
from ibutsu_worker.process.metrics import StartedFilesCollector
from ibutsu_worker.submission import Submitter
from ibutsu_worker.summaries import lock_keys
from ibutsu_worker_tests.builders import add_run

CREDENTIALS = "prometheus:scrape-password-1"
APP = "ibutsu_server:worker_app"


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


def _push_raw(prefix: str, routing_key: str) -> None:
    """A message written straight into the queue's Redis list: no task header, a body that
    is no task, a routing key of the writer's choosing (the worker rejects it)."""
    message = {
        "body": base64.b64encode(json.dumps([]).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    client = redis.Redis.from_url(REDIS_URL)
    client.lpush(keys_of(prefix).queue("celery"), json.dumps(message))
    client.close()


def test_metrics_count_every_child_once(service_environ: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {
        **service_environ,
        "IBUTSU_METRICS_PORT": str(port),
        "IBUTSU_METRICS_BASIC_AUTH": CREDENTIALS,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    # The operator's folder may hold other files: they must survive the worker.
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "keep.db").write_bytes(b"not ours")
    submitter = Submitter(settings_for(service_environ))
    upgrade(submitter.db.engine)
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
        wait_for(lambda: http_get(port, "/healthz")[0] == 200, timeout=30)
        assert http_get(port, "/readyz")[0] == 200
        assert http_get(port, "/metrics")[0] == 401
        assert http_get(port, "/metrics", "prometheus:wrong-password")[0] == 401
        imports = [submitter.submit(sample) for _ in range(3)]
        # Whoever can write to the broker names what they like: an unregistered task, and a
        # message the worker rejects, its routing key made up.
        attacker = f"attacker.{uuid.uuid4().hex}"
        submitter.celery.send_task(attacker, args=[])
        _push_raw(env["IBUTSU_REDIS_KEY_PREFIX"], attacker)
        for _ in range(4):
            submitter.celery.send_task(UPDATE_RUN, args=[str(uuid.uuid4())])
        submitter.wait(imports, timeout=60)

        def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            status, text = http_get(port, "/metrics", CREDENTIALS)
            samples = _samples(text) if status == 200 else {}
            updates = _value(samples, "celery_task_succeeded_total", name=UPDATE_RUN)
            imported = _value(samples, "celery_task_succeeded_total", name=IMPORT)
            rejected = _value(samples, "celery_task_rejected_total")
            return samples if (updates, imported, rejected) == (4, 3, 1) else {}

        samples = wait_for(scraped, timeout=60)
    assert _value(samples, "celery_task_received_total", name=IMPORT) == 3
    assert _value(samples, "celery_task_started_total", name=IMPORT) == 3
    assert _value(samples, "celery_task_succeeded_total", name=IMPORT) == 3
    assert _value(samples, "celery_task_runtime_count", name=IMPORT) == 3
    assert _value(samples, "celery_task_failed_total") == 0
    assert _value(samples, "celery_worker_tasks_active") == 0
    # The cluster's series come from the scheduler that leads, once: never from a worker.
    cluster = ("celery_worker_up", "celery_queue_length", "celery_task_sent_total")
    assert not [key for key in samples if key[0] in cluster]
    assert _value(samples, "ibutsu_imports_total", format="junit", outcome="done") == 3
    assert _value(samples, "ibutsu_results_imported_total") == 6
    assert _value(samples, "ibutsu_summary_updates_total", outcome="missing") == 4
    assert not [key for key in samples if any("attacker" in v for _, v in key[1])]
    assert (tmp_path / "metrics" / "keep.db").read_bytes() == b"not ours"
    submitter.close()


def test_liveness_fails_while_the_event_loop_is_stuck_and_not_before(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    """A solo pool runs tasks in the main thread, in the event loop: an update_run kept
    waiting on its run's lock keeps the loop stuck, as a hang would."""
    port = free_port()
    env = {**service_environ, "IBUTSU_METRICS_PORT": str(port), "IBUTSU_LIVENESS_TIMEOUT": "10"}
    submitter = Submitter(settings_for(service_environ))
    upgrade(submitter.db.engine)
    with submitter.db.transaction() as session:
        run_id = add_run(session, ["passed"])
    holder = submitter.db.engine.connect()
    with running_worker(APP, env, tmp_path / "worker.log", "--pool=solo"):
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, timeout=30)
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/metrics")[0] == 404  # no credentials given: not served
        holder.execute(select(func.pg_advisory_lock(lock_keys(run_id)[1])))  # "an update runs"
        submitter.celery.send_task(UPDATE_RUN, args=[str(run_id)])
        wait_for(lambda: http_get(port, "/healthz")[0] == 503, timeout=60)
        holder.execute(select(func.pg_advisory_unlock_all()))
        wait_for(lambda: http_get(port, "/healthz")[0] == 200, timeout=30)
    holder.close()
    submitter.close()


def test_a_scrape_leaves_out_the_file_of_a_child_starting_this_instant(tmp_path: Path) -> None:
    """A child's metrics file is created empty, then sized: a scrape in between must not fail,
    and must still count every other child."""
    child = "from prometheus_client import Counter; Counter('probe', 'a probe').inc(3)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", child], env=env, check=True)
    (tmp_path / "counter_999999.db").touch()  # as a child that has just opened its file
    registry = CollectorRegistry()
    StartedFilesCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    samples = _samples(generate_latest(registry).decode())
    assert _value(samples, "probe_total") == 3
