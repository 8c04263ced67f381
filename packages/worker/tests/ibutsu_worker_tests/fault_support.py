"""What the fault tests share: reports to import, the deployed roles (worker, beat, Flower) as
processes, counts taken from the database, the recovery the scheduler would run, and the
figures each test prints (``pytest -s`` shows them)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy import func, select, text

from ibutsu_server.db.models import Import, Result, Run, utcnow
from ibutsu_testing.services import celery_process, http_get, wait_for
from ibutsu_worker.importing.broker_scan import held_import_ids
from ibutsu_worker.importing.recovery import PENDING_GRACE_SECONDS, recover
from ibutsu_worker.submission import Outcome, SubmissionError, Submitter

APP = "ibutsu_server:worker_app"
BEAT_APP = "ibutsu_worker_tests.beat_app:app"
FLOWER_APP = "ibutsu_server:flower_app"
FLOWER_CREDENTIALS = "admin:correct-horse-battery"
# A Celery log line's time: "[2026-12-04 17:24:26,123: WARNING/MainProcess] ...".
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


def report(path: Path, cases: int) -> Path:
    with path.open("w") as out:
        out.write('<testsuites><testsuite name="faults">\n')
        out.writelines(
            f'<testcase classname="pkg.Mod{n % 50}" name="test_{n}" time="0.01"/>\n'
            for n in range(cases)
        )
        out.write("</testsuite></testsuites>\n")
    return path


def figure(name: str, value: str) -> None:
    print(f"[fault] {name}: {value}", flush=True)


def counts(submitter: Submitter) -> tuple[int, int]:
    """(runs, results) in the database."""
    with submitter.db.engine.connect() as connection:
        runs = connection.scalar(select(func.count()).select_from(Run))
        results = connection.scalar(select(func.count()).select_from(Result))
    return int(runs or 0), int(results or 0)


def statuses(submitter: Submitter) -> dict[str, int]:
    """How many imports are in each status."""
    with submitter.db.engine.connect() as connection:
        rows = connection.execute(select(Import.status, func.count()).group_by(Import.status))
        return {str(status): int(count) for status, count in rows}


def done(submitter: Submitter) -> int:
    return statuses(submitter).get("done", 0)


def copying(submitter: Submitter) -> bool:
    """An import is streaming its results in (its COPY runs)."""
    with submitter.db.engine.connect() as connection:
        query = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY results%'"
        return bool(connection.scalar(text(query)))


@contextmanager
def deployed_worker(
    env: dict[str, str], log: Path, name: str = "w"
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker started with upstream's own command line (its worker image's), Gossip and
    Mingle included as they are in a deployment."""
    command = ["worker", "--events", "--loglevel=info", "--concurrency=2", f"--hostname={name}@%n"]
    ready = lambda: "ready." in log.read_text(errors="replace")  # noqa: E731
    with celery_process(APP, command, env, log, ready=ready) as process:
        yield process


@contextmanager
def foreign_worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Upstream's worker as it runs: one process, prefetch 4, early acknowledgement."""
    command = ["worker", "--loglevel=info", "--concurrency=1", "--without-gossip",
               "--without-mingle", f"--hostname=foreign-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
    ready = lambda: "ready." in log.read_text(errors="replace")  # noqa: E731
    with celery_process("ibutsu_worker_tests.foreign_app:app", command, env, log, ready=ready) as p:
        yield p


@contextmanager
def deployed_beat(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The scheduler as deployed, on a schedule of one entry every BEAT_PERIOD seconds."""
    ready = lambda: "beat: Starting" in log.read_text(errors="replace")  # noqa: E731
    with celery_process(BEAT_APP, ["beat", "--loglevel=info"], env, log, ready=ready) as process:
        yield process


@contextmanager
def deployed_flower(env: dict[str, str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    broker_only = {k: v for k, v in env.items() if not k.startswith("POSTGRESQL_")}
    with celery_process(
        FLOWER_APP,
        ["flower", f"--port={port}", "--address=127.0.0.1"],
        {**broker_only, "FLOWER_BASIC_AUTH": FLOWER_CREDENTIALS},
        log,
        ready=lambda: http_get(port, "/healthcheck")[0] == 200,
    ) as process:
        yield process


def flower_lists(port: int, names: tuple[str, ...]) -> bool:
    """Flower asked every worker now (an inspect through the broker) and all of ``names``
    answered."""
    status, body = http_get(port, "/api/workers?refresh=1", FLOWER_CREDENTIALS)
    return status == 200 and all(
        any(found.startswith(f"{name}@") for found in json.loads(body)) for name in names
    )


def log_times(log: Path, pattern: str) -> list[float]:
    """When each line of a Celery log matching ``pattern`` was written (epoch seconds)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        stamp = LOG_TIME.match(line)
        if stamp and pattern in line:
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            found.append(when.timestamp())
    return found


BEAT_SENDS = "Scheduler: Sending due task"


def wait_for_beat_sends(log: Path, since: float, count: int, timeout: float = 60) -> None:
    """Wait until the scheduler has logged ``count`` sends after ``since`` (epoch seconds):
    it kept its schedule across a fault."""
    wait_for(
        lambda: sum(t > since for t in log_times(log, BEAT_SENDS)) >= count,
        timeout=timeout,
        interval=0.2,
    )


def beat_slots(log: Path, period: float) -> tuple[int, int, float]:
    """(sends, slots sent twice, the longest gap between two sends) from the scheduler's
    log: a send closer than half a period to the one before repeats a slot. RedBeat sends
    a slot that fell in an outage once, late, then keeps to the schedule: the longest gap is
    about the outage plus a period."""
    times = log_times(log, BEAT_SENDS)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return len(times), sum(gap < period / 2 for gap in gaps), max(gaps, default=0.0)


class OursAlone:
    """The recovery's evidence in a fleet of ours alone: the broker's messages, no upstream
    worker."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def held_ids(self) -> set[str] | None:
        return held_import_ids(self.app)

    def upstream_present(self) -> bool:
        return False


def finish(
    submitter: Submitter, import_ids: list[str], deadline: float = 110
) -> tuple[list[Outcome], int]:
    """Wait for the imports, doing every 20 s what the scheduler's periodic check does (its
    grace passed: ``now`` moved on): queue again any import whose message the broker lost.
    Messages the worker held at the outage come back after the visibility timeout. The
    outcomes, and how many imports had to be queued again (their message was lost)."""
    until = time.monotonic() + deadline
    requeued = 0
    while True:
        try:
            outcomes = submitter.wait(import_ids, timeout=20)
            break
        except SubmissionError:
            if time.monotonic() > until:
                raise
        with submitter.db.transaction() as session:
            later = utcnow() + timedelta(seconds=PENDING_GRACE_SECONDS + 1)
            found = recover(
                session, submitter.settings.import_limits, OursAlone(submitter.celery), now=later
            )
        for item in found.requeue:
            submitter.celery.send_task(item.task, args=[item.record])
        requeued += len(found.requeue)
    return outcomes, requeued
