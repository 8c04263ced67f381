"""The worker's consumer: Celery's own, ticking the liveness watch from its event loop,
without its Gossip step, and one line, not a traceback, when a message cannot be acknowledged
because the broker is away.

The event loop runs a timer of ours that ticks ``app.liveness`` (ibutsu_server.liveness):
if the loop hangs, ticks stop and /healthz fails. Leaving the loop to reconnect to the broker
is on purpose, and says so, so a broker outage fails readiness, not liveness.

Gossip keeps workers informed of each other for elections and logical clocks, which nothing
here uses (Flower and the metrics read events and heartbeats, which other steps send). And
after every broker restart Celery 5.6's Gossip fails to restart with a logged
``AttributeError`` traceback. Set in the worker's configuration (``worker_consumer``), so it
holds for whatever command line starts the worker, ``--without-gossip`` or not.

A task that finishes while the broker restarts cannot be acknowledged; Kombu logs that as
CRITICAL with a traceback. Nothing is lost: the message stays in the broker's unacknowledged
set, is handed out again after the visibility timeout, and its task finds the work done.

A heartbeat that gets no answer gives the broker connection up. Celery sends its heartbeat
(every 2 s) from the event loop and, when the broker does not answer, tries again for ever,
reconnecting each time: on a path that went silent (no FIN, no RST) the whole loop waits with
it, noticing nothing, taking and acknowledging nothing, for as long as the silence lasts. Ours
tries once (at most the socket timeout, ibutsu_server.redis_connections) and raises the
connection error from the loop, which Celery takes as a lost broker: it says so and
reconnects, with backoff, until traffic flows.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery.worker import heartbeat
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer import heart

from ibutsu_server.ibutsu_task import one_line

GOSSIP_STEP = "celery.worker.consumer.gossip:Gossip"
HEART_STEP = "celery.worker.consumer.heart:Heart"
CONSUMER = f"{__name__}:Consumer"
LOOP_TICK_SECONDS = 5.0


class _Heartbeat(heartbeat.Heart):  # type: ignore[misc]
    """Celery's heartbeat, tried once, its failure raised (see the module's doc)."""

    def _send(self, event: str, retry: bool = True) -> Any:
        if event != "worker-heartbeat":  # online, offline: as Celery sends them
            return super()._send(event, retry=retry)
        dispatcher = self.eventer
        buffering, dispatcher.buffer_while_offline = dispatcher.buffer_while_offline, False
        try:
            return super()._send(event, retry=False)
        finally:
            dispatcher.buffer_while_offline = buffering


class Heart(heart.Heart):  # type: ignore[misc]
    """The consumer's heartbeat step, with :class:`_Heartbeat`."""

    def start(self, c: Any) -> None:
        c.heart = _Heartbeat(c.timer, c.event_dispatcher, self.heartbeat_interval)
        c.heart.start()


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, without Gossip, ticking the app's liveness watch, giving its broker
    connection up when a heartbeat fails."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            f"{__name__}:Heart" if step == HEART_STEP else step
            for step in CeleryConsumer.Blueprint.default_steps
            if step != GOSSIP_STEP
        ]

    _ticking = False

    def on_ready(self) -> None:
        # Called each time the event loop (re)starts. The timer survives reconnections.
        liveness = self.app.liveness
        liveness.tick()
        if not self._ticking:
            self.timer.call_repeatedly(LOOP_TICK_SECONDS, liveness.tick)
            self._ticking = True
        super().on_ready()

    def on_connection_error_before_connected(self, exc: Exception) -> None:
        self.app.liveness.leave()
        super().on_connection_error_before_connected(exc)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        self.app.liveness.leave()
        super().on_connection_error_after_connected(exc)


class _OneLineUnacknowledged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        failed = record.getMessage().startswith(("Couldn't ack", "Couldn't reject"))
        if failed and record.exc_info and record.exc_info[1] is not None:
            record.msg = (
                "message %s not acknowledged, the broker is away (%s): it is handed out again "
                "after the visibility timeout and its task finds the work done"
            )
            tag = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (tag, one_line(record.exc_info[1]))
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_unacknowledged() -> None:
    """Log a message the broker could not acknowledge in one line (see the module's doc)."""
    logging.getLogger("celery.worker.request").addFilter(_OneLineUnacknowledged())
