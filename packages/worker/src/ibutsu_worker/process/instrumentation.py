"""Celery signal handlers that feed the worker metrics, and the worker's HTTP endpoint.

Task signals fire in the pool child that runs the task (received, rejected and revoked in
the main process); the endpoint runs in the main process only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.signals import (
    task_failure,
    task_prerun,
    task_received,
    task_rejected,
    task_retry,
    task_revoked,
    task_success,
    worker_init,
)
from celery.worker import state as worker_state

from ibutsu_server.app_factory import FlaskCelery
from ibutsu_server.http_endpoints import Endpoints, serve
from ibutsu_server.metric_labels import UNKNOWN, hostname_label
from ibutsu_server.readiness import readiness_check
from ibutsu_server.settings import MetricsSettings
from ibutsu_worker.process import metrics

log = logging.getLogger(__name__)
_STARTED_AT = "_ibutsu_started_at"


def _labels(task: Any, request: Any = None) -> tuple[str, str, str]:
    request = request if request is not None else getattr(task, "request", None)
    delivery = getattr(request, "delivery_info", None) or {}
    hostname = hostname_label(getattr(request, "hostname", None))
    queue = delivery.get("routing_key") or "celery"
    name = getattr(task, "name", None) or getattr(request, "name", None) or UNKNOWN
    return str(name), hostname, str(queue)


def _on_prerun(task: Any = None, **_kwargs: Any) -> None:
    metrics.count(metrics.STARTED, *_labels(task))
    setattr(task.request, _STARTED_AT, time.perf_counter())


def _on_success(sender: Any = None, **_kwargs: Any) -> None:
    labels = _labels(sender)
    metrics.count(metrics.SUCCEEDED, *labels)
    started = getattr(sender.request, _STARTED_AT, None)
    if started is not None:
        metrics.RUNTIME.labels(*labels).observe(time.perf_counter() - started)


def _on_failure(sender: Any = None, exception: BaseException | None = None, **_kw: Any) -> None:
    metrics.count(metrics.FAILED, *_labels(sender), exception=type(exception).__name__)


def _on_retry(sender: Any = None, reason: Any = None, **_kwargs: Any) -> None:
    metrics.count(metrics.RETRIED, *_labels(sender))
    metrics.RETRIES.labels(
        type(reason).__name__ if isinstance(reason, BaseException) else "other"
    ).inc()


def _on_received(request: Any = None, **_kwargs: Any) -> None:
    metrics.count(metrics.RECEIVED, *_labels(None, request))


def _rejected_counter(app: Celery) -> Any:
    def on_rejected(sender: Any = None, message: Any = None, **_kwargs: Any) -> None:
        headers = getattr(message, "headers", None) or {}
        delivery = getattr(message, "delivery_info", None) or {}
        # Only a registered name becomes a label: a message can say anything, and every new
        # label value would be a new series for good.
        name = headers.get("task")
        label = name if isinstance(name, str) and name in app.tasks else UNKNOWN
        routing_key = delivery.get("routing_key")
        queue = routing_key if routing_key in app.amqp.queues else UNKNOWN
        hostname = hostname_label(getattr(sender, "hostname", None))  # the consumer's worker
        metrics.count(metrics.REJECTED, label, hostname, str(queue))

    return on_rejected


def _on_revoked(sender: Any = None, request: Any = None, **_kwargs: Any) -> None:
    # sender: the task; request: its context, which has no name of its own.
    metrics.count(metrics.REVOKED, *_labels(sender, request))


def install(app: FlaskCelery, settings: MetricsSettings | None) -> None:
    """Connect the metric handlers; serve /metrics, /healthz and /readyz from the start of the
    worker (before it reaches the broker: a worker waiting for its broker is alive, not ready),
    when ``settings`` asks for it."""
    handlers = (
        (task_prerun, _on_prerun),
        (task_success, _on_success),
        (task_failure, _on_failure),
        (task_retry, _on_retry),
        (task_received, _on_received),
        (task_rejected, _rejected_counter(app)),
        (task_revoked, _on_revoked),
    )
    for signal, handler in handlers:
        signal.connect(handler, weak=False)
    if settings is None:
        return

    def start_endpoint(sender: Any = None, **_kwargs: Any) -> None:
        hostname = hostname_label(getattr(sender, "hostname", None))
        state = metrics.WorkerStateCollector(hostname, lambda: len(worker_state.active_requests))
        endpoints = Endpoints(
            metrics=lambda: metrics.render(state),
            alive=app.liveness.check,
            ready=readiness_check(app, app.engine),
        )
        app.endpoint = serve(settings, endpoints)

    worker_init.connect(start_endpoint, weak=False)
