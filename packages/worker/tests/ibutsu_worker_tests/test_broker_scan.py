"""The broker scan that recovery judges by: it reads only a primary, never a replica whose view
may lag behind (a switch-over just made it one)."""

from __future__ import annotations

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.settings import Role
from ibutsu_testing.redis_topology import REDIS_PASSWORD, replicated_pair
from ibutsu_testing.services import clean_environ, settings_for
from ibutsu_worker.importing.broker_scan import held_import_ids


def _scan(port: int) -> set[str] | None:
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}"
    env = {
        **clean_environ(FLOWER_BASIC_AUTH="admin:scan-test-password"),
        "CELERY_BROKER_URL": f"{url}/0",
        "CELERY_RESULT_BACKEND": f"{url}/1",
    }
    app = create_celery(settings_for(env, Role.FLOWER))
    try:
        return held_import_ids(app)
    finally:
        app.close()


def test_a_primary_is_read_and_a_replica_is_not() -> None:
    with replicated_pair() as (primary, replica):
        assert _scan(primary.port) == set()  # read: nothing queued, nothing held
        assert _scan(replica.port) is None  # cannot tell: nothing is sent again on a guess
