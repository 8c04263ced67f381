"""The broker's key names and message envelopes, against Kombu's own channel and messages
Celery really sent, on a Redis of the test's own."""

from __future__ import annotations

import pytest
import redis

from ibutsu_server.broker_keys import BrokerKeys, Envelope
from ibutsu_server.celery_utils import create_broker_celery_app
from ibutsu_testing.private import private_redis
from ibutsu_testing.services import service_env, settings_for

PREFIX = "test-keys:"


def test_queue_names_are_kombus_with_the_prefix() -> None:
    with private_redis() as server:
        env = {**service_env("unused", PREFIX), "CELERY_BROKER_URL": server.url}
        app = create_broker_celery_app(settings_for(env))
        keys = BrokerKeys.of(app)
        assert keys.prefix == PREFIX
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            assert channel.keys == keys  # the transport names keys by the same rule
            for priority in range(12):
                kombus = PREFIX + channel._q_for_pri("celery", priority)
                assert keys.queue("celery", priority) == kombus
            assert keys.unacked == PREFIX + channel.unacked_key
            assert keys.unacked_index == PREFIX + channel.unacked_index_key
        assert keys.queue_lists("q") == [
            f"{PREFIX}q",
            f"{PREFIX}q\x06\x163",
            f"{PREFIX}q\x06\x166",
            f"{PREFIX}q\x06\x169",
        ]


def test_an_envelope_reads_a_sent_message_in_its_queue_and_once_held() -> None:
    with private_redis() as server:
        env = {**service_env("unused", PREFIX), "CELERY_BROKER_URL": server.url}
        app = create_broker_celery_app(settings_for(env))
        keys = BrokerKeys.of(app)
        sent = app.send_task("tests.anything", args=[1, "two"], kwargs={"three": 3})
        client = redis.Redis.from_url(server.url)
        (raw,) = client.lrange(keys.queue("celery"), 0, -1)
        queued = Envelope.decode(raw)
        assert queued is not None
        assert (queued.task, queued.id) == ("tests.anything", sent.id)
        assert (queued.args, queued.kwargs) == ([1, "two"], {"three": 3})
        with app.connection_for_write() as connection:
            assert connection.default_channel.claim(["celery"]) is not None
        (held,) = client.hvals(keys.unacked)  # [message, exchange, routing key]
        assert Envelope.decode(held) == queued
        client.close()


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b"{}", b'{"body": "!!!", "properties": {"body_encoding": "base64"}}'],
)
def test_what_is_no_message_decodes_to_none(raw: bytes) -> None:
    assert Envelope.decode(raw) is None
