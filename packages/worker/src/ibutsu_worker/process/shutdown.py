"""SIGTERM as Kubernetes sends it: stop taking work, let running tasks finish for up to
``CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT`` seconds, then stop them and hand their messages back.

Celery's SIGTERM is a warm shutdown that waits for running tasks however long they take, so a
long import outlives the pod's grace period and is SIGKILLed with it; its message then waits
for the visibility timeout. Celery's cold shutdown with a soft timeout does what a pod needs:
tasks still running at the timeout are cancelled, their transactions roll back, and their
never-acknowledged messages go straight back to the queue for another worker.

Celery's documented switch for it, ``REMAP_SIGTERM=SIGQUIT``, is an environment variable read
when ``celery`` starts, before the app is loaded, so no setting of ours can turn it on: a worker
started without it (a plain ``celery worker``, a manifest written for upstream's workers) would
keep the warm shutdown. So the handler is installed here, through Celery's own
``_shutdown_handler`` (private: pinned by the lock file, and the fault suite's SIGTERM test
fails if it changes).
"""

from __future__ import annotations

from typing import Any

from celery.apps import worker as worker_app
from celery.platforms import EX_FAILURE
from celery.signals import worker_ready


def install() -> None:
    """Make SIGTERM a soft, then cold, shutdown once the worker is ready."""

    def on_ready(sender: Any = None, **_kwargs: Any) -> None:
        controller = getattr(sender, "controller", None)
        if controller is None:
            return
        worker_app._shutdown_handler(
            controller,
            sig="SIGTERM",
            how="Cold",
            callback=worker_app.on_cold_shutdown,
            exitcode=EX_FAILURE,
        )

    worker_ready.connect(on_ready, weak=False)
