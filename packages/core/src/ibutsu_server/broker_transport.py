"""Kombu's Redis transport, with two fixes every role gets for ``redis://`` URLs.

- **One Redis client per channel, not one per command.** Outside its event loop Kombu builds a
  new redis-py client for each command it sends: every event a worker publishes (three per
  task), every delivery's bookkeeping. Building one fills a table of some 170 response
  callbacks, which made client construction a tenth of a busy worker's main-process CPU, on the
  path between one task and the next. A channel here keeps one client for as long as it keeps
  its connection pool; redis-py clients are thread-safe and hold no connection of their own.
- **A broker restart never kills the worker.** When the connection drops, Kombu closes the
  channel; closing puts the messages it holds back on their queue, and a task that finishes
  later acknowledges its message on that closed channel. Both fail inside Kombu with an
  ``AttributeError`` (the channel has no connection left), which Celery treats as
  unrecoverable: the worker's main process exits. Here a closed channel raises a connection
  error instead, which Celery expects and logs, and the messages stay where they are, in the
  broker's unacknowledged set, which every worker scans: a worker (this one, reconnected, or
  another) gets them once the visibility timeout has passed, and their tasks find the work done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, redis
from redis import exceptions as redis_errors

log = logging.getLogger(__name__)

TRANSPORT = f"{__name__}:Transport"


class QoS(redis.QoS):
    """Kombu's Redis QoS, leaving messages to the visibility timeout when it cannot reach
    the broker to put them back."""

    def restore_unacked(self, client: Any = None) -> Any:
        held = len(self._delivered)
        try:
            return super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except self.channel.connection_errors as exc:
            log.warning(
                "%d message(s) this worker held stay in the broker's unacknowledged set (%s); "
                "a worker takes them once the visibility timeout has passed",
                held,
                f"{type(exc).__name__}: {exc}",
            )
            self._delivered.clear()
            return None


class Channel(redis.Channel):
    """A Redis channel that reuses its client for commands sent outside the event loop."""

    QoS = QoS
    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is not None:
            yield client
            return
        if self.connection is None or self.connection.client is None:
            # The error Kombu and Celery expect of a lost connection.
            raise redis_errors.ConnectionError("the channel's broker connection was closed")
        pool = self.pool  # a new one after a reconnection: the client follows it
        if self._kept_client is None or self._kept_client.connection_pool is not pool:
            self._kept_client = self._create_client()  # type: ignore[no-untyped-call]
        yield self._kept_client


class Transport(redis.Transport):
    """Kombu's ``redis://`` transport with :class:`Channel`."""

    Channel = Channel


def use_for_redis_urls() -> None:
    """Make ``redis://`` URLs use :class:`Transport` in this process. Kombu maps a URL's scheme
    to its transport in TRANSPORT_ALIASES; registering there (rather than naming the class in
    ``broker_transport``) keeps "Connected to redis://..." in the logs that operators grep.
    TLS (``rediss://``) and Sentinel URLs keep Kombu's own."""
    TRANSPORT_ALIASES["redis"] = TRANSPORT
