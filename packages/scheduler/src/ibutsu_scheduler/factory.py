"""The scheduler's Celery app: the beat schedule, RedBeat's lease and state in Redis.

Built by create_flask_celery_app, as the architecture has it; beat runs no task and opens no
session (its database is only asked whether it answers, for readiness), so the Flask app and
the ORM, made on first use, are never loaded, and the scheduler starts as fast as the other
roles.
"""

from __future__ import annotations

from typing import Any

from ibutsu_scheduler.schedule import beat_schedule
from ibutsu_server import redis_connections
from ibutsu_server.app_factory import FlaskCelery, create_flask_celery_app
from ibutsu_server.settings import Role, Settings

# A beat loop never sleeps longer than this, so the lease is renewed at least this often.
MAX_LOOP_INTERVAL = 5
# A leader that stops renewing loses the lease after this long; a standby then takes over
# within about LEASE_SECONDS + MAX_LOOP_INTERVAL (RedBeat's default is 25 minutes).
LEASE_SECONDS = 20


def create_scheduler_app(
    settings: Settings | None = None, schedule: dict[str, dict[str, Any]] | None = None
) -> FlaskCelery:
    """The beat app; ``schedule`` replaces the production schedule (tests drive time with it)."""
    app = create_flask_celery_app(Role.SCHEDULER, settings=settings)
    settings = app.settings
    app.conf.beat_schedule = schedule if schedule is not None else beat_schedule(settings.retention)
    app.conf.beat_max_loop_interval = MAX_LOOP_INTERVAL
    if settings.embedded_dir is not None:
        app.conf.beat_scheduler = "ibutsu_scheduler.scheduler:IbutsuLocalScheduler"
        app.conf.beat_schedule_filename = str(settings.embedded_dir / "celerybeat-schedule")
    else:
        app.conf.beat_scheduler = "ibutsu_scheduler.scheduler:IbutsuRedBeatScheduler"
        app.conf.redbeat_redis_url = settings.broker_url
        app.conf.redbeat_key_prefix = f"{settings.redis_key_prefix}redbeat:"  # as RedBeat's default
        app.conf.redbeat_lock_timeout = LEASE_SECONDS
        # RedBeat takes the client it finds on the app: ours reaches every kind of Redis (its
        # own handles no Sentinel password, no READONLY) with the broker's bounds.
        app.redbeat_redis = redis_connections.client(
            settings.broker_url, settings.redis, decode_responses=True
        )
    return app
