"""Which imports the broker still holds a message for: waiting in a queue, or taken by a
worker and not yet acknowledged (Redis brokers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery

from ibutsu_server import task_names
from ibutsu_server.broker_keys import Envelope
from ibutsu_worker.importing.job import import_id_of

IMPORT_TASKS = frozenset(
    {task_names.RUN_JUNIT_IMPORT, task_names.RUN_ARCHIVE_IMPORT, task_names.IMPORT_RESULTS}
)


def _import_id(raw: bytes | str) -> str | None:
    """The import a raw Redis message is about, if it is an import task's; else None."""
    message = Envelope.decode(raw)
    if message is None or message.task not in IMPORT_TASKS or not message.args:
        return None
    key = import_id_of(message.args[0])
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
        keys = channel.keys
        # One transaction: a snapshot. A message being handed back (out of the unacknowledged
        # set, into its queue) is seen in one place or the other, never in neither.
        with channel.raw_client.pipeline(transaction=True) as pipe:
            pipe.hvals(keys.unacked)
            for queue in app.amqp.queues:
                for key in keys.queue_lists(queue):
                    pipe.lrange(key, 0, -1)
            replies = pipe.execute()
    unacked, *queued = replies
    found = _ids(unacked)
    for raws in queued:
        found |= _ids(raws)
    return found
