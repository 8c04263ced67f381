"""The production beat schedule, exactly as the architecture document gives it."""

from __future__ import annotations

from celery.schedules import crontab

from ibutsu_scheduler.schedule import beat_schedule
from ibutsu_server import task_names
from ibutsu_server.settings import Retention, Role, load_settings

ENV = {
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/0",
    "POSTGRESQL_HOST": "127.0.0.1",
    "POSTGRESQL_USER": "postgres",
    "POSTGRESQL_DATABASE": "ibutsu",
}


def test_document_schedule() -> None:
    schedule = beat_schedule(Retention())
    expected = {
        "prune-old-artifact-files": (task_names.PRUNE_OLD_FILES, 4, (3,)),
        "prune-old-results": (task_names.PRUNE_OLD_RESULTS, 5, (5,)),
        "prune-old-runs": (task_names.PRUNE_OLD_RUNS, 6, (12,)),
    }
    for name, (task, hour, args) in expected.items():
        entry = schedule[name]
        assert entry["task"] == task
        assert entry["args"] == args
        assert entry["schedule"] == crontab(minute=0, hour=hour, day_of_week="sat")
    sync = schedule["sync-aborted-runs"]
    assert sync["task"] == task_names.SYNC_ABORTED_RUNS
    assert sync["schedule"] == crontab(minute="*/30")
    assert "args" not in sync
    daily = schedule["prune-old-import-files"]
    assert daily["task"] == task_names.PRUNE_OLD_IMPORT_FILES
    assert daily["args"] == (7,)


def test_retention_and_timezone_from_the_environment() -> None:
    settings = load_settings(
        Role.SCHEDULER,
        {**ENV, "IBUTSU_PRUNE_RESULTS_MONTHS": "9", "CELERY_TIMEZONE": "Europe/Prague"},
    )
    assert settings.timezone == "Europe/Prague"
    assert beat_schedule(settings.retention)["prune-old-results"]["args"] == (9,)
    assert load_settings(Role.SCHEDULER, ENV).timezone == "UTC"


def test_bad_timezone_is_a_configuration_error() -> None:
    import pytest

    from ibutsu_server.settings import ConfigError

    with pytest.raises(ConfigError, match="CELERY_TIMEZONE must be an IANA time zone"):
        load_settings(Role.SCHEDULER, {**ENV, "CELERY_TIMEZONE": "Mars/Olympus"})
