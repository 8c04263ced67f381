"""Paths that go silent: the connection to Redis, then to PostgreSQL, frozen for 60 s by a
proxy that stops forwarding without closing anything (no FIN, no RST), as a middlebox or a
partition does. The worker notices within the bound it sets, waits the silence out, and every
import ends done exactly once. Each test starts its own redis-server, PostgreSQL cluster and
proxy, prints its figures (``pytest -s``) and finishes in under two minutes."""

from __future__ import annotations

import time
from pathlib import Path

from ibutsu_server import redis_connections
from ibutsu_server.db import watchdog
from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.private import private_postgres, private_redis
from ibutsu_testing.services import settings_for, wait_for
from ibutsu_testing.tcp_proxy import tcp_proxy
from ibutsu_worker.submission import Submitter
from ibutsu_worker_tests.fault_support import (
    copying,
    counts,
    deployed_worker,
    done,
    figure,
    finish,
    log_times,
    report,
    statuses,
)

SILENCE = 60.0


def first_after(log: Path, moment: float, *patterns: str) -> float | None:
    """When the first line matching any of ``patterns`` was logged after ``moment``."""
    times = [t for pattern in patterns for t in log_times(log, pattern) if t >= moment]
    return min(times, default=None)


def test_a_silent_broker_is_noticed_and_waited_out(tmp_path: Path) -> None:
    """Imports in flight when the path to Redis goes silent for 60 s: the worker notices
    within its bound, reconnects when traffic flows, and nothing is lost or doubled."""
    small = report(tmp_path / "small.xml", 5)
    medium = report(tmp_path / "medium.xml", 5_000)
    with private_redis() as broker, private_postgres() as database, tcp_proxy(broker.port) as path:
        direct = {
            **database.env,
            "CELERY_BROKER_URL": broker.url,
            "CELERY_RESULT_BACKEND": broker.url,
        }
        silent = f"redis://127.0.0.1:{path.port}/0"
        worker_env = {**direct, "CELERY_BROKER_URL": silent, "CELERY_RESULT_BACKEND": silent}
        submitter = Submitter(settings_for(direct))  # the uploads themselves are not in the test
        upgrade(submitter.db.engine)
        log = tmp_path / "worker.log"
        with deployed_worker(worker_env, log) as worker:
            import_ids = [submitter.submit(medium if n % 20 == 0 else small) for n in range(300)]
            wait_for(lambda: done(submitter) >= 50, timeout=60, interval=0.05)
            path.freeze()
            frozen = time.time()
            noticed = wait_for(
                lambda: first_after(log, frozen, "WARNING", "ERROR"), timeout=SILENCE, interval=0.2
            )
            time.sleep(max(0.0, SILENCE - (time.time() - frozen)))  # the silence itself
            lost = first_after(log, frozen, "Connection to broker lost")
            path.resume()
            resumed = time.time()
            taken = wait_for(lambda: first_after(log, resumed, "] received"), timeout=60)
            outcomes, requeued = finish(submitter, import_ids)
            assert worker.poll() is None
        assert [o.status for o in outcomes] == ["done"] * len(import_ids)
        runs = len(import_ids)
        assert counts(submitter) == (runs, 15 * 5_000 + (runs - 15) * 5)  # none doubled
        assert requeued == 0  # none lost
        submitter.close()
    bound = redis_connections.SILENCE_NOTICED_WITHIN
    assert noticed - frozen <= bound
    assert lost is not None  # the consumer gave its connection up, and took a new one
    assert lost - frozen <= redis_connections.SILENCE_GIVEN_UP_WITHIN
    assert "Traceback" not in log.read_text(errors="replace")
    figure("Redis path silent 60 s (no FIN, no RST) under 300 imports", "all done, exact rows")
    figure(
        "  time to notice (first worker log line)", f"{noticed - frozen:.1f} s (bound {bound} s)"
    )
    given_up = redis_connections.SILENCE_GIVEN_UP_WITHIN
    figure("  consumer gave its connection up after", f"{lost - frozen:.1f} s (bound {given_up} s)")
    figure("  traffic flows again to the next message taken", f"{taken - resumed:.1f} s")
    figure("  lost, doubled", "0, 0")


def test_a_silent_database_is_noticed_and_the_work_retried(tmp_path: Path) -> None:
    """Imports streaming their results in when the path to PostgreSQL goes silent for 60 s:
    the watch drops the silent connections within its bound, the tasks are retried (not
    lost) and, once traffic flows, every import ends done exactly once; nothing stays
    running."""
    imports, cases = 4, 10_000
    medium = report(tmp_path / "medium.xml", cases)
    with (
        private_postgres() as database,
        tcp_proxy(database.port) as path,
        private_redis() as broker,
    ):
        direct = {
            **database.env,
            "CELERY_BROKER_URL": broker.url,
            "CELERY_RESULT_BACKEND": broker.url,
        }
        worker_env = {**direct, "POSTGRESQL_PORT": str(path.port)}
        submitter = Submitter(settings_for(direct))
        upgrade(submitter.db.engine)
        log = tmp_path / "worker.log"
        with deployed_worker(worker_env, log) as worker:
            import_ids = [submitter.submit(medium) for _ in range(imports)]
            wait_for(lambda: copying(submitter), timeout=60, interval=0.02)
            path.freeze()
            frozen = time.time()
            pattern = "database connection silent"
            noticed = wait_for(lambda: first_after(log, frozen, pattern), timeout=SILENCE)
            time.sleep(max(0.0, SILENCE - (time.time() - frozen)))  # the silence itself
            path.resume()
            resumed = time.time()
            outcomes, requeued = finish(submitter, import_ids, deadline=60)
            recovered = max(log_times(log, "done: run")) - resumed
            assert worker.poll() is None
        assert [o.status for o in outcomes] == ["done"] * imports
        assert counts(submitter) == (imports, imports * cases)
        assert statuses(submitter) == {"done": imports}  # nothing stays running
        assert requeued == 0
        submitter.close()
    text = log.read_text(errors="replace")
    retried = text.count("; retry ")
    assert retried and "Traceback" not in text
    bound = watchdog.SILENCE_NOTICED_WITHIN
    assert noticed - frozen <= bound
    figure("PostgreSQL path silent 60 s (no FIN, no RST) under 4 imports of 10,000 results", "")
    figure("  time to notice (connection dropped)", f"{noticed - frozen:.1f} s (bound {bound} s)")
    figure("  tasks retried (log lines), lost, doubled", f"{retried}, 0, 0")
    figure("  traffic flows again to the last import done", f"{recovered:.1f} s")
