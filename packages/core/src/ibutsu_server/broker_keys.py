"""The broker's Redis keys and its messages' envelopes: the one place that names them.

Kombu's Redis transport lays a deployment out so: a queue is a list named after it (for a
priority other than the first, the name, ``\x06\x16`` and the priority step); a message taken
and not yet acknowledged is in the ``unacked`` hash (delivery tag: ``[message, exchange,
routing key]``) and the ``unacked_index`` sorted set (tag: when taken); ours are also in
``unacked_leased`` (ibutsu_server.broker_transport). Keys of our own besides: sightings of
upstream's workers (ibutsu_server.fleet) and claims on periodic slots (ibutsu_worker.slots).
Every key carries the deployment's prefix (``IBUTSU_REDIS_KEY_PREFIX``, Kombu's
``global_keyprefix``). Kombu's own client adds the prefix to the commands it knows, and only
to those; everything of ours that reads or writes these keys directly (the transport's claim
and leases, the broker scan, the scheduler's queue lengths, the sightings, the slots, tests
and benchmarks) gives whole names from :class:`BrokerKeys` instead, so there is one rule.

A message is JSON: ``headers`` (the task's name and id), ``properties`` (its delivery tag and,
as Celery sends it, ``body_encoding: base64``) and ``body``, the task's ``[args, kwargs,
embed]``; :class:`Envelope` reads one, from a queue or from the ``unacked`` hash alike.
"""

from __future__ import annotations

import base64
import json
from bisect import bisect
from dataclasses import dataclass, field
from typing import Any

# Kombu's defaults (kombu.transport.redis.Channel), which its transport options may change.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: The sorted set of the messages our workers hold (delivery tag: when taken or last renewed).
LEASED = "unacked_leased"
#: The sorted set of upstream's workers seen consuming the shared queue (name: when seen).
SIGHTINGS = "ibutsu:upstream-sightings"
#: The claim on one slot of a periodic task both beats send (ibutsu_worker.slots).
SLOT = "ibutsu:slot:{name}:{args}:{start}"


@dataclass(frozen=True)
class BrokerKeys:
    """The full names, prefix included, of one deployment's broker keys."""

    prefix: str = ""
    priority_steps: tuple[int, ...] = PRIORITY_STEPS
    unacked_name: str = UNACKED
    unacked_index_name: str = UNACKED_INDEX

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> BrokerKeys:
        """The keys a Kombu Redis channel with these transport options uses."""
        return cls(
            prefix=options.get("global_keyprefix") or "",
            priority_steps=tuple(options.get("priority_steps") or PRIORITY_STEPS),
            unacked_name=options.get("unacked_key") or UNACKED,
            unacked_index_name=options.get("unacked_index_key") or UNACKED_INDEX,
        )

    @classmethod
    def of(cls, app: Any) -> BrokerKeys:
        """The keys of a Celery app's broker."""
        return cls.from_options(dict(app.conf.broker_transport_options or {}))

    def full(self, name: str) -> str:
        """``name`` as it is named on the server."""
        return f"{self.prefix}{name}"

    @property
    def unacked(self) -> str:
        return self.full(self.unacked_name)

    @property
    def unacked_index(self) -> str:
        return self.full(self.unacked_index_name)

    @property
    def leased(self) -> str:
        return self.full(LEASED)

    @property
    def sightings(self) -> str:
        return self.full(SIGHTINGS)

    def queue(self, queue: str, priority: int = 0) -> str:
        """The list holding ``queue``'s messages of ``priority`` (rounded down to a step, as
        Kombu does)."""
        step = self.priority_steps[bisect(self.priority_steps, priority) - 1]
        return self.full(f"{queue}{PRIORITY_SEPARATOR}{step}" if step else queue)

    def queue_lists(self, queue: str) -> list[str]:
        """Every list of ``queue``, the first priority's first (the order Kombu takes them)."""
        return [self.queue(queue, step) for step in self.priority_steps]


@dataclass(frozen=True)
class Envelope:
    """A task message as the broker holds it."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    body: Any = field(repr=False)

    @classmethod
    def decode(cls, raw: bytes | str) -> Envelope | None:
        """The message in ``raw``, a queue's entry or an ``unacked`` hash value; None if it is
        not a message."""
        try:
            message = json.loads(raw)
            if isinstance(message, list):  # the unacked hash: [message, exchange, routing key]
                message = message[0]
            headers = message.get("headers") or {}
            properties = message.get("properties") or {}
            body = message["body"]
            if properties.get("body_encoding") == "base64":
                body = base64.b64decode(body)
            return cls(headers=headers, properties=properties, body=json.loads(body))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None

    @property
    def task(self) -> str | None:
        """The task's name."""
        name = self.headers.get("task")
        return name if isinstance(name, str) else None

    @property
    def id(self) -> str | None:
        """The task's id."""
        task_id = self.headers.get("id")
        return task_id if isinstance(task_id, str) else None

    @property
    def args(self) -> list[Any]:
        """The task's positional arguments."""
        if isinstance(self.body, list) and self.body and isinstance(self.body[0], list):
            return self.body[0]
        return []

    @property
    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments."""
        if isinstance(self.body, list) and len(self.body) > 1 and isinstance(self.body[1], dict):
            return self.body[1]
        return {}
