"""Faults, with real processes: workers killed, brokers and databases restarted, warm
shutdowns, secrets in every URL. Each test starts what it breaks on its own (a private Redis
with append-only persistence, a private PostgreSQL cluster), never the machine's services,
finishes in under two minutes, and prints its figures (``pytest -s`` shows them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ibutsu_server import task_names
from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.private import private_postgres, private_redis
from ibutsu_testing.services import (
    celery_process,
    clean_environ,
    free_port,
    running_worker,
    settings_for,
    wait_for,
)
from ibutsu_worker.submission import Submitter
from ibutsu_worker_tests.fault_support import (
    APP,
    copying,
    counts,
    deployed_worker,
    figure,
    finish,
    report,
)


def children(pid: int) -> list[int]:
    return [
        int(child)
        for path in Path(f"/proc/{pid}/task").glob("*/children")
        for child in path.read_text().split()
    ]


@pytest.fixture
def submitter(service_environ: dict[str, str]) -> Iterator[Submitter]:
    submitter = Submitter(settings_for(service_environ))
    upgrade(submitter.db.engine)
    yield submitter
    submitter.close()


# --- a worker killed ------------------------------------------------------------------------


def test_a_pool_child_killed_mid_import(
    service_environ: dict[str, str], submitter: Submitter, tmp_path: Path
) -> None:
    big = report(tmp_path / "big.xml", 100_000)
    with running_worker(APP, service_environ, tmp_path / "worker.log") as worker:
        import_id = submitter.submit(big)
        wait_for(lambda: copying(submitter), timeout=60, interval=0.02)
        (child,) = children(worker.pid)
        os.kill(child, signal.SIGKILL)  # the OOM killer takes the child
        killed = time.monotonic()
        (outcome,) = submitter.wait([import_id], timeout=100)
        recovered = time.monotonic() - killed
        assert worker.poll() is None
    assert outcome.status == "done", outcome.message
    assert counts(submitter) == (1, 100_000)  # exactly once
    figure("pool child SIGKILL mid-import, kill to done", f"{recovered:.1f} s")


def test_a_worker_killed_mid_import_is_handed_on_by_a_live_one(
    service_environ: dict[str, str], submitter: Submitter, tmp_path: Path
) -> None:
    """Default settings: the dead worker's message is renewed no more, and a live worker
    hands it on after the visibility timeout (90 s) and one scan (10 s); the delay is a figure,
    the deadline only bounds the wait."""
    big = report(tmp_path / "big.xml", 100_000)
    with running_worker(APP, service_environ, tmp_path / "doomed.log") as doomed:
        import_id = submitter.submit(big)
        wait_for(lambda: copying(submitter), timeout=60, interval=0.02)
        with running_worker(APP, service_environ, tmp_path / "survivor.log"):
            os.killpg(doomed.pid, signal.SIGKILL)  # the pod dies: main process and children
            doomed.wait()
            killed = time.monotonic()
            assert submitter.outcome(import_id).status == "running"
            (outcome,) = submitter.wait([import_id], timeout=300)
            delay = time.monotonic() - killed
    assert outcome.status == "done", outcome.message
    assert counts(submitter) == (1, 100_000)
    figure("worker main SIGKILL mid-import, kill to done (defaults)", f"{delay:.1f} s")


def test_sigterm_mid_import_hands_it_back_within_the_grace_period(
    service_environ: dict[str, str], submitter: Submitter, tmp_path: Path
) -> None:
    big = report(tmp_path / "big.xml", 300_000)  # longer than the soft shutdown below
    quick = {**service_environ, "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT": "2"}
    with running_worker(APP, quick, tmp_path / "stopping.log") as stopping:
        import_id = submitter.submit(big)
        wait_for(lambda: copying(submitter), timeout=60, interval=0.02)
        with running_worker(APP, service_environ, tmp_path / "other.log"):
            stopping.send_signal(signal.SIGTERM)  # Kubernetes stops the pod
            asked = time.monotonic()
            stopping.wait(timeout=30)  # the grace period bounds the stop
            stopped = time.monotonic() - asked
            (outcome,) = submitter.wait([import_id], timeout=100)
            handed_on = time.monotonic() - asked
    assert outcome.status == "done", outcome.message
    assert counts(submitter) == (1, 300_000)  # nothing half-written, nothing doubled
    figure("SIGTERM mid-import: worker stopped after", f"{stopped:.1f} s")
    figure("SIGTERM mid-import: done by the other worker after", f"{handed_on:.1f} s")


# --- the broker restarted -------------------------------------------------------------------


def test_a_broker_restart_during_a_burst_loses_and_doubles_nothing(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    small = report(tmp_path / "small.xml", 5)
    imports = 1000
    with private_redis() as broker:
        env = {
            **service_environ,
            "CELERY_BROKER_URL": broker.url,
            "CELERY_RESULT_BACKEND": broker.url,
            "CELERY_WORKER_CONCURRENCY": "2",
        }
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        started = time.monotonic()
        log = tmp_path / "worker.log"
        with deployed_worker(env, log) as worker:
            import_ids = []
            for batch in range(10):
                import_ids += [submitter.submit(small) for _ in range(imports // 10)]
                if batch == 4:
                    broker.restart()  # mid-burst, with the worker busy
            outcomes, requeued = finish(submitter, import_ids)
            assert worker.poll() is None  # the worker survived the restart
        elapsed = time.monotonic() - started
        assert [o.status for o in outcomes] == ["done"] * imports
        assert counts(submitter) == (imports, imports * 5)  # none lost, none doubled
        text_log = log.read_text(errors="replace")
        assert "Connection to broker lost" in text_log  # the restart was seen, and said so
        assert "Traceback" not in text_log
        submitter.close()
    figure("Redis restarted during 1,000 imports", f"all done, exact rows, {elapsed:.1f} s")
    figure("  imports whose message the restart lost, queued again", str(requeued))


# --- the database stopped -------------------------------------------------------------------


def test_a_database_outage_strands_nothing(service_environ: dict[str, str], tmp_path: Path) -> None:
    """PostgreSQL stopped for 20 s while imports and update_run run: everything completes
    after, with backoff; the worker never exits; one log line per retry, no traceback."""
    medium = report(tmp_path / "medium.xml", 20_000)
    with private_postgres() as database:
        env = {**service_environ, **database.env, "CELERY_WORKER_CONCURRENCY": "2"}
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        log = tmp_path / "worker.log"
        with running_worker(APP, env, log) as worker:
            import_ids = [submitter.submit(medium) for _ in range(6)]
            wait_for(lambda: copying(submitter), timeout=60, interval=0.02)
            for _ in range(20):
                submitter.celery.send_task(task_names.UPDATE_RUN, args=[str(uuid.uuid4())])
            submitter.db.engine.dispose()
            database.stop()
            stopped = time.monotonic()
            wait_for(lambda: "retry 1 in" in log.read_text(errors="replace"), timeout=60)
            time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))  # the outage itself
            database.start()
            outcomes = submitter.wait(import_ids, timeout=100)
            assert worker.poll() is None
        assert [o.status for o in outcomes] == ["done"] * 6
        assert counts(submitter) == (6, 6 * 20_000)
        submitter.close()
    text_log = log.read_text(errors="replace")
    retries = [line for line in text_log.splitlines() if "; retry " in line]
    assert retries and "Traceback" not in text_log
    figure("PostgreSQL stopped 20 s under 6 imports and 20 update_run", "all done, exact rows")
    figure("retry log lines (one line each, no traceback)", str(len(retries)))


# --- secrets --------------------------------------------------------------------------------

SECRETS = ("broker-pw-31415", "backend-pw-27182", "database-pw-16180", "flower-pw-14142")
REFUSED = "Connection refused"


def test_no_log_line_of_any_role_holds_a_password(tmp_path: Path) -> None:
    """Every URL with a password in it, every role made to fail its connections."""
    closed = free_port()  # nothing listens there
    env = {
        "CELERY_BROKER_URL": f"redis://:{SECRETS[0]}@127.0.0.1:{closed}/0",
        "CELERY_RESULT_BACKEND": f"redis://:{SECRETS[1]}@127.0.0.1:{closed}/1",
        "POSTGRESQL_HOST": "127.0.0.1",
        "POSTGRESQL_PORT": str(closed),
        "POSTGRESQL_USER": "ibutsu",
        "POSTGRESQL_PASSWORD": SECRETS[2],
        "POSTGRESQL_DATABASE": "ibutsu",
        "FLOWER_BASIC_AUTH": f"admin:{SECRETS[3]}",
        "IBUTSU_METRICS_PORT": str(free_port()),
        "IBUTSU_METRICS_BASIC_AUTH": "prometheus:metrics-pw-11235",
    }
    roles = {
        "worker": ("ibutsu_server:worker_app", ["worker", "--loglevel=DEBUG"]),
        "beat": ("ibutsu_server:scheduler_app", ["beat", "--loglevel=DEBUG"]),
        "flower": ("ibutsu_server:flower_app", ["flower", f"--port={free_port()}"]),
    }
    logs = []
    for name, (app, command) in roles.items():
        log = tmp_path / f"{name}.log"
        # Each role loads, tries the broker and logs the refusal; beat then exits.
        refused = lambda log=log: REFUSED in log.read_text(errors="replace")  # noqa: E731
        with celery_process(app, command, env, log, ready=refused, exit_ok=True):
            pass
        text = log.read_text(errors="replace")
        assert REFUSED in text, f"{name} never tried its broker:\n{text[-3000:]}"
        logs.append(text)
    cli = subprocess.run(
        [sys.executable, "-m", "ibutsu_worker.cli", "db", "upgrade"],
        env=clean_environ(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 1
    logs.append(cli.stdout + cli.stderr)
    for log_text in logs:
        for secret in (*SECRETS, "metrics-pw-11235"):
            assert secret not in log_text
    figure("roles started with passwords in every URL", f"{len(logs)} logs, no password")
