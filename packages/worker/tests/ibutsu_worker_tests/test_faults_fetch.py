"""Taking messages off the queue: a connection cut right after the broker answered a fetch
loses nothing, and what a worker that is not ours holds (upstream's, during a rolling update)
stays its own. Each test starts its own redis-server (and, where it cuts, its own proxy),
prints its figures (``pytest -s``) and finishes in under two minutes."""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Consumer

from ibutsu_server import task_names
from ibutsu_server.broker_keys import BrokerKeys, Envelope
from ibutsu_server.broker_transport import CLAIM
from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.private import private_postgres, private_redis
from ibutsu_testing.services import settings_for, wait_for
from ibutsu_testing.tcp_proxy import TcpProxy, tcp_proxy
from ibutsu_worker.submission import Submitter
from ibutsu_worker_tests import foreign_app
from ibutsu_worker_tests.fault_support import (
    counts,
    deployed_worker,
    figure,
    finish,
    foreign_worker,
    log_times,
    report,
)

CLAIM_SHA = hashlib.sha1(CLAIM.encode()).hexdigest()
STOCK = "kombu.transport.redis:Transport"
# Short, so that what a cut leaves held comes back within the test (at least 10: six renewals).
VISIBILITY = "10"
# These deployments have no key prefix, as upstream's.
KEYS = BrokerKeys()


def stock_kombu_loses(url: str, proxied: str, proxy: TcpProxy, messages: int) -> tuple[int, int]:
    """Kombu's own Redis transport, consuming through ``proxy`` (at ``proxied``) while it cuts
    every fifth BRPOP reply: (cuts, messages lost: in no queue and no unacknowledged set)."""
    direct = redis.Redis.from_url(url)
    queue = Queue("stock", routing_key="stock")  # type: ignore[no-untyped-call]
    with Connection(url, transport=STOCK) as producer:  # type: ignore[no-untyped-call]
        simple = producer.SimpleQueue(queue)
        for n in range(messages):
            simple.put({"n": n})
        simple.close()
    proxy.cut_replies(("BRPOP",), every=5)
    received: set[int] = set()

    def handle(body: dict[str, int], message: Any) -> None:
        received.add(body["n"])
        message.ack()

    deadline = time.monotonic() + 30
    while direct.llen(KEYS.queue("stock")) and time.monotonic() < deadline:
        try:
            with (
                Connection(proxied, transport=STOCK) as connection,  # type: ignore[no-untyped-call]
                Consumer(connection, [queue], callbacks=[handle], accept=["json"]),  # type: ignore[no-untyped-call]
            ):
                while direct.llen(KEYS.queue("stock")):
                    connection.drain_events(timeout=1)
        except Exception:  # the cut: connect again, as a worker would
            continue
    held = int(direct.hlen(KEYS.unacked))
    left = int(direct.llen(KEYS.queue("stock")))
    direct.close()
    return sum(proxy.cuts.values()), messages - len(received) - left - held


def test_a_connection_cut_right_after_each_fetch_loses_no_message(tmp_path: Path) -> None:
    """A real worker whose broker link is cut right after a fetch reply, again and again: the
    peek took nothing, the claim recorded what it took, so every import is done exactly once
    (what a cut claim left held comes back after the visibility timeout). Kombu's own
    transport, cut the same way, loses a message at every cut."""
    imports = 200
    small = report(tmp_path / "small.xml", 5)
    with private_redis() as broker, private_postgres() as database, tcp_proxy(broker.port) as cut:
        env = {
            **database.env,
            "CELERY_BROKER_URL": broker.url,
            "CELERY_RESULT_BACKEND": broker.url,
            "CELERY_VISIBILITY_TIMEOUT": VISIBILITY,
        }
        submitter = Submitter(settings_for(env))  # sends directly: only the worker is cut
        upgrade(submitter.db.engine)
        claim = f"EVALSHA {CLAIM_SHA.upper()}"
        # The peek blocks (BLMOVE) on an idle queue and not (LMOVE) while a backlog drains.
        cut.cut_replies(("BLMOVE", "LMOVE", claim), every=12)
        proxied = f"redis://127.0.0.1:{cut.port}/0"
        log = tmp_path / "worker.log"
        with deployed_worker({**env, "CELERY_BROKER_URL": proxied}, log) as worker:
            started = time.monotonic()
            import_ids = [submitter.submit(small) for _ in range(imports)]
            outcomes, requeued = finish(submitter, import_ids)
            elapsed = time.monotonic() - started
            assert worker.poll() is None
        ours = cut.cuts
        assert [o.status for o in outcomes] == ["done"] * imports
        assert counts(submitter) == (imports, imports * 5)
        assert requeued == 0  # no message had to be sent again: none was lost
        submitter.close()
        stock_cuts, stock_lost = stock_kombu_loses(broker.url, proxied, cut, 100)
    reconnects = len(log_times(log, "Connection to broker lost"))
    peeks = ours["BLMOVE"] + ours["LMOVE"]
    assert peeks >= 5 and ours[claim] >= 5 and sum(ours.values()) >= 20
    assert stock_lost > 0  # the cut the test makes is the one that loses Kombu's messages
    figure(
        "fetch replies cut, real worker",
        f"{peeks} peeks, {ours[claim]} claims; {reconnects} reconnects",
    )
    figure("  imports done exactly once, exact rows", f"{imports} of {imports}, lost 0, doubled 0")
    figure("  all done after", f"{elapsed:.1f} s")
    figure("Kombu's own transport, BRPOP replies cut", f"{stock_cuts} cuts, {stock_lost} lost")


# --- a worker that is not ours on the same queue --------------------------------------------


def ran(log: Path, task_id: str) -> bool:
    """The worker that writes ``log`` ran the task ``task_id`` to its end."""
    return f"[{task_id}] succeeded" in log.read_text(errors="replace")


def unacked_tags(client: redis.Redis) -> set[str]:
    return {str(tag) for tag in client.hkeys(KEYS.unacked)}


def test_what_a_foreign_worker_holds_stays_its_own(tmp_path: Path) -> None:
    """Upstream's worker busy with a long task holds four prefetched messages: ours leave
    them alone past our visibility timeout, while they hand back an abandoned message of ours
    in that time. Once upstream's worker is dead and Kombu's 3,600 s have passed (the test
    ages the entries), ours run them, once. When all of ours are gone (a rollback), a plain
    Kombu worker hands back what ours held."""
    with private_redis() as broker, private_postgres() as database:
        env = {
            **database.env,
            "CELERY_BROKER_URL": broker.url,
            "CELERY_RESULT_BACKEND": broker.url,
            "CELERY_VISIBILITY_TIMEOUT": VISIBILITY,
        }
        submitter = Submitter(settings_for(env))
        upgrade(submitter.db.engine)
        app = submitter.celery  # our transport, in this process
        client = redis.Redis.from_url(broker.url, decode_responses=True)

        def send(run_id: str, queue: str = "celery") -> str:
            return str(app.send_task(task_names.UPDATE_RUN, args=[run_id], queue=queue).id)

        def started_by_foreign() -> list[str]:
            return [str(t) for t in client.lrange(foreign_app.STARTED, 0, -1)]

        foreign_log, ours_log = tmp_path / "foreign.log", tmp_path / "ours.log"
        with foreign_worker(env, foreign_log) as foreign:
            slow = send(f"slow-{uuid.uuid4()}")
            wait_for(lambda: slow in started_by_foreign(), timeout=30)
            prefetched = [send(str(uuid.uuid4())) for _ in range(4)]
            wait_for(lambda: len(unacked_tags(client)) == 4, timeout=30)
            assert not client.llen(KEYS.queue("celery"))
            held_since = time.time()
            with deployed_worker(env, ours_log, "ours") as ours:
                mine = [send(str(uuid.uuid4())) for _ in range(10)]
                wait_for(lambda: all(ran(ours_log, t) for t in mine), timeout=60)
                # A message of ours abandoned (taken, never renewed): handed back in time.
                abandoned = send(str(uuid.uuid4()), queue="control")
                with app.connection_for_write() as connection:
                    assert connection.default_channel.claim(["control"]) is not None
                wait_for(
                    lambda: client.llen(KEYS.queue("control")) == 1, timeout=3 * int(VISIBILITY)
                )
                (back,) = client.lrange(KEYS.queue("control"), 0, -1)
                assert getattr(Envelope.decode(back), "id", None) == abandoned
                restored_ours = time.time() - held_since
                # ... while the foreign ones, older still, stay where they are.
                wait_for(lambda: time.time() - held_since > 3 * int(VISIBILITY), timeout=60)
                assert len(unacked_tags(client)) == 4 and not client.llen(KEYS.queue("celery"))
                assert not any(ran(ours_log, t) for t in prefetched)
                assert started_by_foreign() == [slow]
                left_alone = time.time() - held_since
                os.killpg(foreign.pid, signal.SIGKILL)  # upstream's pod dies, holding them
                foreign.wait()
                # An hour later as far as the broker can tell.
                for tag in unacked_tags(client):
                    client.zadd(KEYS.unacked_index, {tag: time.time() - 3601})
                aged = time.monotonic()
                wait_for(lambda: all(ran(ours_log, t) for t in prefetched), timeout=40)
                took_over = time.monotonic() - aged
                text = ours_log.read_text(errors="replace")
                assert [text.count(f"[{t}] received") for t in prefetched] == [1] * 4
                os.killpg(ours.pid, signal.SIGKILL)  # and now ours die too: a rollback
                ours.wait()
        # What ours hold at the rollback: taken by our transport, then never renewed.
        rollback = [send(str(uuid.uuid4())) for _ in range(3)]
        with app.connection_for_write() as connection:
            for _ in rollback:
                assert connection.default_channel.claim(["celery"]) is not None
        assert client.zcard(KEYS.leased) >= 3
        for tag in unacked_tags(client):
            client.zadd(KEYS.unacked_index, {tag: time.time() - 3601})
        with foreign_worker(env, tmp_path / "foreign-after.log"):
            wait_for(lambda: set(rollback) <= set(started_by_foreign()), timeout=40)
        assert sorted(started_by_foreign()).count(rollback[0]) == 1
        submitter.close()
    figure(
        "foreign worker's 4 prefetched messages, ours left them alone for", f"{left_alone:.0f} s"
    )
    figure(
        "  meanwhile ours handed back an abandoned message of ours after", f"{restored_ours:.0f} s"
    )
    figure(
        "  foreign worker dead and 3,600 s passed: ours ran them, once, within",
        f"{took_over:.1f} s",
    )
    figure("rollback: a plain Kombu worker handed back and ran what ours held", "3 of 3")
