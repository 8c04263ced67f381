"""The broker transport against real Redis servers: one client per channel, the atomic claim,
the restore rule for our messages and foreign ones, renewals, failed acknowledgements,
READONLY, and the start-up check."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from celery import states
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.utils import json as kombu_json

from ibutsu_server import broker_transport, redis_connections
from ibutsu_server.broker_keys import BrokerKeys, Envelope
from ibutsu_server.broker_transport import FOREIGN_VISIBILITY_TIMEOUT, Channel
from ibutsu_server.celery_utils import IbutsuCelery, create_broker_celery_app
from ibutsu_server.settings import Settings
from ibutsu_server.task_names import OWN_QUEUE, SHARED_QUEUE
from ibutsu_testing.private import private_redis
from ibutsu_testing.redis_topology import (
    REDIS_PASSWORD,
    SentinelGroup,
    replicated_pair,
    sentinel_group,
)
from ibutsu_testing.services import free_port, service_env, settings_for
from ibutsu_testing.tcp_proxy import tcp_proxy

PREFIX = "test-transport:"
KEYS = BrokerKeys(prefix=PREFIX)
VISIBILITY = 30


def app_for(url: str, **extra: str) -> IbutsuCelery:
    env = {
        **service_env("unused", PREFIX),
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY),
        **extra,
    }
    return create_broker_celery_app(settings_for(env))


@contextmanager
def broker() -> Iterator[tuple[IbutsuCelery, redis.Redis]]:
    """Our app on a Redis of this test's own, and a plain client that sees its keys."""
    with private_redis() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        yield app_for(server.url), client
        client.close()


def send(app: IbutsuCelery, n: int, queue: str = "celery") -> list[str]:
    return [str(app.send_task("tests.noop", args=[i], queue=queue).id) for i in range(n)]


def test_every_app_uses_it_and_a_channel_keeps_its_client_until_its_pool_changes() -> None:
    app = create_broker_celery_app(settings_for(service_env("unused", PREFIX)))
    with app.connection_for_write() as connection:
        assert connection.as_uri().startswith("redis://")  # what operators grep the logs for
        channel = connection.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        channel._disconnect_pools()  # type: ignore[no-untyped-call]  # as after a lost connection
        with channel.conn_or_acquire() as after:
            assert after is not first and after.connection_pool is channel.pool
            assert after.ping()


def test_a_message_is_taken_and_recorded_as_held_in_one_step_as_kombu_records_it() -> None:
    with broker() as (app, client):
        first, second = send(app, 2)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            before = time.time()
            queue, payload = channel.claim(["celery"])
            assert (queue, payload["headers"]["id"]) == ("celery", first)
            tag = payload["properties"]["delivery_tag"]
            # Kombu's own record of a held message: [payload, exchange, routing key].
            held, exchange, routing_key = json.loads(str(client.hget(KEYS.unacked, tag)))
            assert held == payload and (exchange, routing_key) == ("", "celery")
            for key in (KEYS.unacked_index, KEYS.leased):
                assert (client.zscore(key, tag) or 0) >= before
            # A consumer without acknowledgements takes without recording.
            _queue, unrecorded = channel.claim(["celery"], record=False)
            assert unrecorded["headers"]["id"] == second
            assert client.hlen(KEYS.unacked) == 1
            assert channel.claim(["celery"]) is None  # empty


def _age(client: redis.Redis, tag: str, seconds: float) -> None:
    client.zadd(KEYS.unacked_index, {tag: time.time() - seconds})


def test_the_scan_hands_back_ours_after_our_timeout_and_a_foreign_message_after_kombus() -> None:
    with broker() as (app, client):
        send(app, 3)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            ours = channel.claim(["celery"])[1]["properties"]["delivery_tag"]
            # Two messages a plain Kombu worker took: recorded, not marked as ours.
            foreign = []
            for _ in range(2):
                _queue, payload = channel.claim(["celery"])
                tag = payload["properties"]["delivery_tag"]
                client.zrem(KEYS.leased, tag)
                foreign.append(tag)
            _age(client, ours, VISIBILITY + 1)
            _age(client, foreign[0], VISIBILITY + 1)  # older than ours, younger than Kombu's
            _age(client, foreign[1], FOREIGN_VISIBILITY_TIMEOUT + 1)
            channel.qos.restore_visible(num=None, interval=1)
            assert set(client.hkeys(KEYS.unacked)) == {foreign[0]}
            back = [Envelope.decode(raw) for raw in client.lrange(KEYS.queue("celery"), 0, -1)]
            assert {m.properties["delivery_tag"] for m in back if m} == {ours, foreign[1]}
            assert all(m and m.headers["redelivered"] for m in back)
            assert not client.zcard(KEYS.leased)


def test_renewals_keep_ours_and_an_acknowledged_message_stays_gone() -> None:
    with broker() as (app, client):
        send(app, 2)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            kept, acked = (
                channel.claim(["celery"])[1]["properties"]["delivery_tag"] for _ in range(2)
            )
            channel.qos.ack(acked)
            _age(client, kept, VISIBILITY + 1)
            renewed = time.time()
            channel.renew([kept, acked])
            for key in (KEYS.unacked_index, KEYS.leased):
                assert (client.zscore(key, kept) or 0) >= renewed
                assert client.zscore(key, acked) is None
            channel.qos.restore_visible(num=None, interval=1)
            assert client.hkeys(KEYS.unacked) == [kept]


def test_an_acknowledgement_the_broker_never_got_frees_the_prefetch_slot() -> None:
    with private_redis() as server, tcp_proxy(server.port) as path:
        app = app_for(f"redis://127.0.0.1:{path.port}/0")
        client = redis.Redis.from_url(server.url, decode_responses=True)
        send(app, 1)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            channel.basic_qos(prefetch_count=1)
            message = channel.basic_get("celery")
            assert not channel.qos.can_consume()
            path.stop()  # the broker is gone: the acknowledgement fails
            with pytest.raises(redis.exceptions.ConnectionError):
                message.ack()
            assert channel.qos.can_consume()  # Kombu's would wait on it for ever
        assert client.hlen(KEYS.unacked) == 1  # still held, for the visibility timeout


def test_a_primary_turned_replica_is_a_lost_connection() -> None:
    with replicated_pair() as (_primary, replica):
        pool = redis.ConnectionPool(
            connection_class=redis_connections.Connection,
            port=replica.port,
            password=REDIS_PASSWORD,
            **{**redis_connections.connection_options(), "retry": None},
        )
        client = redis.Redis(connection_pool=pool)
        with pytest.raises(redis.exceptions.ConnectionError, match="read-only replica now"):
            client.set("key", "value")
        client.close()


def test_a_task_state_is_stored_once_redis_is_back_and_given_up_in_one_line_if_it_stays_away(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with private_redis() as server:
        backend = app_for(server.url).backend
        server.stop()
        pauses: list[float] = []

        def restart_at_first_pause(seconds: float) -> None:
            pauses.append(seconds)
            if len(pauses) == 1:
                server.start()  # the new primary, as a failover promotes one

        monkeypatch.setattr(broker_transport, "sleep", restart_at_first_pause)
        backend.store_result("stored-late", 7, states.SUCCESS)
        assert pauses == [broker_transport.RESULT_STORE_FIRST_PAUSE]
        assert backend.get_task_meta("stored-late")["result"] == 7

        server.stop()
        monkeypatch.setattr(broker_transport, "sleep", time.sleep)
        monkeypatch.setattr(broker_transport, "RESULT_STORE_PATIENCE_SECONDS", 0.5)
        with caplog.at_level(logging.WARNING, logger=broker_transport.__name__):
            backend.store_result("never-stored", None, states.SUCCESS)  # does not raise
        (line,) = (record.getMessage() for record in caplog.records)
        assert "task never-stored: its state (SUCCESS) is not stored" in line
        assert not any(record.exc_info for record in caplog.records)


def test_the_start_up_check_refuses_a_wrong_password_and_waits_for_a_missing_server() -> None:
    with replicated_pair() as (primary, _replica):
        wrong = f"redis://:not-the-password@127.0.0.1:{primary.port}/0"
        problems = redis_connections.startup_problems(app_for(wrong).settings)
    assert problems == [
        "CELERY_BROKER_URL, CELERY_RESULT_BACKEND: Redis refused the user name or password"
    ]
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    assert redis_connections.startup_problems(app_for(nobody).settings) == []


def test_the_start_up_check_asks_the_sentinels() -> None:
    with sentinel_group() as group:
        assert redis_connections.startup_problems(settings_for_group(group)) == []
        wrong = settings_for_group(group, IBUTSU_REDIS_SENTINEL_MASTER="elsewhere")
        (problem,) = redis_connections.startup_problems(wrong)
        assert "the sentinels watch no master named 'elsewhere'" in problem
        refused = settings_for_group(group, IBUTSU_REDIS_SENTINEL_PASSWORD="not-the-password")
        (problem,) = redis_connections.startup_problems(refused)
        assert "refused the password (IBUTSU_REDIS_SENTINEL_PASSWORD)" in problem
        assert "not-the-password" not in problem and REDIS_PASSWORD not in problem


def settings_for_group(group: SentinelGroup, **extra: str) -> Settings:
    env = {**service_env("unused", PREFIX), **group.env, **extra}
    env["CELERY_RESULT_BACKEND"] = env["CELERY_BROKER_URL"]
    return settings_for(env)


def test_the_configuration_a_worker_reports_is_plain_json() -> None:
    """What `celery inspect conf` and Flower ask every worker for, with a Sentinel URL (the
    most options): a value JSON cannot carry (a redis-py Retry, say) fails the reply."""
    env = {
        "CELERY_BROKER_URL": "sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0",
        "CELERY_RESULT_BACKEND": "sentinel://:pw@s1:26379/1;sentinel://:pw@s2:26379/1",
        "IBUTSU_REDIS_SENTINEL_MASTER": "ibutsu",
        "IBUTSU_REDIS_SENTINEL_PASSWORD": "sentinel-pw",
    }
    app = create_broker_celery_app(settings_for({**service_env("unused", PREFIX), **env}))
    kombu_json.dumps(app.conf.table(with_defaults=False, censored=True))  # type: ignore[no-untyped-call]


def test_the_blocking_peek_watches_the_shared_queue_whatever_the_rotation() -> None:
    """A peek watches one key and waits out its timeout on an empty one: the consumer peeks
    at the first queue it consumes (the shared one, busy), never at our own mostly empty one,
    which the claim after each peek takes from anyway."""
    with broker() as (app, _client), app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in (SHARED_QUEUE, OWN_QUEUE):
            channel.basic_consume(queue, False, lambda message: None, queue)
        peeked: list[str] = []

        class Recorder:  # the consumer's connection, as the event loop would write to it
            def send_command(self, *args: object) -> None:
                peeked.append(str(args[1]))

        channel.client.connection = Recorder()
        try:
            for queue in (SHARED_QUEUE, OWN_QUEUE, SHARED_QUEUE):
                channel._queue_cycle.rotate(queue)  # as after a claim from ``queue``
                channel._brpop_start()
        finally:
            channel.client.connection = None
            channel._in_poll = None
        assert peeked == [KEYS.queue(SHARED_QUEUE)] * 3


def _blocking_peeks(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_blmove", {}).get("calls", 0))


def test_a_backlog_in_our_queue_is_taken_without_a_blocking_peek_per_message() -> None:
    """The shared queue empty, ours holding a backlog: after the first peek waits, claims
    follow each other with non-blocking peeks until a claim finds nothing, so the backlog
    drains as fast as it is consumed, not one message per peek timeout."""
    backlog = 50
    with broker() as (app, client), app.connection_for_write() as connection:
        send(app, backlog, queue=OWN_QUEUE)
        taken: list[object] = []

        def take(_body: object, message: Message) -> None:
            taken.append(message.delivery_tag)
            message.ack()  # type: ignore[no-untyped-call]

        queues = [app.amqp.queues[SHARED_QUEUE], app.amqp.queues[OWN_QUEUE]]
        before = _blocking_peeks(client)
        with Consumer(connection, queues=queues, callbacks=[take], accept=["json"]):  # type: ignore[no-untyped-call]
            while len(taken) < backlog:
                connection.drain_events(timeout=10)
        assert len(set(taken)) == backlog
        assert client.llen(KEYS.queue(OWN_QUEUE)) == 0
        assert _blocking_peeks(client) - before <= 2  # the first, and at most one more
