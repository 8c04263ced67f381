"""Worker metrics, named and labelled as danihodovic/celery-exporter names them, so its
Grafana dashboards and alert rules work unchanged; plus Ibutsu's own.

Pool children record into prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR),
and the main process serves their sum: counts from every child survive the child, and a
replaced child starts files of its own, so nothing is counted twice.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable
from contextlib import suppress

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TASK_LABELS = ["name", "hostname", "queue_name"]
RECEIVED = Counter("celery_task_received", "Tasks received by a worker", TASK_LABELS)
STARTED = Counter("celery_task_started", "Tasks started", TASK_LABELS)
SUCCEEDED = Counter("celery_task_succeeded", "Tasks that succeeded", TASK_LABELS)
FAILED = Counter("celery_task_failed", "Tasks that failed", [*TASK_LABELS, "exception"])
REJECTED = Counter("celery_task_rejected", "Tasks rejected", TASK_LABELS)
REVOKED = Counter("celery_task_revoked", "Tasks revoked", TASK_LABELS)
RETRIED = Counter("celery_task_retried", "Tasks retried", TASK_LABELS)
# Of tasks that succeeded, as celery-exporter's; its buckets stop at 10 s (it lets them be set),
# ours go on to an hour: large imports take minutes.
RUNTIME = Histogram(
    "celery_task_runtime",
    "Runtime in seconds of tasks that succeeded",
    TASK_LABELS,
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
TASK_COUNTERS = (RECEIVED, STARTED, SUCCEEDED, FAILED, REJECTED, REVOKED, RETRIED)

IMPORTS = Counter("ibutsu_imports", "Imports finished", ["format", "outcome"])
RESULTS_IMPORTED = Counter("ibutsu_results_imported", "Results written by imports")
ROWS_PRUNED = Counter("ibutsu_rows_pruned", "Rows deleted by pruning", ["table"])
SUMMARY_UPDATES = Counter("ibutsu_summary_updates", "Run summary updates", ["outcome"])
RETRIES = Counter("ibutsu_task_retries", "Retries of transient failures", ["reason"])
# A multiprocess file's first bytes: how much of it is used.
_FILE_HEADER_BYTES = 8


def count(counter: Counter, name: str, hostname: str, queue: str, exception: str = "") -> None:
    """Count one event of a task (``exception`` only for FAILED), and show every other task
    counter of the same labels at 0, as celery-exporter does: a counter that first appears
    with its first increment shows no ``increase()``, so a first failure would never reach
    a failure-rate alert."""
    for each in TASK_COUNTERS:
        if each is FAILED:
            child = each.labels(name, hostname, queue, exception if counter is FAILED else "")
        else:
            child = each.labels(name, hostname, queue)
        if each is counter:
            child.inc()


class WorkerStateCollector(Collector):
    """Computed at scrape time in the main process: tasks running, the main process's own
    count (right even after a child was killed mid-task). Whether workers are up, queue
    lengths and sends are the cluster's, exported once by the scheduler leader."""

    def __init__(self, hostname: str, active: Callable[[], int]) -> None:
        self.hostname = hostname
        self.active = active

    def collect(self) -> Iterable[GaugeMetricFamily]:
        active = GaugeMetricFamily(
            "celery_worker_tasks_active", "Tasks running now", labels=["hostname"]
        )
        active.add_metric([self.hostname], self.active())
        yield active


class StartedFilesCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's multiprocess collector, but for the file of a child starting this
    instant: it creates the file empty, then sizes it. Read in between, it has no header and
    fails the whole scrape; it holds nothing yet, so it is left out."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with suppress(FileNotFoundError):
                if os.path.getsize(path) >= _FILE_HEADER_BYTES:
                    files.append(path)
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


def render(state: Collector) -> bytes:
    """Every child's and the main process's samples, summed, in the text format."""
    registry = CollectorRegistry()
    StartedFilesCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(state)
    return bytes(generate_latest(registry))
