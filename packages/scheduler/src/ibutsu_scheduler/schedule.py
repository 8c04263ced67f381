"""The beat schedule of the architecture document; tasks are sent by name."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

SATURDAY = "sat"


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Periodic maintenance: weekly pruning, and a sync of aborted runs every 30 minutes."""
    return {
        "prune-old-artifact-files": {
            "task": "ibutsu_server.tasks.db.prune_old_files",
            "schedule": crontab(minute=0, hour=4, day_of_week=SATURDAY),
            "args": (3,),
        },
        "prune-old-results": {
            "task": "ibutsu_server.tasks.db.prune_old_results",
            "schedule": crontab(minute=0, hour=5, day_of_week=SATURDAY),
            "args": (5,),
        },
        "prune-old-runs": {
            "task": "ibutsu_server.tasks.db.prune_old_runs",
            "schedule": crontab(minute=0, hour=6, day_of_week=SATURDAY),
            "args": (12,),
        },
        "sync-aborted-runs": {
            "task": "ibutsu_server.tasks.runs.sync_aborted_runs",
            "schedule": crontab(minute="*/30"),
        },
    }
