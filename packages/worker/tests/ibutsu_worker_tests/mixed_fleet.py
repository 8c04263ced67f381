"""A rolling update and a rollback, tried for real: upstream 3.1.1's own API, worker and beat
(``ibutsu_worker_tests.upstream``) beside our worker and scheduler, on one Redis and one
PostgreSQL database of the test's own.

Too slow for ``./pants test ::`` (upstream's worker imports 80,000 results one commit at a
time), and it needs upstream's source: it runs as its own target,

    IBUTSU_UPSTREAM_SOURCE=/path/to/ibutsu-server ./pants run packages/worker/tests:mixed-fleet

1. Upstream's API, worker (its image's command: early acknowledgement, prefetch 4, Kombu's
   3,600 s visibility timeout) and the schema from its own migrations.
2. An 80,000-case report through the API; once upstream's worker is importing it, 20 small
   reports (busy, it prefetches four of them and holds them for minutes); then our worker and
   our scheduler start (recovery every 15 s, the sync of aborted runs every 30 s), and
   upstream's beat, its schedule due at once (the prunes and the sync).
3. Once every queue has drained: every import ``done`` (or ``error`` with a reason), one run
   each, every result once, no message discarded by either worker, nothing pending or
   running, each of upstream's periodic tasks run once.
4. The rollback: ours stopped, upstream's worker alone runs ``update_run`` on every run ours
   imported (summaries unchanged), ``query_task`` on them, and both schedules' prunes (a run
   of ours made 13 months old goes, with its results, artifacts and import; nothing else).

It prints its figures (``[mixed] ...`` lines).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, create_engine, text

from ibutsu_scheduler.schedule import beat_schedule
from ibutsu_server import task_names
from ibutsu_server.broker_keys import BrokerKeys
from ibutsu_server.settings import Retention
from ibutsu_testing.broker import foreign_held
from ibutsu_testing.private import PrivatePostgres, private_postgres, private_redis
from ibutsu_testing.services import DIE_WITH_PARENT, celery_process, free_port, wait_for
from ibutsu_worker.importing.recovery import PENDING_GRACE_SECONDS
from ibutsu_worker_tests import upstream
from ibutsu_worker_tests.fault_support import deployed_worker

# Upstream's worker imports 200 to 300 results a second here: this keeps it busy for
# minutes, holding what it prefetched past our visibility timeout (90 s) and our recovery's
# grace for pending imports (5 minutes).
BIG_CASES = 80_000
SMALL_REPORTS = 20
SMALL_CASES = 5
# What upstream's worker prefetches while busy: Celery's default, 4 per process.
PREFETCHED = 4
VISIBILITY_TIMEOUT = 90  # ours, by default
DRAIN_DEADLINE = 1800.0
ADMIN = ("admin@example.com", "mixed-fleet-password-1")
PROJECT = "mixed-fleet"
BEAT_APP = "ibutsu_worker_tests.mixed_beat_app:app"
# What either worker logs when it drops a message.
DISCARDED = re.compile(r"unregistered|discarded", re.IGNORECASE)
SUCCEEDED = re.compile(r"Task ([\w.]+)\[[0-9a-f-]+\] succeeded")
UPSTREAM_SCHEDULE = (
    (task_names.PRUNE_OLD_FILES, (3,)),
    (task_names.PRUNE_OLD_RESULTS, (5,)),
    (task_names.PRUNE_OLD_RUNS, (12,)),
    (task_names.PRUNE_OLD_IMPORT_FILES, (7,)),
)


def main() -> int:
    """``./pants run packages/worker/tests:mixed-fleet [-- pytest options]``."""
    return int(pytest.main([__file__, "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))


def figure(name: str, value: object) -> None:
    print(f"[mixed] {name}: {value}", flush=True)


# --- processes ---------------------------------------------------------------------------


@contextmanager
def process(
    command: list[str],
    env: Mapping[str, str],
    log: Path,
    ready: Callable[[], bool],
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A role of upstream's as a process group of its own; stopped (SIGTERM, as a pod is)
    afterwards."""
    with log.open("wb") as out:
        child = subprocess.Popen(
            [*DIE_WITH_PARENT, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )

    def started() -> bool:
        if child.poll() is not None:
            raise AssertionError(f"{command[0]} exited:\n{log.read_text(errors='replace')}")
        return ready()

    try:
        wait_for(started, timeout=120)
        yield child
    finally:
        stop(child)


def stop(child: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """SIGTERM, then SIGKILL to the whole group if it does not end in ``timeout``."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def logged(log: Path, needle: str) -> Callable[[], bool]:
    return lambda: needle in log.read_text(errors="replace")


# --- upstream's API ----------------------------------------------------------------------


class Api:
    """Upstream's API over HTTP, as a CI job and the frontend use it."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api"
        self.token = ""

    def call(self, method: str, path: str, body: bytes | None, content_type: str) -> Any:
        request = urllib.request.Request(f"{self.base}{path}", data=body, method=method)
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def json(self, method: str, path: str, body: dict[str, Any]) -> Any:
        return self.call(method, path, json.dumps(body).encode(), "application/json")

    def healthy(self) -> bool:
        try:
            return bool(self.call("GET", "/health", None, "application/json"))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def login(self, email: str, password: str) -> None:
        self.token = self.json("POST", "/login", {"email": email, "password": password})["token"]

    def upload(self, report: Path, project: str) -> str:
        """``POST /api/import`` as a CI job sends it; the import's id."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="project"\r\n\r\n{project}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="importFile"; '
            f'filename="{report.name}"\r\nContent-Type: application/xml\r\n\r\n'.encode(),
            report.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
        content_type = f"multipart/form-data; boundary={boundary}"
        return str(self.call("POST", "/import", b"".join(parts), content_type)["id"])


# --- reports -----------------------------------------------------------------------------


def junit(path: Path, suites: int, cases: int, prefix: str) -> Path:
    """A pytest-style report: ``suites`` suites of ``cases`` cases, a failure (with its
    traceback) and a skip in each suite; the suites state their time (fixtures included)."""
    with path.open("w") as out:
        out.write('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">\n')
        for suite in range(suites):
            out.write(
                f'<testsuite name="{prefix}{suite}" tests="{cases}" failures="1" skipped="1" '
                f'time="{cases * 0.004:.3f}" timestamp="2026-12-01T10:58:35" hostname="ci">\n'
            )
            for case in range(cases):
                name = f'classname="tests.test_{prefix}{suite}" name="test_{case}" time="0.002"'
                if case == 1:
                    out.write(f"<testcase {name}><failure message=\"boom\">assert 1 == 2"
                              "</failure></testcase>\n")  # fmt: skip
                elif case == 2:
                    out.write(f'<testcase {name}><skipped message="later"/></testcase>\n')
                else:
                    out.write(f"<testcase {name}/>\n")
            out.write("</testsuite>\n")
        out.write("</testsuites>\n")
    return path


# --- what the database and the broker say --------------------------------------------------


def imports(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every import: status, data."""
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, status, data FROM imports"))
        return {str(row.id): {"status": row.status, "data": row.data or {}} for row in rows}


def scalar(engine: Engine, query: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.scalar(text(query), params)


def drained(engine: Engine, client: redis.Redis) -> bool:
    """Every import finished, no message waiting in either queue or held by any worker."""
    unfinished = scalar(
        engine, "SELECT count(*) FROM imports WHERE status IN ('pending', 'running')"
    )
    waiting = sum(
        int(client.llen(BrokerKeys().queue(q)))
        for q in (task_names.SHARED_QUEUE, task_names.OWN_QUEUE)
    )
    return unfinished == 0 and waiting == 0 and not client.hlen(BrokerKeys().unacked)


def succeeded(*logs: Path) -> Counter[str]:
    """Tasks that succeeded, by name, in Celery worker logs."""
    found: Counter[str] = Counter()
    for log in logs:
        found.update(SUCCEEDED.findall(log.read_text(errors="replace")))
    return found


def discarded(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if DISCARDED.search(line)]


# --- the test ----------------------------------------------------------------------------


def test_a_mixed_fleet_then_a_rollback() -> None:
    # Every process's log stays for reading afterwards (pytest's own folders are recycled).
    logs = Path(tempfile.mkdtemp(prefix="ibutsu-mixed-fleet-"))
    figure("logs", logs)
    started = time.monotonic()
    try:
        installed = upstream.install()
    except upstream.UpstreamUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    figure(
        "upstream 3.1.1 installed (cached after the first run) in",
        f"{time.monotonic() - started:.0f} s",
    )
    with private_redis(durable=False) as broker, private_postgres() as database:
        _run(installed, broker.url, database, logs)


def _run(up: upstream.Upstream, broker_url: str, database: PrivatePostgres, logs: Path) -> None:
    env = {**database.env, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": broker_url}
    up_env = up.env(env)
    # Upstream's backend owns the schema: its own migrations make it.
    migrated = subprocess.run(
        up.command("alembic", "upgrade", "head"),
        cwd=up.backend, env=up_env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    engine = create_engine(
        f"postgresql+psycopg2://postgres@127.0.0.1:{database.port}/ibutsu", pool_pre_ping=True
    )
    client = redis.Redis.from_url(broker_url)
    api_port = free_port()
    api = Api(api_port)
    api_env = {
        **up_env,
        "JWT_SECRET": uuid.uuid4().hex,
        "IBUTSU_SUPERADMIN_EMAIL": ADMIN[0],
        "IBUTSU_SUPERADMIN_PASSWORD": ADMIN[1],
        "IBUTSU_SUPERADMIN_NAME": "admin",
    }
    gunicorn = up.command(
        "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-c", "config.py",
        f"--bind=127.0.0.1:{api_port}", "--no-control-socket", "ibutsu_server:connexion_app",
    )  # fmt: skip
    # Its worker image's command.
    up_worker_log, up_beat_log = logs / "upstream-worker.log", logs / "upstream-beat.log"
    up_worker = up.command(
        "celery", "--app", "ibutsu_server:worker_app", "worker", "--events", "--loglevel=info",
        "--concurrency", "1", "--hostname", "ibutsu-worker@%n",
    )  # fmt: skip
    ours_log, our_beat_log = logs / "ours-worker.log", logs / "ours-beat.log"
    with (
        process(gunicorn, api_env, logs / "upstream-api.log", api.healthy, up.backend),
        process(up_worker, up_env, up_worker_log, logged(up_worker_log, " ready."), up.backend),
    ):
        api.login(*ADMIN)
        api.json("POST", "/project", {"name": PROJECT, "title": "Mixed fleet"})
        big = api.upload(junit(logs / "big.xml", 10, BIG_CASES // 10, "big"), PROJECT)
        wait_for(lambda: imports(engine)[big]["status"] == "running", timeout=120)
        # Busy, upstream's worker prefetches four of the small ones and holds them for as long
        # as the big import lasts, far past our visibility timeout.
        small = [
            api.upload(junit(logs / f"small-{n}.xml", 1, SMALL_CASES, f"s{n}-"), PROJECT)
            for n in range(SMALL_REPORTS)
        ]
        wait_for(lambda: foreign_held(client) == PREFETCHED, timeout=60)
        uploaded = time.monotonic()
        figure(
            f"upstream's worker imports the {BIG_CASES:,}-case report, holding",
            f"{PREFETCHED} small imports; {SMALL_REPORTS - PREFETCHED} wait; ours start",
        )
        with (
            deployed_worker(env, ours_log, "ours"),
            celery_process(
                BEAT_APP, ["beat", "--loglevel=info"], env, our_beat_log,
                ready=logged(our_beat_log, "beat: Starting"),
            ),
        ):  # fmt: skip
            seed_upstream_beat(up, up_env, logs / "celerybeat-schedule")
            with process(
                up.command(
                    "celery", "--app", "ibutsu_server:scheduler_app", "beat", "--loglevel=info",
                    f"--pidfile={logs / 'celerybeat.pid'}",
                    f"--schedule={logs / 'celerybeat-schedule'}",
                ),
                up_env, up_beat_log, logged(up_beat_log, "beat: Starting"), up.backend,
            ):  # fmt: skip
                wait_for(
                    lambda: imports(engine)[big]["status"] != "running",
                    timeout=DRAIN_DEADLINE,
                    interval=1,
                )
                held_for = time.monotonic() - uploaded  # then it takes what it prefetched
                wait_for(lambda: drained(engine, client), timeout=DRAIN_DEADLINE, interval=1)
                drain_seconds = time.monotonic() - uploaded
            mixed_succeeded = succeeded(up_worker_log, ours_log)
            ours_text = ours_log.read_text(errors="replace")
            beat_text = our_beat_log.read_text(errors="replace")
        _check_mixed(engine, [big, *small], up_worker_log, ours_log)
        periodic = {name: mixed_succeeded[name] for name in sorted(task_names.UPSTREAM_PERIODIC)}
        assert set(periodic.values()) == {1}, periodic  # each of upstream's beat's slots, once
        upstream_sent = up_beat_log.read_text().count("Sending due task")
        held = beat_text.count("sync-aborted-runs not sent: upstream's workers are about")
        assert held >= 1 and held == beat_text.count("Sending due task sync-aborted-runs")
        sweeps = mixed_succeeded[task_names.RECOVER_IMPORTS]
        left = ours_text.count("left alone while upstream's workers are about")
        assert sweeps >= 1 and "queued again" not in ours_text
        by_fleet = _by_fleet(engine)
        figure("imports", f"{len(small) + 1}: {by_fleet['upstream']} by upstream's worker, "
               f"{by_fleet['ours']} by ours, all done")  # fmt: skip
        # The first bullet of the issue: ours never take what upstream's worker holds.
        assert held_for > VISIBILITY_TIMEOUT
        figure(
            f"upstream's worker held its {PREFETCHED} prefetched imports for",
            f"{held_for:.0f} s (our visibility timeout {VISIBILITY_TIMEOUT} s, recovery's "
            f"grace for pending imports {PENDING_GRACE_SECONDS} s): none taken by ours",
        )
        figure("queues drained, after the small uploads, in", f"{drain_seconds:.0f} s")
        figure("recover_imports sweeps (ours)", f"{sweeps}, requeued 0, left upstream's running "
               f"import alone {left} times")  # fmt: skip
        by_upstream = sum(succeeded(up_worker_log)[name] for name in periodic)
        figure(
            "upstream's beat sent",
            f"{upstream_sent} periodic tasks, each run once ({by_upstream} by upstream's "
            f"worker, {len(periodic) - by_upstream} by ours)",
        )
        figure("our beat held the sync upstream's beat also sends", f"{held} times, sent 0")
        _rollback(up, engine, broker_url, up_worker_log)
    engine.dispose()
    client.close()


def seed_upstream_beat(up: upstream.Upstream, env: dict[str, str], schedule: Path) -> None:
    """Upstream's beat state as if its last slots were a week ago: every entry of its schedule
    comes due the moment it starts."""
    code = (
        "from datetime import datetime, timedelta, timezone\n"
        "from celery.beat import PersistentScheduler\n"
        "from ibutsu_server import scheduler_app\n"
        f"s = PersistentScheduler(app=scheduler_app, schedule_filename={str(schedule)!r})\n"
        "for entry in s.schedule.values():\n"
        "    entry.last_run_at = datetime.now(timezone.utc) - timedelta(days=8)\n"
        "s.sync(); s.close()\n"
    )
    done = subprocess.run(
        [str(up.python), "-c", code], cwd=up.backend, env=env, capture_output=True, text=True,
        check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def _check_mixed(engine: Engine, import_ids: list[str], *worker_logs: Path) -> None:
    found = imports(engine)
    assert set(found) == set(import_ids)
    for import_id, record in found.items():
        status, data = record["status"], record["data"]
        assert status == "done" or (status == "error" and data.get("error")), (import_id, record)
        assert len(data.get("run_id") or []) == 1, (import_id, data.get("run_id"))
    run_ids = [record["data"]["run_id"][0] for record in found.values()]
    assert len(set(run_ids)) == len(run_ids)  # exactly one run per import, none shared
    assert scalar(engine, "SELECT count(*) FROM runs") == len(run_ids)
    results = scalar(engine, "SELECT count(*) FROM results")
    distinct = scalar(engine, "SELECT count(DISTINCT (run_id, test_id)) FROM results")
    expected = BIG_CASES + SMALL_REPORTS * SMALL_CASES
    assert (results, distinct) == (expected, expected)  # no result doubled or missing
    for log in worker_logs:
        assert discarded(log) == [], log.name
    figure("runs per import", "1 each; results "
           f"{results}/{expected}, doubled 0, missing {expected - results}")  # fmt: skip
    figure("messages discarded", "0 by upstream's worker, 0 by ours")


def _by_fleet(engine: Engine) -> Counter[str]:
    """Imports done by each fleet: ours record when they started, upstream's never do."""
    fleets: Counter[str] = Counter()
    for record in imports(engine).values():
        fleets["ours" if "started" in record["data"] else "upstream"] += 1
    return fleets


def _rollback(up: upstream.Upstream, engine: Engine, broker_url: str, up_log: Path) -> None:
    """Ours are gone; upstream's worker alone handles every row ours wrote."""
    del up
    client = Celery("rollback", broker=broker_url, backend=broker_url)
    ours = {
        record["data"]["run_id"][0]
        for record in imports(engine).values()
        if "started" in record["data"]
    }
    assert ours
    before = _summaries(engine, ours)
    for run_id in sorted(ours):
        assert client.send_task(task_names.UPDATE_RUN, args=[run_id]).get(timeout=120) is None
    after = _summaries(engine, ours)
    assert after == before  # upstream's update_run leaves every summary as ours computed it
    figure("rollback: upstream's update_run on our runs", f"{len(ours)}, summaries unchanged")
    answered = 0
    for run_id in sorted(ours):
        page = client.send_task(
            task_names.QUERY_TASK, args=[[f"run_id={run_id}"], 1, 100, False, "results"]
        ).get(timeout=120)
        assert page["pagination"]["totalItems"] == SMALL_CASES
        assert {row["run_id"] for row in page["results"]} == {run_id}
        answered += 1
    figure("rollback: upstream's query_task on our runs", f"{answered}/{len(ours)}")
    # Both schedules' prunes, by upstream's worker, on a run of ours made 13 months old.
    old_run = sorted(ours)[0]
    counts = _age(engine, old_run, days=400)
    schedules = {
        "upstream's": UPSTREAM_SCHEDULE,
        "our": tuple(
            (entry["task"], tuple(entry["args"]))
            for entry in beat_schedule(Retention()).values()
            if entry["task"] in task_names.UPSTREAM_PERIODIC and "args" in entry
        ),
    }
    for name, schedule in schedules.items():
        for task, args in schedule:
            client.send_task(task, args=list(args)).get(timeout=300)
        figure(f"rollback: {name} schedule's prunes, by upstream's worker", "done")
    assert scalar(engine, "SELECT count(*) FROM runs WHERE id = :id", id=old_run) == 0
    assert scalar(engine, "SELECT count(*) FROM results WHERE run_id = :id", id=old_run) == 0
    left = scalar(engine, "SELECT count(*) FROM results")
    assert left == BIG_CASES + (SMALL_REPORTS - 1) * SMALL_CASES
    assert scalar(engine, "SELECT count(*) FROM imports") == SMALL_REPORTS  # its import went
    figure("rollback: pruned a 13-month-old run of ours", f"{counts}; every other row kept")
    assert discarded(up_log) == []
    client.close()


def _summaries(engine: Engine, run_ids: set[str]) -> dict[str, Any]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, summary FROM runs WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": sorted(run_ids)},
        )
        return {str(row.id): row.summary for row in rows}


def _age(engine: Engine, run_id: str, days: int) -> dict[str, int]:
    """Make a run, its results and artifacts, and its import ``days`` old."""
    then = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)
    with engine.begin() as connection:
        params = {"id": run_id, "then": then}
        runs = connection.execute(
            text("UPDATE runs SET start_time = :then, created = :then WHERE id = :id"), params
        ).rowcount
        results = connection.execute(
            text("UPDATE results SET start_time = :then WHERE run_id = :id"), params
        ).rowcount
        artifacts = connection.execute(
            text(
                "UPDATE artifacts SET upload_date = :then WHERE result_id IN "
                "(SELECT id FROM results WHERE run_id = :id) OR run_id = :id"
            ),
            params,
        ).rowcount
        imports_ = connection.execute(
            text(
                "UPDATE imports SET created = :then "
                "WHERE data->'run_id' @> to_jsonb(CAST(:id AS text))"
            ),
            params,
        ).rowcount
    return {"runs": runs, "results": results, "artifacts": artifacts, "imports": imports_}


if __name__ == "__main__":
    sys.exit(main())
