"""Whether workers that are not ours (upstream 3.1.1's, during a rolling update) share the
broker: sightings kept in Redis, so that every role judges by the same record.

Upstream's workers leave evidence of two kinds, and both count:

- **They answer.** Every Celery worker answers a broadcast ``inspect registered`` with the
  names it registers; ours register ``importers.recover_imports``, upstream's do not. Upstream's
  worker answers while busy (its pool process imports, its main process answers).
- **They hold messages.** A message a worker has taken and not acknowledged sits in Kombu's
  unacknowledged index; ours are also marked as ours (``broker_keys.LEASED``). One
  taken within Kombu's visibility timeout and not marked is held by a worker that is not ours,
  alive or dead (a dead one's come back after that timeout, as they would to upstream).

Each look records what it saw with the time (``broker_keys.SIGHTINGS``, a sorted set); an
upstream worker counts as present while it was seen within SIGHTING_GRACE_SECONDS, which
spans two looks of ``recover_imports`` (every two minutes): one broadcast that a busy worker
misses does not make it absent. Nothing here needs the database: the scheduler uses it too.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from celery import Celery

from ibutsu_server import task_names
from ibutsu_server.broker_transport import FOREIGN_VISIBILITY_TIMEOUT

log = logging.getLogger(__name__)

#: Who was seen when: member = a worker's node name (or HELD_BY_OTHERS), score = when.
#: The member recorded for messages held by workers that are not ours.
HELD_BY_OTHERS = "(messages held by workers not ours)"
#: An upstream worker seen this recently still counts as present.
SIGHTING_GRACE_SECONDS = 300
#: How long a broadcast waits for the workers' answers.
INSPECT_TIMEOUT = 2.0
#: Sightings older than this are dropped.
FORGET_SECONDS = 86_400


def is_ours(registered: Any) -> bool:
    """Whether a worker's answer to ``inspect registered`` is one of ours: it registers the
    names only ours do."""
    names = {str(entry).split(" ", 1)[0] for entry in registered or ()}
    return task_names.RECOVER_IMPORTS in names


class RedisSightings:
    """Sightings of upstream's workers on ``app``'s broker (Redis only: on the embedded
    broker there are none, and nothing to share a queue with)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def look(self) -> list[str] | None:
        """Ask every worker what it registers, look for messages held by workers not ours,
        and record what was seen now: upstream's workers by node name. None when the broker
        cannot be asked (an error, or not Redis)."""
        try:
            with self.app.connection_for_read() as connection:
                if connection.transport.driver_type != "redis":
                    return None
                channel: Any = connection.default_channel
                answers = self.app.control.inspect(
                    timeout=INSPECT_TIMEOUT, connection=connection
                ).registered()
                seen = sorted(name for name, names in (answers or {}).items() if not is_ours(names))
                if _held_by_others(channel):
                    seen.append(HELD_BY_OTHERS)
                now = time()
                raw = channel.raw_client
                with raw.pipeline(transaction=False) as pipe:
                    if seen:
                        pipe.zadd(channel.keys.sightings, dict.fromkeys(seen, now))
                    pipe.zremrangebyscore(channel.keys.sightings, 0, now - FORGET_SECONDS)
                    pipe.execute()
        except Exception as exc:  # the broker away: the caller decides as if it could not tell
            log.warning("could not look for upstream's workers (%s)", type(exc).__name__)
            return None
        return seen

    def seen_since(self, since: float) -> list[str] | None:
        """Who was seen since ``since`` (epoch seconds); None when the broker cannot say."""
        try:
            with self.app.connection_for_read() as connection:
                if connection.transport.driver_type != "redis":
                    return []
                channel: Any = connection.default_channel
                found = channel.raw_client.zrangebyscore(channel.keys.sightings, since, "+inf")
        except Exception as exc:
            log.warning("could not read upstream sightings (%s)", type(exc).__name__)
            return None
        return sorted(name.decode() if isinstance(name, bytes) else str(name) for name in found)

    def upstream_present(self) -> bool | None:
        """Look now, then say whether an upstream worker was seen within the grace period;
        None when the broker cannot tell (callers then act as if one were)."""
        if not self.shared():
            return False  # the embedded broker: nobody else consumes it
        self.look()  # a failed look still leaves the earlier sightings to go by
        seen = self.seen_since(time() - SIGHTING_GRACE_SECONDS)
        return None if seen is None else bool(seen)

    def shared(self) -> bool:
        """Whether the broker is one other workers can share (Redis); no I/O."""
        with self.app.connection_for_read() as connection:
            return bool(connection.transport.driver_type == "redis")


def _held_by_others(channel: Any) -> bool:
    """Whether a worker that is not ours holds a message taken within Kombu's visibility
    timeout (unacknowledged, not marked as ours)."""
    raw, keys = channel.raw_client, channel.keys
    tags = raw.zrangebyscore(keys.unacked_index, time() - FOREIGN_VISIBILITY_TIMEOUT, "+inf")
    if not tags:
        return False
    marks = raw.zmscore(keys.leased, tags)
    return any(mark is None for mark in marks)
