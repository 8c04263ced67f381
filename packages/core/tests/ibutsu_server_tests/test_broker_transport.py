"""The Redis transport that keeps one client per channel, against the real Redis."""

from __future__ import annotations

import pytest

from ibutsu_server.broker_transport import TRANSPORT, Channel, transport_for
from ibutsu_server.celery_utils import create_broker_celery_app
from ibutsu_testing.services import service_env, settings_for


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@redis.svc:6379/0", TRANSPORT),
        ("rediss://redis.svc:6380/0", None),
        ("sentinel://s1:26379;sentinel://s2:26379", None),
        ("filesystem://", None),
    ],
)
def test_only_plain_redis_urls_get_it(url: str, expected: str | None) -> None:
    assert transport_for(url) == expected


def test_a_channel_keeps_its_client_until_its_pool_changes() -> None:
    app = create_broker_celery_app(settings_for(service_env("unused", "test-transport:")))
    with app.connection_for_write() as connection:
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
