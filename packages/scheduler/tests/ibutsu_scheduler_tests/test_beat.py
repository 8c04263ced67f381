"""Real beat processes on the real Redis: slots, one sender among replicas, failover."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from ibutsu_testing.services import REDIS_URL, clean_environ, free_port, http_get, wait_for

APP = "ibutsu_scheduler_tests.beat_app:app"
CREDENTIALS = "prometheus:scrape-password-1"


@contextmanager
def beat(env: dict[str, str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A real `celery beat` for the test schedule, with its metrics endpoint on ``port``."""
    environ = clean_environ(
        **env, IBUTSU_METRICS_PORT=str(port), IBUTSU_METRICS_BASIC_AUTH=CREDENTIALS
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", APP, "beat", "--loglevel=INFO"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def _count(env: dict[str, str], which: str) -> int:
    """How many messages of the entry with argument ``which`` beat put on the default queue."""
    client = redis.Redis.from_url(REDIS_URL)
    sent = 0
    for raw in client.lrange(f"{env['IBUTSU_REDIS_KEY_PREFIX']}celery", 0, -1):
        args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        sent += args == [which]
    return sent


def _metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _leads(port: int) -> bool:
    status, text = http_get(port, "/metrics", CREDENTIALS)
    return status == 200 and _metric(text, "ibutsu_beat_leader") == 1.0


def test_entries_are_sent_at_their_slots_and_exported(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with beat(service_environ, tmp_path / "beat.log", port):
        wait_for(lambda: _leads(port), timeout=30)
        start_fast = _count(service_environ, "fast")
        time.sleep(8.5)
        fast, slow = _count(service_environ, "fast") - start_fast, _count(service_environ, "slow")
        status, text = http_get(port, "/metrics", CREDENTIALS)
        unauthenticated = http_get(port, "/metrics")[0]
        wrong = http_get(port, "/metrics", "prometheus:wrong-password")[0]
        health = http_get(port, "/healthz")[0]
    assert (unauthenticated, wrong, health) == (401, 401, 200)
    assert 3 <= fast <= 5  # every 2 s for 8.5 s
    assert slow >= 2
    assert status == 200
    assert _metric(text, "ibutsu_beat_sends_total", entry="tick-fast") == _count(
        service_environ, "fast"
    )
    next_send = _metric(text, "ibutsu_beat_next_send_timestamp_seconds", entry="tick-slow")
    assert next_send is not None and next_send > time.time() - 5
    weekly = _metric(text, "ibutsu_beat_next_send_timestamp_seconds", entry="weekly")
    assert weekly is not None and time.time() < weekly <= time.time() + 7 * 86400


def test_two_schedulers_send_each_slot_once_and_a_standby_takes_over(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    first_port, second_port = free_port(), free_port()
    with beat(service_environ, tmp_path / "first.log", first_port) as first:
        wait_for(lambda: _leads(first_port), timeout=30)
        with beat(service_environ, tmp_path / "second.log", second_port):
            wait_for(lambda: http_get(second_port, "/metrics", CREDENTIALS)[0] == 200, timeout=30)
            before = _count(service_environ, "fast")
            time.sleep(8.5)
            sent = _count(service_environ, "fast") - before
            assert 3 <= sent <= 5  # not twice as many: only the leader sends
            assert not _leads(second_port)

            os.killpg(first.pid, signal.SIGKILL)  # the leader dies without releasing
            killed = time.monotonic()
            baseline = _count(service_environ, "fast")
            wait_for(lambda: _count(service_environ, "fast") > baseline, timeout=40)
            takeover = time.monotonic() - killed
            assert _leads(second_port)
    assert takeover < 30


def test_a_restarted_scheduler_neither_repeats_nor_skips(
    service_environ: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with beat(service_environ, tmp_path / "one.log", port):
        wait_for(lambda: _count(service_environ, "slow") >= 1, timeout=30)
        stopped_after = _count(service_environ, "slow")
    restarted = time.monotonic()
    with beat(service_environ, tmp_path / "two.log", free_port()):
        wait_for(lambda: _count(service_environ, "slow") > stopped_after, timeout=30)
        first_send = time.monotonic() - restarted
    # The slot state lives in Redis: no immediate repeat of the slot sent before the restart.
    assert first_send > 0.5
