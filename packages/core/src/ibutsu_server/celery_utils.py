"""Celery configuration and the broker-only factory.

This module must never import Flask, SQLAlchemy or a database driver, not even indirectly:
the Flower role builds its app from here and its image carries none of them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, Protocol

from celery import Celery
from celery.signals import after_setup_logger
from kombu.entity import Exchange, Queue

from ibutsu_server import broker_transport, redis_connections, task_names
from ibutsu_server.liveness import LoopWatch
from ibutsu_server.settings import (
    DEFAULT_LIVENESS_SECONDS,
    ConfigError,
    Role,
    Settings,
    load_settings,
    redact_url,
)

log = logging.getLogger(__name__)

EMBEDDED_POLLING_INTERVAL = 0.2
RESTORE_SCAN_SECONDS = 10


def settings_or_exit(role: Role) -> Settings:
    """Load the role's settings, or print every problem and exit with status 2. The problems
    include what Redis itself says is wrong with the configuration (a certificate that does
    not verify, a refused password): no retry can mend those.

    Used by the entry points, where a traceback would only hide the message.
    """
    try:
        settings = load_settings(role)
        problems = redis_connections.startup_problems(settings)
        if problems:
            raise ConfigError(role, problems)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def _broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_dir is not None:
        queue_dir = settings.embedded_dir / "broker" / "queue"
        processed_dir = settings.embedded_dir / "broker" / "processed"
        control_dir = settings.embedded_dir / "broker" / "control"
        for folder in (queue_dir, processed_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "control_folder": str(control_dir),
            "store_processed": False,
            "polling_interval": EMBEDDED_POLLING_INTERVAL,
        }
    return {
        **_key_prefix(settings),
        **_sentinel(settings, settings.broker_url),
        # A dead worker's messages come back after the visibility timeout: scanned for every
        # 10 s by every live worker (Kombu's default would scan every 100 s).
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": RESTORE_SCAN_SECONDS,
        "unacked_restore_throttle": 1,
        **redis_connections.connection_options(),
    }


def _key_prefix(settings: Settings) -> dict[str, str]:
    # Lets several deployments (or test runs) share one Redis without seeing each other.
    return {"global_keyprefix": settings.redis_key_prefix} if settings.redis_key_prefix else {}


def _sentinel(settings: Settings, url: str | None) -> dict[str, Any]:
    if not (url or "").startswith("sentinel://"):
        return {}
    return redis_connections.sentinel_options(settings.redis)


def _tls(settings: Settings, url: str | None) -> dict[str, Any] | None:
    if not (url or "").startswith("rediss://"):
        return None
    return redis_connections.tls_options(settings.redis)


def _queue(name: str) -> Queue:
    # As Celery declares its default queue: a direct exchange of the queue's name.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


def task_routing() -> dict[str, Any]:
    """Where tasks go: upstream's names to the shared queue, which upstream's workers consume
    too during a rolling update; names only ours register (``task_names.OURS``) to a queue
    only ours consume, so that upstream's workers never receive (and discard) them. Plain
    values only: every worker reports its configuration as JSON (``celery inspect conf``)."""
    return {
        "task_default_queue": task_names.SHARED_QUEUE,
        "task_routes": {name: {"queue": task_names.OWN_QUEUE} for name in sorted(task_names.OURS)},
    }


def declare_queues(app: Celery) -> None:
    """Make both queues the app's own, so that a worker started without ``-Q`` consumes both
    and every role sees both (``app.amqp.queues``: the broker scan, the queue lengths). Kept
    out of the configuration, whose queue objects JSON cannot carry."""
    queues = app.amqp.queues
    for name in (task_names.SHARED_QUEUE, task_names.OWN_QUEUE):
        if name not in queues.consume_from:
            # select_add: consumed by default too (a plain add would only be known).
            queues.select_add(_queue(name))


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every role shares, as plain Celery configuration keys."""
    return {
        **task_routing(),
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "result_backend_transport_options": {
            **_key_prefix(settings),
            **_sentinel(settings, settings.result_backend),
        },
        "broker_transport_options": _broker_transport_options(settings),
        "broker_use_ssl": _tls(settings, settings.broker_url),
        "redis_backend_use_ssl": _tls(settings, settings.result_backend),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # JSON only: pickle from a shared broker would be remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged only once it has finished, so a killed worker loses nothing.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        # SIGTERM: wait this long for running tasks, then stop them and hand their messages
        # back (they were never acknowledged), so a pod stops within its grace period.
        "worker_soft_shutdown_timeout": float(settings.soft_shutdown_seconds),
        "result_expires": settings.result_expires,
        "result_extended": False,
        "redis_socket_timeout": redis_connections.SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": redis_connections.SOCKET_TIMEOUT,
        "redis_backend_health_check_interval": redis_connections.HEALTH_CHECK_INTERVAL,
        "redis_socket_keepalive": True,
        "redis_retry_on_timeout": False,  # a lost connection is retried (redis_connections)
        "worker_concurrency": settings.worker_concurrency,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "timezone": settings.timezone,
        "enable_utc": True,
    }


class Endpoint(Protocol):
    """The HTTP endpoint a process serves (``http_endpoints.ProbeServer``), named here by its
    shape so that Flower's app never imports it."""

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


class IbutsuCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries, typed, the settings it was built from, the HTTP endpoint
    (/metrics, /healthz, /readyz) its process serves, if any, and the watch on its main loop
    that /healthz answers from."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.endpoint: Endpoint | None = None
        timeout = settings.metrics.liveness_seconds if settings.metrics else None
        self.liveness = LoopWatch(timeout or DEFAULT_LIVENESS_SECONDS)


def create_celery(
    settings: Settings,
    *,
    app_class: type[IbutsuCelery] = IbutsuCelery,
    include: Iterable[str] = (),
    **kwargs: Any,
) -> IbutsuCelery:
    """Build a configured Celery app for ``settings`` and log where it points (redacted)."""
    broker_transport.install()
    app = app_class(settings, f"ibutsu_{settings.role.value}", include=list(include), **kwargs)
    app.conf.update(celery_config(settings))
    declare_queues(app)
    level = settings.worker_loglevel.upper()

    def apply_log_level(logger: logging.Logger, **_kwargs: Any) -> None:
        # CELERY_WORKER_LOGLEVEL is the deployment's word: it wins over --loglevel.
        logger.setLevel(level)

    after_setup_logger.connect(apply_log_level, weak=False)
    if settings.embedded:
        log.warning(
            "ibutsu %s: no CELERY_BROKER_URL or POSTGRESQL_* set, running embedded: "
            "SQLite database and filesystem broker in %s",
            settings.role.value,
            settings.embedded_dir,
        )
    else:
        log.info("ibutsu %s: broker %s", settings.role.value, redact_url(settings.broker_url))
    return app


def create_broker_celery_app(settings: Settings | None = None) -> IbutsuCelery:
    """A broker-only Celery app (Flower): no Flask, no database, runs no task of its own."""
    return create_celery(settings or settings_or_exit(Role.FLOWER))
