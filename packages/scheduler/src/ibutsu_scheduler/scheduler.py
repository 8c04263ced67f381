"""Beat schedulers that export what they send and whether this replica leads.

RedBeat keeps the schedule's state in Redis (a restarted scheduler neither repeats nor skips
a slot) and lets only the holder of a short Redis lease send; standbys wait on the lease. A
leader that cannot renew its lease (the broker lost, failing over, or a primary demoted to
replica) stops sending and stands by, keeping the lease's token: once the broker answers again
(the new primary, which has the lease if it was replicated) it renews it and goes on, or takes
it again once it is free. RedBeat alone would exit.

Beside upstream's beat (a rolling update, a rollback) no slot's work is done twice: while
upstream's workers are about (``ibutsu_server.fleet``), the entries upstream's beat also sends
(``task_names.UPSTREAM_PERIODIC``) are not sent here, only advanced (logged, counted in
``ibutsu_beat_held_total``): upstream's beat sends that slot, and upstream's worker might run
it without the check ours make. Without upstream's workers, both beats' sends reach only our
workers, which run each slot once (``ibutsu_worker.slots``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.beat import PersistentScheduler
from prometheus_client import REGISTRY, Counter, Gauge, generate_latest
from redbeat import RedBeatScheduler
from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, get_redis
from redis.exceptions import LockError, RedisError

from ibutsu_scheduler.cluster_metrics import ClusterMonitor, queue_lengths
from ibutsu_server import task_names
from ibutsu_server.fleet import RedisSightings
from ibutsu_server.http_endpoints import Endpoints, serve
from ibutsu_server.ibutsu_task import one_line
from ibutsu_server.readiness import readiness_check
from ibutsu_server.settings import Settings

log = logging.getLogger(__name__)

# How often a scheduler whose broker is away tries it again.
BROKER_RETRY_SECONDS = 1.0

LEADER = Gauge("ibutsu_beat_leader", "1 when this scheduler replica holds the lease and sends")
SENDS = Counter("ibutsu_beat_sends", "Periodic tasks sent", ["entry"])
LAST_SEND = Gauge(
    "ibutsu_beat_last_send_timestamp_seconds", "When the entry was last sent", ["entry"]
)
NEXT_SEND = Gauge(
    "ibutsu_beat_next_send_timestamp_seconds", "When the entry is next due", ["entry"]
)
HELD = Counter(
    "ibutsu_beat_held",
    "Slots not sent because upstream's workers are about (upstream's beat sends them)",
    ["entry"],
)


class _Exported:
    """Counts sends, publishes next-send times and leadership, ticks the liveness watch, and
    starts the HTTP endpoint when the scheduler is created: before the lease is taken, so a
    standby answers too. While this replica leads, it exports the cluster's series
    (ibutsu_scheduler.cluster_metrics)."""

    app: Any
    schedule: dict[str, Any]
    #: Whether the leader watches the broker's events for the cluster's series (Redis only).
    watches_cluster = False
    cluster: ClusterMonitor | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: Settings = self.app.settings
        # Beat also builds a lazy instance just to print its banner: that one serves nothing.
        if settings.metrics is not None and not kwargs.get("lazy"):
            if self.watches_cluster:
                self.cluster = ClusterMonitor(self.app, lambda: queue_lengths(self.app))
                REGISTRY.register(self.cluster)
            endpoints = Endpoints(
                metrics=lambda: generate_latest(REGISTRY),
                alive=self.app.liveness.check,
                ready=readiness_check(self.app, self.app.engine),
            )
            self.app.endpoint = serve(settings.metrics, endpoints)
        LEADER.set(1 if self.leads() else 0)

    def leads(self) -> bool:
        """Whether this replica sends the periodic tasks."""
        return True

    def entries(self) -> list[Any]:
        """Every entry of the schedule, with its last run."""
        return list(self.schedule.values())

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        if entry.task in task_names.UPSTREAM_PERIODIC and self.upstream_about():
            if advance:
                self.reserve(entry)  # type: ignore[attr-defined]  # the slot passes unsent
            HELD.labels(entry.name).inc()
            log.info(
                "beat: %s not sent: upstream's workers are about, and upstream's beat sends "
                "this slot",
                entry.name,
            )
            return None
        result = super().apply_async(entry, producer, advance, **kwargs)  # type: ignore[misc]
        SENDS.labels(entry.name).inc()
        LAST_SEND.labels(entry.name).set(time.time())
        return result

    def upstream_about(self) -> bool:
        """Whether upstream's workers were seen lately (looked for now); when the broker
        cannot tell, they count as about: a slot left to upstream's beat is not doubled."""
        return RedisSightings(self.app).upstream_present() is not False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        delay = float(super().tick(*args, **kwargs))  # type: ignore[misc]
        self.app.liveness.tick()
        leads = self.leads()
        LEADER.set(1 if leads else 0)
        if self.cluster is not None:
            if leads:
                self.cluster.start()
            else:
                self.cluster.stop()
        now = time.time()
        for entry in self.entries():
            _due, seconds = entry.is_due()
            NEXT_SEND.labels(entry.name).set(now + seconds)
        return delay


class IbutsuRedBeatScheduler(_Exported, RedBeatScheduler):  # type: ignore[misc]
    """RedBeat with metrics: only the lease holder sends (and exports the cluster's series);
    a standby takes over when the leader's lease (redbeat_lock_timeout) runs out."""

    watches_cluster = True
    lock: Any = None
    _broker_away = False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self.lock is None and not self._take_lease():
                delay = self._stand_by()
            else:
                delay = super().tick(*args, **kwargs)
        except LockError as exc:  # the lease ran out (or was lost with a primary): take it again
            log.warning("beat: the lease is lost (%s); standing by until it is free", one_line(exc))
            self.lock = None
            return self._stand_by()
        except RedisError as exc:
            # The broker is away or failing over: keep the lease's token, so that the next
            # loop renews it on the new primary if it got there, and send nothing meanwhile.
            if not self._broker_away:
                log.warning("beat: the broker is away (%s); standing by", one_line(exc))
                self._broker_away = True
            return min(self._stand_by(), BROKER_RETRY_SECONDS)
        if self._broker_away:
            log.info("beat: the broker answers again")
            self._broker_away = False
        return delay

    def _take_lease(self) -> bool:
        """Take the lease if it is free (as RedBeat does at start-up, without waiting)."""
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            return False
        log.info("beat: took the lease")
        self.lock = lock
        return True

    def _stand_by(self) -> float:
        self.app.liveness.tick()  # waiting for the lease is this loop's work now
        LEADER.set(0)
        if self.cluster is not None:
            self.cluster.stop()
        return float(self.max_interval)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        try:
            super().close()
        except RedisError as exc:  # the lease runs out on its own
            log.warning("beat: the lease could not be released (%s)", one_line(exc))

    def leads(self) -> bool:
        return self.lock is not None and bool(self.lock.owned())

    def entries(self) -> list[Any]:
        # RedBeat's `schedule` holds only the entries due within the next loop; the rest
        # (and their last runs) are in Redis.
        names = self.app.conf.beat_schedule or {}
        return [
            self.Entry.from_key(self.Entry.generate_key(self.app, n), app=self.app) for n in names
        ]


class IbutsuLocalScheduler(_Exported, PersistentScheduler):  # type: ignore[misc]
    """The embedded default's scheduler: state in a file of the embedded folder, one replica."""

    # RedBeat connects a handler to every beat's start that reads the scheduler's lock_key
    # (a traceback in the log for any other scheduler); None tells it there is no lease here.
    lock_key = None
