"""A scheduler app with a short schedule, so tests can watch real slots go by."""

from celery.schedules import crontab

from ibutsu_scheduler.factory import create_scheduler_app

TEST_SCHEDULE = {
    "tick-fast": {"task": "tests.tick", "schedule": 2.0, "args": ("fast",)},
    "tick-slow": {"task": "tests.tick", "schedule": 3.0, "args": ("slow",)},
    # Never due during a test: its next send time must be exported all the same.
    "weekly": {"task": "tests.tick", "schedule": crontab(minute=0, hour=4, day_of_week="sat")},
}

app = create_scheduler_app(schedule=TEST_SCHEDULE)
