"""Leases on the messages a worker holds, so a dead worker delays its tasks by about the
visibility timeout (90 s by default), however long a live worker's tasks run.

With the Redis broker, every message a worker has taken but not yet acknowledged sits in the
``unacked`` index with the time it was taken, and ours are marked as ours
(ibutsu_server.broker_transport); every live worker scans that index every 10 s and hands each
message of ours older than the visibility timeout to another worker. A live worker renews its
own messages here, a few times per visibility timeout, from its main process: they never look
abandoned (to our workers, nor to upstream's, whose timeout is longer), while a dead worker's
(an OOM-killed pod, a lost node) stop being renewed and come back within the timeout plus one
scan. The running task needs no help to be found: the late redelivery of its message finds the
work done and does nothing. Renewals go wherever the broker connection goes: to the new
primary after a failover.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from celery.worker import state as worker_state

log = logging.getLogger(__name__)

# Renewals per visibility timeout: a lease survives several missed renewals.
RENEWALS_PER_TIMEOUT = 6


def held_delivery_tags() -> list[str]:
    """The delivery tags of every message this worker holds: prefetched, running, or waiting
    for its countdown (a retry)."""
    while True:
        try:
            requests = [
                *worker_state.reserved_requests,
                *worker_state.active_requests,
                *worker_state.scheduled_requests,
            ]
            break
        except RuntimeError:  # the sets changed while being read; read them again
            continue
    tags = {getattr(request.message, "delivery_tag", None) for request in requests}
    return [str(tag) for tag in tags if tag]


class LeaseKeeper(threading.Thread):
    """Renews this worker's messages in the broker's unacked index until stopped."""

    def __init__(self, app: Celery, interval: float) -> None:
        super().__init__(name="ibutsu-leases", daemon=True)
        self.app = app
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.renew(held_delivery_tags())
            except Exception as exc:  # the broker may be down: the next round tries again
                log.warning("could not renew message leases (%s)", type(exc).__name__)

    def renew(self, tags: list[str]) -> None:
        """Mark ``tags`` as taken now, where they are still unacknowledged."""
        if not tags:
            return
        with self.app.connection_for_read() as connection:
            channel: Any = connection.default_channel
            channel.renew(tags)


def install(app: Celery, visibility_timeout: int) -> None:
    """Keep this worker's messages leased while it runs (Redis brokers only)."""

    def start(sender: Any = None, **_kwargs: Any) -> None:
        if app.connection_for_read().transport.driver_type != "redis":
            return
        keeper = LeaseKeeper(app, visibility_timeout / RENEWALS_PER_TIMEOUT)
        keeper.start()
        worker_shutdown.connect(lambda **_: keeper.stopped.set(), weak=False)

    worker_ready.connect(start, weak=False)
