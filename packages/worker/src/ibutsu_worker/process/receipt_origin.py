"""task-received events that name the task's producer.

The scheduler that leads counts every send, ``celery_task_sent_total{hostname}``, from the
broker's events, labelled as celery-exporter labels it: the host of the producer's node name,
which Celery's task-sent event carries. A producer that sends no task-sent event (upstream's
API) is known only from the worker's task-received event, which names the worker. Every task
message names its producer too (its ``origin`` header: the same "gen<pid>@<host>" node name
the task-sent event would carry), so the worker adds it to its task-received event as
``origin``. Flower and celery-exporter keep or ignore a field they do not know.

Celery sends task-received right after the ``task_received`` signal, in the same thread and
with no field of ours: the signal hands the origin to the dispatcher, which adds it to the
event of that task and only that one.
"""

from __future__ import annotations

from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from celery.signals import task_received

#: For ``Celery(events=...)``: the worker's events, task-received with its origin.
EVENTS = f"{__name__}:OriginEvents"


class OriginDispatcher(EventDispatcher):  # type: ignore[misc]
    """Celery's event dispatcher, adding the origin handed over for the next task-received."""

    _next_receipt: tuple[str, str] | None = None

    def expect_receipt(self, task_id: str, origin: str) -> None:
        """The task-received event of ``task_id``, sent next, carries ``origin``."""
        self._next_receipt = (task_id, origin)

    def send(self, type: str, *args: Any, **fields: Any) -> Any:
        if type == "task-received":
            expected, self._next_receipt = self._next_receipt, None
            if expected is not None and expected[0] == fields.get("uuid"):
                fields["origin"] = expected[1]
        return super().send(type, *args, **fields)


class OriginEvents(Events):  # type: ignore[misc]
    """``app.events`` with the OriginDispatcher."""

    dispatcher_cls = f"{__name__}:OriginDispatcher"


def _hand_over(sender: Any = None, request: Any = None, **_kwargs: Any) -> None:
    dispatcher = getattr(sender, "event_dispatcher", None)  # sender: the worker's consumer
    origin = (getattr(request, "request_dict", None) or {}).get("origin")
    if isinstance(dispatcher, OriginDispatcher) and isinstance(origin, str):
        dispatcher.expect_receipt(str(request.id), origin)


def install() -> None:
    """Hand each received task's origin to the dispatcher (the app needs ``EVENTS``)."""
    task_received.connect(_hand_over, weak=False)
