"""Which imports the broker still holds a message for: waiting in a queue, or taken by a
worker and not yet acknowledged (Redis brokers)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

from celery import Celery

from ibutsu_server import task_names
from ibutsu_worker.importing.job import import_id_of

IMPORT_TASKS = frozenset(
    {task_names.RUN_JUNIT_IMPORT, task_names.RUN_ARCHIVE_IMPORT, task_names.IMPORT_RESULTS}
)


def _import_id(raw: bytes | str) -> str | None:
    """The import a raw Redis message is about, if it is an import task's; else None."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash keeps [message, exchange, routing key]
            message = message[0]
        if message.get("headers", {}).get("task") not in IMPORT_TASKS:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    key = import_id_of(args[0]) if args else None
    return str(key) if key else None


def _ids(raws: Iterable[bytes | str]) -> set[str]:
    return {key for raw in raws if (key := _import_id(raw)) is not None}


def held_import_ids(app: Celery) -> set[str] | None:
    """The import ids the broker holds a message for, in any of the app's queues (both the
    shared one and ours) or taken by any worker and not acknowledged (ours, or upstream's
    prefetched ones); None when the broker is not Redis (it cannot be read so, and nothing
    should be sent again on a guess) or the server answering is not a primary (a switch-over
    just made it a replica: its view may lag)."""
    with app.connection_for_read() as connection:
        if connection.transport.driver_type != "redis":
            return None
        channel: Any = connection.default_channel
        role = channel.client.execute_command("ROLE")[0]
        if role not in (b"master", "master"):
            return None
        prefix = getattr(channel, "global_keyprefix", "") or ""
        # One transaction: a snapshot. A message being handed back (out of the unacknowledged
        # set, into its queue) is seen in one place or the other, never in neither.
        with channel.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("HVALS", prefix + channel.unacked_key)
            for queue in app.amqp.queues:
                for priority in channel.priority_steps:
                    key = prefix + channel._q_for_pri(queue, priority)
                    pipe.execute_command("LRANGE", key, 0, -1)
            replies = pipe.execute()
    unacked, *queued = replies
    found = _ids(unacked)
    for raws in queued:
        found |= _ids(raws)
    return found
