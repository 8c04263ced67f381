"""Kombu's Redis transport, with one Redis client per channel instead of one per command.

Outside its event loop Kombu builds a new redis-py client for each command it sends: every
event a worker publishes (three per task), every delivery's bookkeeping. Building a redis-py
client fills a table of some 170 response callbacks, which made client construction a tenth of
a busy worker's main-process CPU, on the path between one task and the next. Here a channel
keeps one client for as long as it keeps its connection pool; redis-py clients are thread-safe
and hold no connection of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis

TRANSPORT = f"{__name__}:Transport"


class Channel(redis.Channel):
    """A Redis channel that reuses its client for commands sent outside the event loop."""

    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is not None:
            yield client
            return
        pool = self.pool  # a new one after a reconnection: the client follows it
        if self._kept_client is None or self._kept_client.connection_pool is not pool:
            self._kept_client = self._create_client()  # type: ignore[no-untyped-call]
        yield self._kept_client


class Transport(redis.Transport):
    """Kombu's ``redis://`` transport with :class:`Channel`."""

    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The transport to use for ``broker_url``: ours for plain ``redis://``; None (Kombu's
    choice by scheme) for everything else, TLS and Sentinel included."""
    return TRANSPORT if urlsplit(broker_url).scheme == "redis" else None
