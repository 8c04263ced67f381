"""One run per slot of the periodic tasks both beats send, ours and upstream's.

During a rolling update or a rollback, upstream's beat (its own schedule, Celery's default
scheduler) and ours may both run. Each sends the same tasks (``task_names.UPSTREAM_PERIODIC``)
at its own times: the prunes daily or weekly, ``sync_aborted_runs`` every half hour. Our beat
leaves those to upstream's while upstream's workers are about (they run what they take
without asking anyone); otherwise both beats' sends reach our workers, and the first to
start a slot's task claims the slot in Redis: the second finds it claimed and does nothing.

A slot is the task with its arguments in one period: the UTC day for the prunes, the half
hour for ``sync_aborted_runs``. Only what a beat sends is claimed: a message from the broker
with positional arguments or none (beats send positional arguments); the admin page sends
keywords only, and a call in the caller's process (``apply``) is nobody's slot, so those
always run.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from time import time
from typing import Any

from celery import Task

from ibutsu_server import task_names
from ibutsu_server.broker_keys import SLOT

log = logging.getLogger(__name__)

DAY = 86_400
HALF_HOUR = 1_800
#: Each periodic task's slot length, in seconds.
PERIODS = {
    task_names.PRUNE_OLD_FILES: DAY,
    task_names.PRUNE_OLD_RESULTS: DAY,
    task_names.PRUNE_OLD_RUNS: DAY,
    task_names.PRUNE_OLD_IMPORT_FILES: DAY,
    task_names.SYNC_ABORTED_RUNS: HALF_HOUR,
}


def slot_start(name: str, now: float) -> int:
    """When the slot of ``name`` that ``now`` falls in began (epoch seconds)."""
    period = PERIODS[name]
    return int(now // period * period)


def slot_key(name: str, args: Any, now: float) -> str:
    """The Redis key of the slot that ``name`` called with ``args`` at ``now`` falls in."""
    arguments = json.dumps(list(args or ()), default=str)
    return SLOT.format(name=name, args=arguments, start=slot_start(name, now))


def is_beat_send(task: Task) -> bool:
    """Whether the message running ``task`` is a beat's: from the broker, no keywords."""
    request = task.request
    return task.name in PERIODS and not request.is_eager and not request.kwargs


def claim(task: Task, now: float | None = None) -> bool:
    """True when ``task`` should run: not a beat's send, or the first of its slot (claimed
    now, in Redis, for two periods, by its task id: its retries run); False when another run
    claimed the slot first. Where
    the broker is not Redis (the embedded default: one scheduler) every send runs."""
    if not is_beat_send(task):
        return True
    now = time() if now is None else now
    args = list(task.request.args or ())
    with task.app.connection_for_write() as connection:
        if connection.transport.driver_type != "redis":
            return True
        channel: Any = connection.default_channel
        key = channel.keys.full(slot_key(task.name, args, now))
        ttl = 2 * PERIODS[task.name]
        owner = (task.request.id or "").encode()
        first = channel.raw_client.set(key, owner, nx=True, ex=ttl)
        # The same task again (a retry after a lost connection) keeps the slot it claimed.
        first = first or channel.raw_client.get(key) == owner
    if not first:
        log.info(
            "%s%s: its slot (from %s UTC) already ran, both beats sent it; skipped",
            task.name,
            tuple(args),
            datetime.fromtimestamp(slot_start(task.name, now), UTC).isoformat(timespec="minutes"),
        )
    return bool(first)
