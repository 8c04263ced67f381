"""Reading the broker's Redis in tests, by the key names and envelopes of
ibutsu_server.broker_keys (the deployment's prefix included)."""

from __future__ import annotations

from typing import Any

import redis

from ibutsu_server.broker_keys import BrokerKeys, Envelope
from ibutsu_testing.services import REDIS_URL


def keys_of(app_or_prefix: Any) -> BrokerKeys:
    """The broker keys of a Celery app, or of a deployment with this key prefix."""
    if isinstance(app_or_prefix, str):
        return BrokerKeys(prefix=app_or_prefix)
    return BrokerKeys.of(app_or_prefix)


def queued(app_or_prefix: Any, queue: str, url: str = REDIS_URL) -> list[Envelope]:
    """The messages waiting in ``queue``, oldest first (what cannot be read is left out)."""
    client = redis.Redis.from_url(url)
    try:
        raws = client.lrange(keys_of(app_or_prefix).queue(queue), 0, -1)
    finally:
        client.close()
    return [message for raw in reversed(raws) if (message := Envelope.decode(raw)) is not None]


def foreign_held(client: redis.Redis, keys: BrokerKeys | None = None) -> int:
    """How many messages a worker that is not ours holds: taken, not acknowledged, not
    marked as ours (``keys``: a deployment without a prefix, as upstream's, by default)."""
    keys = keys or BrokerKeys()
    tags = [
        tag.decode() if isinstance(tag, bytes) else str(tag) for tag in client.hkeys(keys.unacked)
    ]
    marks = client.zmscore(keys.leased, tags) if tags else []
    return sum(mark is None for mark in marks)
