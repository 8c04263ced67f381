"""A scheduler app with a short schedule, so tests can watch real slots go by."""

from ibutsu_scheduler.factory import create_scheduler_app

TEST_SCHEDULE = {
    "tick-fast": {"task": "tests.tick", "schedule": 2.0, "args": ("fast",)},
    "tick-slow": {"task": "tests.tick", "schedule": 3.0, "args": ("slow",)},
}

app = create_scheduler_app(schedule=TEST_SCHEDULE)
