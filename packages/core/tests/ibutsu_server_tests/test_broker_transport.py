"""The Redis transport that keeps one client per channel, against the real Redis."""

from __future__ import annotations

from ibutsu_server.broker_transport import Channel
from ibutsu_server.celery_utils import create_broker_celery_app
from ibutsu_testing.services import service_env, settings_for


def test_every_app_uses_it_and_a_channel_keeps_its_client_until_its_pool_changes() -> None:
    app = create_broker_celery_app(settings_for(service_env("unused", "test-transport:")))
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
