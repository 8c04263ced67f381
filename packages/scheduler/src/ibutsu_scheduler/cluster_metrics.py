"""Series that belong to the whole deployment, exported once, by the scheduler that leads.

Each worker pod exports what only it knows: its tasks' counts and runtimes, the tasks it runs
now. What belongs to the cluster would be wrong from every pod: each would report the same
queue length (a sum counts it N times), and a dead worker cannot report itself down (its
series just vanish, which no alert rule can tell from a worker scaled down on purpose). The
scheduler replica that holds the beat lease, one per deployment and already elected, watches
the broker's events instead and exports, with celery-exporter's names and labels (so its
alert rules and dashboards work unchanged):

- ``celery_worker_up{hostname}``: 1 while a worker's heartbeats come (every 2 s), 0 once
  they stopped for HEARTBEAT_MISSES beats (a killed pod, a lost node: kept at 0 for
  FORGET_SECONDS, long enough for any alert) or it said goodbye (worker-offline: a pod
  stopped on purpose, scaled down or replaced, dropped after OFFLINE_FORGET_SECONDS, before
  an alert that waits a few minutes fires). ``hostname`` is the host of the worker's node
  name, as everywhere (ibutsu_server.metric_labels); two workers of one host are one series,
  0 if either is down.
- ``celery_queue_length{queue_name}``: messages waiting, read from the broker at scrape time.
- ``celery_active_worker_count``, ``celery_active_process_count``,
  ``celery_active_consumer_count{queue_name}``: workers consuming each queue, their pool
  processes, and their consumers (one per worker and queue on Redis), as the workers answered
  when last asked (every INSPECT_SECONDS; every UNANSWERED_SECONDS while a worker that sends
  heartbeats has not answered yet, as a new one: it is counted within seconds); a worker
  that said goodbye or went quiet counts no more, and a queue nobody consumes counts 0.
- ``celery_task_sent_total{name,hostname,queue_name}``: every send, ``hostname`` the
  producer's host. Producers that send task-sent events (ours: the command line, beat, tasks
  sending follow-ups) are counted when they send; a task first seen when a worker receives it
  (upstream's API sends no events) is counted then, its producer named by the message's
  origin, which our workers add to their task-received events (ibutsu_worker.process.receipt_origin;
  "unknown" when another worker received it).
- ``celery_task_queue_wait_time{name,hostname,queue_name}``: seconds from a send (or its
  ETA, when later: a countdown or a retry's backoff is no wait) to the task's start on the
  worker of ``hostname``, for sends with an event.

A standby exports none of these. A new leader counts from zero, which ``rate()`` and
``increase()`` take as a counter reset; worker series come back with the first heartbeats,
which the new leader asks for at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from celery.utils.time import adjust_timestamp, maybe_iso8601
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ibutsu_server import task_names
from ibutsu_server.metric_labels import UNKNOWN, hostname_label

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "celery"
HEARTBEAT_MISSES = 5  # beats (2 s each by default) without a heartbeat: the worker is down
FORGET_SECONDS = 3600.0
OFFLINE_FORGET_SECONDS = 120.0
INSPECT_SECONDS = 30.0
UNANSWERED_SECONDS = 5.0
INSPECT_TIMEOUT = 1.0
RECONNECT_SECONDS = 5.0
# Task ids remembered between a send and the task's start (for the wait, and to count a send
# once when its message is received again).
REMEMBERED_TASKS = 100_000
# celery-exporter's buckets for the wait.
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class _Worker:
    last_seen: float
    beat_seconds: float
    offline: bool = False

    def up(self, now: float) -> bool:
        """Said no goodbye, and its heartbeats still come."""
        return not self.offline and now - self.last_seen <= HEARTBEAT_MISSES * self.beat_seconds


@dataclass
class _Waits:
    """One histogram's counts: per bucket (not cumulative), in all, and their sum."""

    counts: list[int]
    total: int = 0
    seconds: float = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(WAIT_BUCKETS):
            if value <= bound:
                self.counts[index] += 1
                break
        self.total += 1
        self.seconds += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip(WAIT_BUCKETS, self.counts, strict=True):
            running += count
            cumulative.append((str(bound), float(running)))
        return [*cumulative, ("+Inf", float(self.total))]


@dataclass
class _Send:
    name: str
    queue: str
    # When the wait starts, on the producer's clock: the send, or its ETA if later. None when
    # known only from its receipt, or once started.
    sent_at: float | None
    retries: int = 0  # which send of the task: a retry is sent again, with one more
    received_first: bool = False  # counted at its receipt: its task-sent event, if any, is late
    # When and on which host it started, while its wait cannot be known yet.
    start: tuple[float, str] | None = None


@dataclass
class _Consumer:
    """A worker as it answered: the queues it consumes and its pool processes."""

    queues: list[str]
    processes: int


class ClusterState:
    """What the events said, summed up; fed by one thread, read by scrapes."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, queues: Iterable[str] = ()
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._sends: OrderedDict[str, _Send] = OrderedDict()
        self._sent: dict[tuple[str, str, str], int] = defaultdict(int)
        self._waits: dict[tuple[str, str, str], _Waits] = {}
        self._known_queues = set(queues)
        self._consumers: dict[str, _Consumer] | None = None  # None: not asked yet

    def record(self, event: dict[str, Any]) -> None:
        """Take one event (a dict as Celery's event receiver gives it)."""
        kind = str(event.get("type", ""))
        with self._lock:
            if kind.startswith("worker-"):
                self._worker_event(kind, event)
            elif kind == "task-sent":
                self._sent_event(event)
            elif kind == "task-received":
                self._received_event(event)
            elif kind == "task-started":
                self._started_event(event)

    def set_consumers(self, active_queues: dict[str, Any], stats: dict[str, Any]) -> None:
        """What the workers answered, by node name: the queues each consumes (Celery's
        ``inspect().active_queues()``) and its pool (``inspect().stats()``)."""
        consumers = {
            str(node): _Consumer(
                [str(queue.get("name")) for queue in queues or []],
                # Its pool's processes, as celery-exporter counts them.
                len(((stats.get(node) or {}).get("pool") or {}).get("processes") or []),
            )
            for node, queues in active_queues.items()
        }
        with self._lock:
            self._consumers = consumers
            for consumer in consumers.values():
                self._known_queues.update(consumer.queues)

    def unanswered(self) -> bool:
        """Whether a worker sends heartbeats but was not in the last answer (it has just
        started, or missed the question: a broadcast reaches only those listening)."""
        now = self._clock()
        with self._lock:
            known = self._consumers or {}
            return any(w.up(now) and node not in known for node, w in self._workers.items())

    def _worker_event(self, kind: str, event: dict[str, Any]) -> None:
        hostname = str(event.get("hostname") or UNKNOWN)
        beat = float(event.get("freq") or 2.0)
        worker = self._workers.setdefault(hostname, _Worker(self._clock(), beat))
        worker.last_seen, worker.beat_seconds = self._clock(), beat
        worker.offline = kind == "worker-offline"

    def _remember(self, task_id: str, send: _Send) -> None:
        self._sends[task_id] = send
        self._sends.move_to_end(task_id)
        while len(self._sends) > REMEMBERED_TASKS:
            self._sends.popitem(last=False)

    def _sent_event(self, event: dict[str, Any]) -> None:
        task_id, retries = str(event.get("uuid")), _retries(event)
        name = _task_name(event.get("name"))
        queue = str(event.get("queue") or event.get("routing_key") or DEFAULT_QUEUE)
        send = _Send(name, queue, _wait_starts(event), retries)
        known = self._sends.get(task_id)
        if known is not None and known.received_first and known.retries == retries:
            # A worker told of this send before its producer did (the events of two hosts
            # race): counted then; its wait is known now, even if it has started already.
            if known.start is not None:
                self._wait(send, *known.start)
        else:
            self._sent[(name, hostname_label(event.get("hostname")), queue)] += 1
        self._remember(task_id, send)

    def _received_event(self, event: dict[str, Any]) -> None:
        task_id = str(event.get("uuid"))
        if task_id in self._sends:
            return
        # Sent by a producer that sends no events (or whose event is still on its way):
        # counted now, once.
        name = _task_name(event.get("name"))
        self._sent[(name, hostname_label(event.get("origin")), DEFAULT_QUEUE)] += 1
        send = _Send(name, DEFAULT_QUEUE, None, _retries(event), received_first=True)
        self._remember(task_id, send)

    def _started_event(self, event: dict[str, Any]) -> None:
        send = self._sends.get(str(event.get("uuid")))
        started = _timestamp(event)
        if send is None or started is None:
            return
        host = hostname_label(event.get("hostname"))
        if send.sent_at is not None:
            self._wait(send, started, host)
        elif send.received_first and send.start is None:
            send.start = (started, host)  # for its task-sent event, if one comes

    def _wait(self, send: _Send, started: float, host: str) -> None:
        """Observe the wait of ``send``, which started at ``started`` on ``host``: once."""
        if send.sent_at is None:
            return
        # Clocks of two hosts: never a negative wait.
        wait = max(started - send.sent_at, 0.0)
        key = (send.name, host, send.queue)
        self._waits.setdefault(key, _Waits([0] * len(WAIT_BUCKETS))).observe(wait)
        send.sent_at = None  # a redelivery starts it again: one wait per send

    def collect(self, queue_lengths: dict[str, int]) -> Iterable[Any]:
        """The series, as of now."""
        now = self._clock()
        up = GaugeMetricFamily(
            "celery_worker_up", "1 while the worker's heartbeats come", labels=["hostname"]
        )
        sent = CounterMetricFamily(
            "celery_task_sent", "Tasks sent", labels=["name", "hostname", "queue_name"]
        )
        wait = HistogramMetricFamily(
            "celery_task_queue_wait_time",
            "Seconds from a task's send, or its ETA if later, to its start",
            labels=["name", "hostname", "queue_name"],
        )
        with self._lock:
            hosts: dict[str, int] = {}
            for node, worker in list(self._workers.items()):
                forget = OFFLINE_FORGET_SECONDS if worker.offline else FORGET_SECONDS
                if now - worker.last_seen > forget:
                    del self._workers[node]
                    continue
                host = hostname_label(node)
                hosts[host] = min(hosts.get(host, 1), int(worker.up(now)))
            for host, value in hosts.items():
                up.add_metric([host], value)
            for labels, count in self._sent.items():
                sent.add_metric(list(labels), count)
            for labels, waits in self._waits.items():
                wait.add_metric(list(labels), waits.buckets(), waits.seconds)
            consumers = self._consuming(now)
        yield up
        yield sent
        yield wait
        lengths = GaugeMetricFamily(
            "celery_queue_length", "Messages waiting in the queue", labels=["queue_name"]
        )
        for queue, length in queue_lengths.items():
            lengths.add_metric([queue], length)
        yield lengths
        if consumers is None:  # the workers were not asked yet: no answer is no zero
            return
        for metric, help_text, index in (
            ("celery_active_worker_count", "Workers consuming the queue", 0),
            ("celery_active_process_count", "Pool processes of the workers consuming it", 1),
            ("celery_active_consumer_count", "Consumers of the queue (one per worker)", 0),
        ):
            family = GaugeMetricFamily(metric, help_text, labels=["queue_name"])
            for queue, counts in consumers.items():
                family.add_metric([queue], counts[index])
            yield family

    def _consuming(self, now: float) -> dict[str, tuple[int, int]] | None:
        """Workers and pool processes consuming each queue known, 0 for none; a worker
        that said goodbye or went quiet since it answered counts no more."""
        if self._consumers is None:
            return None
        counts = {queue: (0, 0) for queue in self._known_queues}
        for node, consumer in self._consumers.items():
            worker = self._workers.get(node)
            if worker is not None and not worker.up(now):
                continue
            for queue in consumer.queues:
                workers, processes = counts[queue]
                counts[queue] = (workers + 1, processes + consumer.processes)
        return counts


def queue_lengths(app: Any) -> dict[str, int]:
    """Messages waiting in each of the app's queues, as the broker says now: the length of
    the queue's Redis list (its first priority's, as celery-exporter reads it), prefix included
    (Kombu's passive ``queue_declare`` looks for the key without it, and so finds every queue of
    a prefixed deployment missing)."""
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        raw, keys = channel.raw_client, channel.keys
        return {queue: int(raw.llen(keys.queue(queue))) for queue in app.amqp.queues}


def _task_name(value: Any) -> str:
    # Only known names become labels: every new label value is a new series for good.
    return value if isinstance(value, str) and value in task_names.ALL else UNKNOWN


def _retries(event: dict[str, Any]) -> int:
    value = event.get("retries")
    return value if isinstance(value, int) else 0


def _timestamp(event: dict[str, Any]) -> float | None:
    value = event.get("timestamp")
    return float(value) if isinstance(value, int | float) else None


def _wait_starts(sent: dict[str, Any]) -> float | None:
    """When a sent task starts waiting: at its send, or at its ETA if later (a countdown or a
    retry's backoff is deliberate, not a wait), as celery-exporter reckons it."""
    started = _timestamp(sent)
    try:
        eta = maybe_iso8601(sent.get("eta"))
    except (TypeError, ValueError):
        eta = None
    if started is None or eta is None:
        return started
    eta_timestamp = float(eta.timestamp())
    offset = sent.get("utcoffset")
    if isinstance(offset, int | float):
        # The receiver localised the event's timestamp by the producer's offset: the same.
        eta_timestamp = float(adjust_timestamp(eta_timestamp, offset))
    return max(started, eta_timestamp)


class ClusterMonitor(Collector):
    """Feeds a ClusterState from the broker's events in a thread of its own while started
    (this replica leads), and exports it; exports nothing while stopped."""

    def __init__(self, app: Any, queue_lengths: Callable[[], dict[str, int]]) -> None:
        self.app = app
        self.queue_lengths = queue_lengths
        self.state = self._fresh_state()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._receiver: Any = None
        self._last_inspect = float("-inf")

    def _fresh_state(self) -> ClusterState:
        # The app's own queues count 0 while nobody consumes them, as celery-exporter's
        # queues given at its start do.
        return ClusterState(queues=self.app.amqp.queues.keys())

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start watching, with a fresh state (this replica has just taken the lead)."""
        if self.running:
            return
        self.state = self._fresh_state()
        self._stop.clear()
        self._last_inspect = float("-inf")
        self._thread = threading.Thread(target=self._watch, name="ibutsu-cluster", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the lead is lost, or the process stops)."""
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def collect(self) -> Iterable[Any]:
        if not self.running:
            return []
        try:
            lengths = self.queue_lengths()
        except Exception as exc:  # unknown is no length at all, not an empty queue
            log.warning("cluster metrics: no queue length (%s)", type(exc).__name__)
            lengths = {}
        return list(self.state.collect(lengths))

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    receiver = self.app.events.Receiver(
                        connection, handlers={"*": self.state.record}
                    )
                    receiver.on_iteration = self._inspect_when_due
                    self._receiver = receiver
                    # wakeup: every worker sends a heartbeat at once, so worker_up is known
                    # within a second of taking the lead.
                    receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "cluster metrics: lost the broker's events (%s); again in %.0f s",
                    type(exc).__name__,
                    RECONNECT_SECONDS,
                )
                self._stop.wait(RECONNECT_SECONDS)

    def _inspect_when_due(self) -> None:
        since = time.monotonic() - self._last_inspect
        if since < INSPECT_SECONDS and not (
            since >= UNANSWERED_SECONDS and self.state.unanswered()
        ):
            return
        self._last_inspect = time.monotonic()
        try:
            inspect = self.app.control.inspect(timeout=INSPECT_TIMEOUT)
            active_queues = inspect.active_queues() or {}
            stats = inspect.stats() or {}
        except Exception as exc:  # the next round tries again
            log.warning("cluster metrics: workers did not answer (%s)", type(exc).__name__)
            return
        self.state.set_consumers(active_queues, stats)
