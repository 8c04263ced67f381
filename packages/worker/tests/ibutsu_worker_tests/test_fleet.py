"""Workers that are not ours on the same broker (upstream's, during a rolling update): how
they are seen, and how the periodic tasks both beats send run once per slot. Real worker
processes on a Redis of the test's own."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import redis

from ibutsu_server import task_names
from ibutsu_server.broker_keys import BrokerKeys
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.fleet import HELD_BY_OTHERS, RedisSightings
from ibutsu_testing.broker import foreign_held
from ibutsu_testing.private import private_redis
from ibutsu_testing.services import postgres_database, service_env, settings_for, wait_for
from ibutsu_worker.process.factory import create_worker_app
from ibutsu_worker.slots import HALF_HOUR, slot_key
from ibutsu_worker_tests import foreign_app
from ibutsu_worker_tests.fault_support import deployed_worker, foreign_worker


def _env(database: str, broker_url: str) -> dict[str, str]:
    # No key prefix: the foreign worker is plain Celery and knows none.
    env = service_env(database, "")
    env.pop("IBUTSU_REDIS_KEY_PREFIX")
    return {**env, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": broker_url}


def test_upstreams_workers_are_seen_by_their_answers_and_by_what_they_hold(
    tmp_path: Path,
) -> None:
    with private_redis() as broker, postgres_database() as database:
        env = _env(database, broker.url)
        app = create_worker_app(settings_for(env))
        sightings = RedisSightings(app)
        client = redis.Redis.from_url(broker.url, decode_responses=True)
        with deployed_worker(env, tmp_path / "ours.log", "ours"):
            assert sightings.look() == []  # ours answer, and are ours
            assert sightings.upstream_present() is False
        with foreign_worker(env, tmp_path / "foreign.log") as foreign:
            (name,) = sightings.look() or [""]
            assert name.startswith("foreign-")
            # Busy, it holds what it prefetched: a sign of it even when it cannot answer.
            slow = app.send_task(task_names.UPDATE_RUN, args=[f"slow-{uuid.uuid4()}"])
            wait_for(lambda: client.lrange(foreign_app.STARTED, 0, -1) == [slow.id])
            for _ in range(2):
                app.send_task(task_names.UPDATE_RUN, args=["x"])
            wait_for(lambda: _foreign_holds(client), timeout=30)
            assert sightings.look() == [name, HELD_BY_OTHERS]
            os.killpg(foreign.pid, signal.SIGKILL)  # dead, holding them: still a sign
            foreign.wait()
        with deployed_worker(env, tmp_path / "ours-again.log", "ours"):
            assert sightings.look() == [HELD_BY_OTHERS]
        assert sightings.upstream_present() is True
        client.close()
        app.database.engine.dispose()


def _foreign_holds(client: redis.Redis) -> bool:
    """Two messages taken and not acknowledged, none marked as ours."""
    return client.hlen(BrokerKeys().unacked) == 2 and foreign_held(client) == 2


def _clear_of_slot_boundaries() -> None:
    """Wait, if need be, until the next half-hour boundary (a new slot for every periodic
    task) is at least a minute away, so that sends a moment apart share their slots."""
    wait_for(lambda: 60 < HALF_HOUR - time.time() % HALF_HOUR < HALF_HOUR - 5, timeout=90)


def test_a_slot_both_beats_send_runs_once_and_keyword_calls_always_run(tmp_path: Path) -> None:
    """Upstream's beat and ours send the same prune and sync: the first of a slot runs, the
    second is skipped; the admin page's call (keywords) runs whatever the slot."""
    with private_redis() as broker, postgres_database() as database:
        env = _env(database, broker.url)
        app = create_worker_app(settings_for(env))
        upgrade(app.database.engine)
        log = tmp_path / "ours.log"
        with deployed_worker(env, log, "ours"):
            _clear_of_slot_boundaries()
            sends = [
                app.send_task(task_names.PRUNE_OLD_IMPORT_FILES, args=[7]),  # one beat
                app.send_task(task_names.PRUNE_OLD_IMPORT_FILES, args=[7]),  # the other
                app.send_task(task_names.PRUNE_OLD_IMPORT_FILES, kwargs={"days": 7}),  # admin
                app.send_task(task_names.PRUNE_OLD_IMPORT_FILES, args=[30]),  # another slot
                app.send_task(task_names.SYNC_ABORTED_RUNS),
                app.send_task(task_names.SYNC_ABORTED_RUNS),
            ]
            results = [send.get(timeout=60) for send in sends]
        app.database.engine.dispose()
    skipped = ["skipped" in result for result in results[:4]]
    assert skipped[0] != skipped[1] and skipped[2:] == [False, False]
    assert results[4:] == [{"enqueued": 0}, {"enqueued": 0}]
    text = log.read_text()
    assert text.count("already ran, both beats sent it; skipped") == 2  # a prune and a sync
    assert slot_key(task_names.SYNC_ABORTED_RUNS, [], 0) != slot_key(
        task_names.SYNC_ABORTED_RUNS, [], HALF_HOUR
    )
