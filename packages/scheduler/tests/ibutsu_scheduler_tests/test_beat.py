"""Real beat processes on the real Redis: slots, one sender among replicas, failover, restart.

Nothing here sleeps and then counts: each test waits for the event it needs (a send, a
leader, an exported value) with a deadline, and checks exact counts from the metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families
from redbeat.decoder import RedBeatJSONDecoder

from ibutsu_scheduler.factory import LEASE_SECONDS, MAX_LOOP_INTERVAL
from ibutsu_server.celery_utils import create_broker_celery_app
from ibutsu_server.fleet import SIGHTING_GRACE_SECONDS
from ibutsu_server.task_names import (
    OWN_QUEUE,
    RECOVER_IMPORTS,
    SHARED_QUEUE,
    SYNC_ABORTED_RUNS,
)
from ibutsu_testing.broker import keys_of, queued
from ibutsu_testing.services import (
    REDIS_URL,
    celery_process,
    free_port,
    http_get,
    settings_for,
    wait_for,
)

APP = "ibutsu_scheduler_tests.beat_app:app"
HELD_APP = "ibutsu_scheduler_tests.held_beat_app:app"
CREDENTIALS = "prometheus:scrape-password-1"
FAST_SECONDS = 2.0
SLOW_SECONDS = 3.0
# A standby takes the lease once the dead leader's runs out, at its next loop.
TAKEOVER_DEADLINE = LEASE_SECONDS + 2 * MAX_LOOP_INTERVAL + FAST_SECONDS


@contextmanager
def beat(
    env: dict[str, str], log: Path, port: int, app: str = APP
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `celery beat` for the test schedule, with its metrics endpoint on ``port``."""
    environ = {**env, "IBUTSU_METRICS_PORT": str(port), "IBUTSU_METRICS_BASIC_AUTH": CREDENTIALS}
    ready = lambda: http_get(port, "/healthz")[0] == 200  # noqa: E731
    with celery_process(app, ["beat", "--loglevel=INFO"], environ, log, ready=ready) as process:
        yield process


def _count(env: dict[str, str], which: str) -> int:
    """How many messages of the entry with argument ``which`` beat put on the default queue."""
    messages = queued(env["IBUTSU_REDIS_KEY_PREFIX"], "celery")
    return sum(message.args == [which] for message in messages)


def _metric(port: int, metric: str, **labels: str) -> float | None:
    status, text = http_get(port, "/metrics", CREDENTIALS)
    if status != 200:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _last_run(env: dict[str, str], entry: str) -> tuple[int, datetime] | None:
    """RedBeat's record of the entry's sends: how many so far, and when the last one was."""
    client = redis.Redis.from_url(REDIS_URL)
    meta = client.hget(f"{env['IBUTSU_REDIS_KEY_PREFIX']}redbeat:{entry}", "meta")
    client.close()
    state = {} if meta is None else json.loads(meta, cls=RedBeatJSONDecoder)
    if "total_run_count" not in state:
        return None  # not sent yet (the entry is known before its first send)
    return int(state["total_run_count"]), state["last_run_at"]


def _sent_since(
    env: dict[str, str], entry: str, since: tuple[int, datetime], more: int
) -> tuple[int, datetime] | None:
    """RedBeat's record of ``entry`` once it has sent ``more`` times after ``since``."""
    run = _last_run(env, entry)
    return run if run is not None and run[0] >= since[0] + more else None


def _leads(port: int) -> bool:
    return _metric(port, "ibutsu_beat_leader") == 1.0


def _counted_every_send(port: int, env: dict[str, str]) -> bool:
    """The scheduler on ``port`` counts exactly the tick-fast messages in the queue."""
    sent = _count(env, "fast")
    return _metric(port, "ibutsu_beat_sends_total", entry="tick-fast") == sent


def test_entries_are_sent_at_their_slots_and_exported(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with beat(service_environ, tmp_path / "beat.log", port):
        assert (http_get(port, "/metrics")[0], http_get(port, "/healthz")[0]) == (401, 200)
        assert http_get(port, "/metrics", "prometheus:wrong-password")[0] == 401
        wait_for(lambda: _leads(port), timeout=30)
        first = wait_for(lambda: _last_run(service_environ, "tick-fast"), timeout=30)
        later = wait_for(
            lambda: _sent_since(service_environ, "tick-fast", first, 2), timeout=30, interval=0.05
        )
        # Two more slots, as the scheduler recorded them: never sooner than the schedule allows
        # (the poll adds, never removes).
        assert (later[1] - first[1]).total_seconds() >= 2 * FAST_SECONDS - 0.5
        wait_for(lambda: _count(service_environ, "slow") >= 2, timeout=30)
        # Exactly what went out, per entry; the next send of every entry, due or not.
        wait_for(lambda: _counted_every_send(port, service_environ), timeout=10)
        next_slow = _metric(port, "ibutsu_beat_next_send_timestamp_seconds", entry="tick-slow")
        weekly = _metric(port, "ibutsu_beat_next_send_timestamp_seconds", entry="weekly")
    assert next_slow is not None and next_slow > time.time() - SLOW_SECONDS - MAX_LOOP_INTERVAL
    assert weekly is not None and time.time() < weekly <= time.time() + 7 * 86400


def test_two_schedulers_send_each_slot_once_and_a_standby_takes_over(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    first_port, second_port = free_port(), free_port()
    with beat(service_environ, tmp_path / "first.log", first_port) as first:
        wait_for(lambda: _leads(first_port), timeout=30)
        with beat(service_environ, tmp_path / "second.log", second_port):
            before = _count(service_environ, "fast")
            wait_for(lambda: _count(service_environ, "fast") >= before + 3, timeout=30)
            # Only the leader sends: the standby has sent nothing, the leader everything.
            assert _metric(second_port, "ibutsu_beat_leader") == 0.0
            assert not _metric(second_port, "ibutsu_beat_sends_total", entry="tick-fast")
            wait_for(lambda: _counted_every_send(first_port, service_environ), timeout=10)

            os.killpg(first.pid, signal.SIGKILL)  # the leader dies without releasing
            first.wait()
            killed = time.monotonic()
            queued = _count(service_environ, "fast")
            dead_leaders = _last_run(service_environ, "tick-fast")
            assert dead_leaders is not None
            sends = dead_leaders[0]

            def standby_sent(more: int) -> tuple[int, datetime] | None:
                return _sent_since(service_environ, "tick-fast", dead_leaders, more)

            # The standby's sends, caught as they happen (a slot is 2 s).
            first_send = wait_for(lambda: standby_sent(1), timeout=TAKEOVER_DEADLINE, interval=0.05)
            takeover = time.monotonic() - killed
            assert first_send[0] == sends + 1
            second_send = wait_for(lambda: standby_sent(2), timeout=10, interval=0.05)
            assert _leads(second_port)

            def one_message_per_send() -> bool:
                mine = _metric(second_port, "ibutsu_beat_sends_total", entry="tick-fast")
                return _count(service_environ, "fast") - queued == mine

            wait_for(one_message_per_send, timeout=10)
    # After the missed slots, one send, then the schedule again: no burst of catch-ups.
    assert second_send[0] == sends + 2
    assert (second_send[1] - first_send[1]).total_seconds() >= FAST_SECONDS - 0.5
    print(f"[fault] scheduler leader SIGKILL, kill to the standby's first send: {takeover:.1f} s")


def test_a_restarted_scheduler_does_not_repeat_a_slot(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with beat(service_environ, tmp_path / "one.log", port):
        wait_for(lambda: _count(service_environ, "slow") >= 1, timeout=30)
        last_sent = wait_for(
            lambda: _metric(port, "ibutsu_beat_last_send_timestamp_seconds", entry="tick-slow"),
            timeout=10,
        )
        stopped_after = _count(service_environ, "slow")
    second = free_port()
    with beat(service_environ, tmp_path / "two.log", second):
        wait_for(lambda: _count(service_environ, "slow") > stopped_after, timeout=30)
        resent = wait_for(
            lambda: _metric(second, "ibutsu_beat_last_send_timestamp_seconds", entry="tick-slow"),
            timeout=10,
        )
    # The slot state lives in Redis: the restarted scheduler sends the entry at its next slot,
    # a period after the last send before the restart, never again at once.
    assert resent >= last_sent + SLOW_SECONDS - 0.5


def test_the_leader_alone_exports_the_cluster(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    """Workers as the broker sees them (their events, sent here by hand): up while their
    heartbeats come, down when they stop or say goodbye; all of it from the leader only."""
    events_app = create_broker_celery_app(settings_for(service_environ))
    leader, standby = free_port(), free_port()

    def up(port: int, hostname: str) -> float | None:
        return _metric(port, "celery_worker_up", hostname=hostname)

    with beat(service_environ, tmp_path / "leader.log", leader):
        wait_for(lambda: _leads(leader), timeout=30)
        with (
            beat(service_environ, tmp_path / "standby.log", standby),
            events_app.connection_for_write() as connection,
        ):
            quiet = events_app.events.Dispatcher(connection, hostname="celery@quiet-host")
            polite = events_app.events.Dispatcher(connection, hostname="celery@polite-host")

            def heartbeats() -> bool:
                quiet.send("worker-heartbeat", freq=0.5)
                polite.send("worker-heartbeat", freq=0.5)
                return up(leader, "quiet-host") == 1 and up(leader, "polite-host") == 1

            wait_for(heartbeats, timeout=30)
            polite.send("worker-offline")
            wait_for(lambda: up(leader, "polite-host") == 0, timeout=10)
            # No more heartbeats from "quiet": five missed beats and it is down.
            wait_for(lambda: up(leader, "quiet-host") == 0, timeout=10)
            # No worker consumes the queue: it counts 0, as celery-exporter says, not nothing.
            gauges = ("celery_active_worker_count", "celery_active_process_count")
            wait_for(
                lambda: [_metric(leader, g, queue_name="celery") for g in gauges] == [0, 0],
                timeout=10,
            )
            # Beat's own sends are counted, and the queue they wait in measured.
            wait_for(lambda: _metric(leader, "celery_task_sent_total", name="unknown"), timeout=10)
            # As long as the queue's list is, in this deployment's key prefix.
            client = redis.Redis.from_url(REDIS_URL)
            queue = f"{service_environ['IBUTSU_REDIS_KEY_PREFIX']}celery"
            wait_for(
                lambda: _metric(leader, "celery_queue_length", queue_name="celery")
                == client.llen(queue)
                > 0,
                timeout=10,
            )
            client.close()
            status, text = http_get(standby, "/metrics", CREDENTIALS)
            assert status == 200 and "celery_worker_up" not in text
            assert "celery_queue_length" not in text and "celery_task_sent_total" not in text


def test_the_embedded_scheduler_starts_without_a_traceback(tmp_path: Path) -> None:
    """RedBeat's start-up handler runs for every beat: on the embedded default's scheduler
    it must find no lease to take rather than fail (once beat has ticked, it has run)."""
    port = free_port()
    log = tmp_path / "beat.log"
    with beat({"IBUTSU_EMBEDDED_DIR": str(tmp_path / "embedded")}, log, port):
        wait_for(
            lambda: _metric(port, "ibutsu_beat_next_send_timestamp_seconds", entry="tick-fast"),
            timeout=60,
        )
    text = log.read_text(errors="replace")
    assert "beat: Starting..." in text
    assert "Traceback" not in text


def _queued(env: dict[str, str], queue: str, task: str) -> int:
    """How many messages of ``task`` wait in ``queue``."""
    return sum(message.task == task for message in queued(env["IBUTSU_REDIS_KEY_PREFIX"], queue))


def test_slots_upstreams_beat_sends_are_left_to_it_while_upstreams_workers_are_about(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    """Upstream's worker runs what it takes without the slot check ours make: while one is
    about, our beat leaves the entries upstream's beat also sends to that beat (advanced,
    counted as held, not sent), and goes on sending its own; once none has been seen for
    the grace period, it sends them again."""
    client = redis.Redis.from_url(REDIS_URL)
    sightings = keys_of(service_environ["IBUTSU_REDIS_KEY_PREFIX"]).sightings
    client.zadd(sightings, {"ibutsu-worker@upstream-1": time.time()})
    port = free_port()
    with beat(service_environ, tmp_path / "beat.log", port, HELD_APP):
        wait_for(lambda: _queued(service_environ, OWN_QUEUE, RECOVER_IMPORTS) >= 3, timeout=60)
        held = wait_for(lambda: _metric(port, "ibutsu_beat_held_total", entry="sync-aborted-runs"))
        assert _queued(service_environ, SHARED_QUEUE, SYNC_ABORTED_RUNS) == 0
        assert held >= 1
        # Last seen longer ago than the grace period: absent.
        client.zadd(
            sightings, {"ibutsu-worker@upstream-1": time.time() - SIGHTING_GRACE_SECONDS - 1}
        )
        wait_for(lambda: _queued(service_environ, SHARED_QUEUE, SYNC_ABORTED_RUNS) >= 2, timeout=60)
        sent = _metric(port, "ibutsu_beat_sends_total", entry="sync-aborted-runs")
    client.close()
    assert sent is not None and sent >= 2
    assert "not sent: upstream's workers are about" in (tmp_path / "beat.log").read_text()
