"""Faults of a Redis that fails over, as production runs it: a Sentinel group whose primary
dies, a managed switch-over (the old primary turns replica under live connections), and TLS.
Every test starts its own redis-server processes, its own PostgreSQL cluster and, where the
deployment has one, its own endpoint (a TCP proxy); it prints its figures (``pytest -s``)
and finishes in under two minutes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.private import private_postgres
from ibutsu_testing.redis_topology import (
    REDIS_PASSWORD,
    Certificates,
    certificates,
    replicated_pair,
    sentinel_group,
    switch_over,
    tls_redis,
)
from ibutsu_testing.services import clean_environ, free_port, settings_for, wait_for
from ibutsu_testing.tcp_proxy import tcp_proxy
from ibutsu_worker.submission import Submitter
from ibutsu_worker_tests.beat_app import BEAT_PERIOD
from ibutsu_worker_tests.fault_support import (
    beat_slots,
    counts,
    deployed_beat,
    deployed_flower,
    deployed_worker,
    done,
    figure,
    finish,
    flower_lists,
    log_times,
    report,
    wait_for_beat_sends,
)

IMPORTS = 1000
CASES = 5
WORKERS = ("w1", "w2")


@contextmanager
def fleet(
    env: dict[str, str], folder: Path, flower_port: int | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two workers and a scheduler (and Flower on ``flower_port``) as deployed."""
    with ExitStack() as stack:
        processes = [
            stack.enter_context(deployed_worker(env, folder / f"{name}.log", name))
            for name in WORKERS
        ]
        processes.append(stack.enter_context(deployed_beat(env, folder / "beat.log")))
        if flower_port is not None:
            processes.append(
                stack.enter_context(deployed_flower(env, folder / "flower.log", flower_port))
            )
        yield processes


def submit_all(submitter: Submitter, small: Path, imports: int) -> list[str]:
    return [submitter.submit(small) for _ in range(imports)]


def first_done_after(submitter: Submitter, moment: float, before: int) -> float:
    """Seconds from ``moment`` until one more import than ``before`` was done."""
    wait_for(lambda: done(submitter) > before, timeout=60, interval=0.05)
    return time.time() - moment


def check_fleet(processes: list[subprocess.Popen[bytes]], folder: Path) -> None:
    """Nobody exited, nobody logged a traceback."""
    assert [p.poll() for p in processes] == [None] * len(processes)
    for log in folder.glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log.name


BEAT_SENDS_AFTER = 3


def beat_figures(folder: Path, fault: float) -> tuple[int, int, float]:
    """The scheduler's sends, slots sent twice and longest gap, once it has sent
    ``BEAT_SENDS_AFTER`` slots after the ``fault`` (epoch seconds): the schedule survived."""
    log = folder / "beat.log"
    wait_for_beat_sends(log, fault, BEAT_SENDS_AFTER)
    return beat_slots(log, BEAT_PERIOD)


def test_a_sentinel_primary_killed_during_1000_imports(tmp_path: Path) -> None:
    """SIGKILL of the primary: the sentinels promote the replica; workers, scheduler and Flower
    find it through them. Every import done exactly once, nobody exits, the beat keeps its
    slots, Flower lists the workers again."""
    small = report(tmp_path / "small.xml", CASES)
    flower_port = free_port()
    with private_postgres() as database, sentinel_group() as group:
        env = {**database.env, **group.env, "CELERY_WORKER_CONCURRENCY": "2"}
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        with fleet(env, tmp_path, flower_port) as processes:
            wait_for(lambda: flower_lists(flower_port, WORKERS), timeout=60, interval=1)
            started = time.monotonic()
            import_ids = submit_all(submitter, small, IMPORTS)
            wait_for(lambda: done(submitter) >= IMPORTS * 3 // 10, timeout=60, interval=0.05)
            old = group.primary()
            before = done(submitter)
            old.kill()  # the host is gone: no goodbye to anyone
            killed = time.time()
            wait_for(lambda: group.all_sentinels_agree_on(group.nodes[1].port), timeout=30)
            promoted = time.time()
            flowing = first_done_after(submitter, promoted, done(submitter))
            outcomes, requeued = finish(submitter, import_ids)
            elapsed = time.monotonic() - started
            wait_for(lambda: flower_lists(flower_port, WORKERS), timeout=30, interval=1)
            sends, twice, longest = beat_figures(tmp_path, promoted)
            check_fleet(processes, tmp_path)
        assert [o.status for o in outcomes] == ["done"] * IMPORTS
        assert counts(submitter) == (IMPORTS, IMPORTS * CASES)  # none lost, none doubled
        submitter.close()
    noticed = min(
        t
        for name in WORKERS
        for t in log_times(tmp_path / f"{name}.log", "Connection to broker lost")
        if t > killed
    )
    assert flowing < 30
    assert twice == 0
    assert longest < promoted - killed + 3 * BEAT_PERIOD  # the outage's slot, sent once after
    figure("Sentinel primary SIGKILL at import", f"{before} of {IMPORTS}")
    figure("  time to notice (first worker log line)", f"{noticed - killed:.1f} s")
    figure("  kill to promotion (Sentinel)", f"{promoted - killed:.1f} s")
    figure("  promotion to the next import done", f"{flowing:.1f} s")
    figure("  imports done exactly once, exact rows", f"{IMPORTS}, lost 0, doubled 0")
    figure("  of which queued again (their message was on the old primary only)", str(requeued))
    figure("  beat every 2 s: sends, sent twice, longest gap", f"{sends}, {twice}, {longest:.1f} s")
    figure("  Flower lists both workers after the failover", "yes")
    figure("  all 1,000 done after", f"{elapsed:.1f} s")


def test_a_managed_switch_over_with_live_connections(tmp_path: Path) -> None:
    """What managed Redis services do: writes paused, the replica promoted, the old primary
    made its replica and the endpoint moved, while every open connection stays on the old
    primary and gets READONLY. Workers and scheduler reconnect to the new primary through the
    endpoint; nothing is lost, doubled or stuck."""
    small = report(tmp_path / "small.xml", CASES)
    with (
        private_postgres() as database,
        replicated_pair() as (primary, replica),
        tcp_proxy(primary.port) as endpoint,
    ):
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{endpoint.port}"
        env = {
            **database.env,
            "CELERY_BROKER_URL": f"{url}/0",
            "CELERY_RESULT_BACKEND": f"{url}/1",
            "CELERY_WORKER_CONCURRENCY": "2",
        }
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        with fleet(env, tmp_path) as processes:
            started = time.monotonic()
            import_ids = submit_all(submitter, small, IMPORTS)
            wait_for(lambda: done(submitter) >= IMPORTS * 3 // 10, timeout=60, interval=0.05)
            before = done(submitter)
            switch_over(primary, replica)
            endpoint.retarget(replica.port)  # new connections only
            switched = time.time()
            flowing = first_done_after(submitter, switched, done(submitter))
            outcomes, requeued = finish(submitter, import_ids)
            elapsed = time.monotonic() - started
            sends, twice, longest = beat_figures(tmp_path, switched)
            check_fleet(processes, tmp_path)
        assert primary.role() == "slave" and replica.role() == "master"
        assert [o.status for o in outcomes] == ["done"] * IMPORTS
        assert requeued == 0  # writes were paused until the replica had them all
        assert counts(submitter) == (IMPORTS, IMPORTS * CASES)
        submitter.close()
    readonly = [
        t
        for log in tmp_path.glob("*.log")
        for t in log_times(log, "is a read-only replica now")
        if t >= switched - 1
    ]
    assert readonly, "no role met the demoted primary"
    assert flowing < 30
    assert twice == 0 and longest < 2 * BEAT_PERIOD + 1
    figure("switch-over (READONLY on live connections) at import", f"{before} of {IMPORTS}")
    figure("  time to notice (first READONLY seen)", f"{min(readonly) - switched:.1f} s")
    figure("  switch to the next import done", f"{flowing:.1f} s")
    figure("  imports done exactly once, exact rows", f"{IMPORTS}, lost 0, doubled 0")
    figure("  of which queued again (message lost)", str(requeued))
    figure("  beat every 2 s: sends, sent twice, longest gap", f"{sends}, {twice}, {longest:.1f} s")
    figure("  all 1,000 done after", f"{elapsed:.1f} s")


def tls_env(
    database_env: dict[str, str], port: int, certs: Certificates, ca: str
) -> dict[str, str]:
    url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}"
    return {
        **database_env,
        "CELERY_BROKER_URL": f"{url}/0",
        "CELERY_RESULT_BACKEND": f"{url}/1",
        "IBUTSU_REDIS_TLS_CA_FILE": str(certs.path(ca)),
        "IBUTSU_REDIS_TLS_CERT_FILE": str(certs.path("client.crt")),
        "IBUTSU_REDIS_TLS_KEY_FILE": str(certs.path("client.key")),
        "FLOWER_BASIC_AUTH": "admin:correct-horse-battery",
    }


def test_tls_with_a_client_certificate_and_a_wrong_ca(tmp_path: Path) -> None:
    """A ``rediss://`` broker and result backend whose certificate the roles verify, with a
    client certificate: imports flow. With the wrong CA every role stops at once with one
    clear line (exit status 2), not a retry loop."""
    small = report(tmp_path / "small.xml", CASES)
    with (
        certificates() as certs,
        tls_redis(certs, client_certificates=True) as server,
        private_postgres() as database,
    ):
        env = tls_env(database.env, server.port, certs, "ca.crt")
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        with fleet(env, tmp_path) as processes:
            outcomes, _ = finish(submitter, submit_all(submitter, small, 100))
            check_fleet(processes, tmp_path)
        assert [o.status for o in outcomes] == ["done"] * 100
        assert counts(submitter) == (100, 100 * CASES)
        submitter.close()
        wrong = tls_env(database.env, server.port, certs, "wrong-ca.crt")
        refusals = {}
        for role, app in (
            ("worker", "ibutsu_server:worker_app"),
            ("beat", "ibutsu_server:scheduler_app"),
            ("flower", "ibutsu_server:flower_app"),
        ):
            started = time.monotonic()
            ran = subprocess.run(
                [sys.executable, "-m", "celery", "-A", app, role],
                env=clean_environ(**wrong),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            refusals[role] = (ran.returncode, ran.stderr, time.monotonic() - started)
    for role, (status, stderr, seconds) in refusals.items():
        assert status == 2, f"{role}: {stderr}"
        assert "CELERY_RESULT_BACKEND: the server's TLS certificate does not verify" in stderr
        assert "Traceback" not in stderr and REDIS_PASSWORD not in stderr
        figure(f"TLS, wrong CA: {role} stopped (status 2) after", f"{seconds:.1f} s")
    figure("TLS (rediss://, client certificate): imports done exactly once", "100 of 100")
