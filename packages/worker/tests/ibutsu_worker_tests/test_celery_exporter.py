"""Our metrics are celery-exporter's (testdata/celery-exporter: its metric list, its mixin's
alert rules and dashboards): a real prefork worker and the real scheduler that leads, fed by
our producer and by one that sends as upstream's API does, export exactly celery-exporter's
families, with its types and labels; the mixin's alert rules, unchanged, fire on the series
captured from them (promtool) under the job the shipped scrape configuration gives both
roles; and every metric the mixin's dashboards read is there."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ibutsu_server.celery_utils import create_broker_celery_app
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.task_names import PRUNE_OLD_RESULTS, UPDATE_RUN
from ibutsu_server.task_names import RUN_JUNIT_IMPORT as IMPORT
from ibutsu_testing.services import (
    celery_process,
    free_port,
    http_get,
    running_worker,
    settings_for,
    wait_for,
)
from ibutsu_worker.submission import Submitter

EXPORTER = Path("testdata/celery-exporter")
PROMETHEUS_CONFIG = Path("deploy/prometheus/prometheus.yml")
CREDENTIALS = "prometheus:scrape-password-1"
# What upstream's API puts in its messages' origin header: its own node name.
API_NODE, API_HOST = "gen7@ibutsu-backend-7d9f", "ibutsu-backend-7d9f"
# The cluster's series come from the scheduler that leads, the tasks' from each worker.
CLUSTER = {
    "celery_worker_up",
    "celery_task_sent",
    "celery_task_queue_wait_time",
    "celery_queue_length",
    "celery_active_worker_count",
    "celery_active_process_count",
    "celery_active_consumer_count",
}
BACKLOG = 120  # over the mixin's CeleryHighQueueLength threshold (100)

Sample = tuple[str, frozenset[tuple[str, str]]]
Scrape = dict[Sample, float]
Capture = list[tuple[str, str]]  # (instance, /metrics text) of each role scraped at one time


def _root() -> Path:
    """The repository (or Pants sandbox) root: the folder above holding the test data."""
    here = Path.cwd().resolve()
    return next(folder for folder in (here, *here.parents) if (folder / EXPORTER).is_dir())


def _families(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """Family name -> its type and the label names of its samples (a histogram's ``le`` apart)."""
    found: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for family in text_string_to_metric_families(text):
        labels = {frozenset(sample.labels) - {"le"} for sample in family.samples}
        found[family.name] = (family.type, labels)
    return found


def _samples(text: str) -> Scrape:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape(port: int) -> str:
    status, text = http_get(port, "/metrics", CREDENTIALS)
    assert status == 200, status
    return text


def _value(scrape: Scrape, metric: str, **labels: str) -> float:
    return sum(
        value
        for (name, sample_labels), value in scrape.items()
        if name == metric and set(labels.items()) <= set(sample_labels)
    )


@contextmanager
def _leader(env: dict[str, str], log: Path, port: int) -> Iterator[None]:
    """The real scheduler (``ibutsu_server:scheduler_app``), leading: it alone runs."""
    environ = {**env, "IBUTSU_METRICS_PORT": str(port), "IBUTSU_METRICS_BASIC_AUTH": CREDENTIALS}
    ready = lambda: http_get(port, "/healthz")[0] == 200  # noqa: E731
    with celery_process("ibutsu_server:scheduler_app", ["beat"], environ, log, ready=ready):
        wait_for(lambda: _value(_samples(_scrape(port)), "ibutsu_beat_leader") == 1, timeout=30)
        yield


def _shipped_job(root: Path) -> str:
    """The job the shipped plain-Prometheus configuration scrapes both roles under: one job
    holds the worker's and the scheduler's targets, as the dashboards' single-select ``job``
    variable needs (it lists celery_worker_up's jobs, then reads the workers' series)."""
    config = yaml.safe_load((root / PROMETHEUS_CONFIG).read_text(encoding="utf-8"))
    folder = (root / PROMETHEUS_CONFIG).parent
    jobs = {}
    for job in config["scrape_configs"]:
        components = {
            group["labels"]["component"]
            for sd in job.get("file_sd_configs", [])
            for pattern in sd["files"]
            for path in folder.glob(pattern)
            for group in json.loads(path.read_text(encoding="utf-8"))
        }
        jobs[job["job_name"]] = components
    (name,) = (job for job, components in jobs.items() if {"worker", "scheduler"} <= components)
    return str(name)


def _series(phases: list[tuple[int, Capture]], job: str) -> list[dict[str, str]]:
    """promtool input series, one per sample scraped, labelled as Prometheus labels a target
    of ``job``: each phase's capture repeated for its minutes, ``_`` (no sample) where a
    phase lacks the series (a dead worker's)."""
    captured = []
    for minutes, capture in phases:
        found = {(i, key): value for i, text in capture for key, value in _samples(text).items()}
        captured.append((minutes, found))
    series = []
    for instance, (name, labels) in sorted({k for _, found in captured for k in found}, key=repr):
        values = []
        for minutes, found in captured:
            value = found.get((instance, (name, labels)))
            values += [repr(value) if value is not None else "_"] * minutes
        all_labels = {**dict(labels), "job": job, "instance": instance}
        selector = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(all_labels.items()))
        series.append({"series": f"{name}{{{selector}}}", "values": " ".join(values)})
    return series


def _expected(rules: dict[str, Any], alert: str, labels: dict[str, str]) -> dict[str, Any]:
    """The alert ``alert`` of ``rules`` with ``labels``, its annotations rendered as
    Prometheus renders their ``{{ $labels.x }}``."""
    (rule,) = (r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert)
    full = {**labels, **rule.get("labels", {})}

    def render(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: full.get(m.group(1), ""), text)

    annotations = {key: render(value) for key, value in rule.get("annotations", {}).items()}
    return {"exp_labels": full, "exp_annotations": annotations}


def _dashboard_metrics(root: Path) -> set[str]:
    """Every metric family the mixin's dashboards query, in panels or variables."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    names.update(re.findall(r"\bcelery_[a-z_]+", value))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((root / EXPORTER / "dashboards").glob("*.json")):
        walk(json.loads(path.read_text(encoding="utf-8")))
    return {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in names}


def _promtool_test(
    promtool: str,
    folder: Path,
    rules_path: Path,
    job: str,
    phases: list[tuple[int, Capture]],
    firing: dict[int, dict[str, list[dict[str, str]]]],
) -> None:
    """``promtool test rules`` of the rules at ``rules_path`` on the captured ``phases``: at
    minute 9 nothing fires; at each minute of ``firing``, exactly the alerts it lists (by
    their labels), with their annotations."""
    rules = yaml.safe_load(rules_path.read_text(encoding="utf-8"))
    names = sorted({r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r})
    checks = [
        {
            "eval_time": f"{minute}m",
            "alertname": alert,
            "exp_alerts": [_expected(rules, alert, labels) for labels in found.get(alert, [])],
        }
        for minute, found in ((9, {}), *firing.items())
        for alert in names
    ]
    # The rules beside the test file, as they are: promtool only warns of a missing one.
    shutil.copy(rules_path, folder / rules_path.name)
    unit = {
        "rule_files": [rules_path.name],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _series(phases, job), "alert_rule_test": checks}
        ],
    }
    (folder / "rules-test.yml").write_text(json.dumps(unit, indent=1))
    result = subprocess.run(
        [promtool, "test", "rules", str(folder / "rules-test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture()
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y --no-install-recommends prometheus")
    return path


def test_our_metrics_are_celery_exporters_and_its_alerts_fire_on_them(
    service_environ: dict[str, str], tmp_path: Path, promtool: str
) -> None:
    root = _root()
    listed = json.loads((root / EXPORTER / "metrics.json").read_text(encoding="utf-8"))
    expected = {metric["name"]: metric for metric in listed["metrics"]}
    job = _shipped_job(root)
    worker_port, leader_port = free_port(), free_port()
    env = {**service_environ, "IBUTSU_METRICS_BASIC_AUTH": CREDENTIALS}
    worker_env = {
        **env,
        "IBUTSU_METRICS_PORT": str(worker_port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    host = socket.gethostname()  # the workers' node names are test-…@<this host>
    submitter = Submitter(settings_for(service_environ))
    upgrade(submitter.db.engine)
    sample = tmp_path / "sample.xml"
    sample.write_text('<testsuite name="s"><testcase name="a"/><testcase name="b"/></testsuite>')
    # Upstream's API: the same broker, no task-sent events, its own node name as origin.
    api = create_broker_celery_app(settings_for(service_environ))
    api.conf.task_send_sent_event = False

    def api_send(name: str, *args: object, count: int = 1, **kwargs: object) -> None:
        for _ in range(count):
            api.send_task(name, args=list(args), kwargs=kwargs, origin=API_NODE)

    worker_instance, leader_instance = f"127.0.0.1:{worker_port}", f"127.0.0.1:{leader_port}"

    def leader() -> Scrape:
        return _samples(_scrape(leader_port))

    def worker() -> Scrape:
        return _samples(_scrape(worker_port))

    def both() -> Capture:
        return [(worker_instance, _scrape(worker_port)), (leader_instance, _scrape(leader_port))]

    def failed(count: int) -> bool:
        return _value(worker(), "celery_task_failed_total", name=PRUNE_OLD_RESULTS) == count

    with _leader(env, tmp_path / "beat.log", leader_port):
        # Nobody consumes the queue yet: celery-exporter says 0, so do we (not nothing).
        queue = frozenset({("queue_name", "celery")})
        idle = [("celery_active_worker_count", queue), ("celery_active_process_count", queue)]
        wait_for(lambda: [leader().get(key) for key in idle] == [0, 0], timeout=10)
        with running_worker(
            "ibutsu_server:worker_app", worker_env, tmp_path / "worker.log", "--concurrency=2"
        ) as process:
            # Counted at once when it comes online: one worker, two pool processes, on each
            # queue it consumes (the shared one and ours).
            def processes(queue_name: str) -> float:
                return _value(leader(), "celery_active_process_count", queue_name=queue_name)

            wait_for(lambda: (processes("celery"), processes("ibutsu-tasks")) == (2, 2), timeout=30)
            assert _value(leader(), "celery_worker_up", hostname=host) == 1
            imports = [submitter.submit(sample) for _ in range(3)]
            api_send(UPDATE_RUN, "8d2e6f6a-4a4b-4c1e-9b5e-000000000001", count=4)
            expired = datetime.now(UTC) - timedelta(minutes=1)
            submitter.celery.send_task(UPDATE_RUN, args=["x"], expires=expired)  # revoked
            submitter.wait(imports, timeout=60)

            seen: list[tuple[float, ...]] = []  # for the message if they never settle

            def settled() -> Capture | None:
                capture = both()
                ours, cluster = (_samples(text) for _, text in capture)
                counts = (
                    _value(ours, "celery_task_succeeded_total", name=IMPORT),
                    _value(ours, "celery_task_succeeded_total", name=UPDATE_RUN),
                    _value(ours, "celery_task_revoked_total", name=UPDATE_RUN),
                    _value(cluster, "celery_task_sent_total", name=IMPORT, hostname=host),
                    _value(cluster, "celery_task_sent_total", name=UPDATE_RUN, hostname=API_HOST),
                    _value(cluster, "celery_task_queue_wait_time_count", hostname=host),
                )
                seen.append(counts)
                return capture if counts == (3, 4, 1, 3, 4, 3) else None

            try:
                healthy = wait_for(settled, timeout=60)
            except AssertionError as exc:
                raise AssertionError(f"counts {seen[-1]}, not (3, 4, 1, 3, 4, 3)") from exc
            # A failure rate needs a failing series that was there before: the first failure
            # of a kind starts its series (as celery-exporter's), the next ones raise it.
            # The admin page's call (keywords: a beat's would run once a day): a retention of
            # 0 months is refused, a failure.
            api_send(PRUNE_OLD_RESULTS, months=0)
            wait_for(lambda: failed(1), timeout=30)
            first_failure = both()
            api_send(PRUNE_OLD_RESULTS, months=0, count=3)
            wait_for(lambda: failed(4), timeout=30)
            failing = both()
            os.killpg(process.pid, signal.SIGKILL)  # no goodbye: a lost node
            process.wait()
        # Five missed heartbeats: down, consuming nothing; and the queue fills.
        wait_for(lambda: _value(leader(), "celery_worker_up", hostname=host) == 0, timeout=30)
        assert _value(leader(), "celery_active_worker_count", queue_name="celery") == 0
        api_send(UPDATE_RUN, "8d2e6f6a-4a4b-4c1e-9b5e-000000000002", count=BACKLOG)
        wait_for(lambda: _value(leader(), "celery_queue_length") >= BACKLOG, timeout=30)
        down = [(leader_instance, _scrape(leader_port))]
    submitter.close()

    # 1. The families, as celery-exporter publishes them: names, types, labels; the cluster's
    # from the leader alone, the tasks' from the worker alone; no celery_* of our own.
    ours = {
        role: _families(text) for role, (_, text) in zip(("worker", "leader"), healthy, strict=True)
    }
    ours = {r: {n: f for n, f in fs.items() if n.startswith("celery_")} for r, fs in ours.items()}
    assert set(ours["leader"]) == CLUSTER
    assert set(ours["worker"]) == set(expected) - CLUSTER
    for family in ours.values():
        for name, (kind, label_sets) in family.items():
            assert kind == expected[name]["type"], name
            assert label_sets == {frozenset(expected[name]["labels"])}, name
    # Hosts as celery-exporter names them: the worker's, the API's from its messages' origin.
    hosts = {
        (role, dict(labels)["hostname"])
        for role, (_, text) in zip(("worker", "leader"), healthy, strict=True)
        for _, labels in _samples(text)
        if "hostname" in dict(labels)
    }
    assert hosts == {("worker", host), ("leader", host), ("leader", API_HOST)}

    # 2. The mixin's alert rules, unchanged, on those series: quiet while all is well; the
    # failure rate of prune_old_results; the dead worker; the backlog.
    phases = [(10, healthy), (5, first_failure), (10, failing), (30, down)]
    firing = {
        20: {
            "CeleryTaskHighFailRate": [
                {"job": job, "queue_name": "celery", "name": PRUNE_OLD_RESULTS}
            ]
        },
        50: {
            "CeleryWorkerDown": [{"job": job, "instance": leader_instance, "hostname": host}],
            "CeleryHighQueueLength": [{"job": job, "queue_name": "celery"}],
        },
    }
    _promtool_test(
        promtool, tmp_path, root / EXPORTER / "prometheus_alerts.yaml", job, phases, firing
    )

    # 3. Every metric the dashboards read is exported.
    assert _dashboard_metrics(root) <= set(ours["worker"]) | set(ours["leader"])
