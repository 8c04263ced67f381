"""The beat schedule of the architecture document; tasks are sent by name."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from ibutsu_server.settings import Retention

SATURDAY = "sat"
TASKS = "ibutsu_server.tasks."


def beat_schedule(retention: Retention) -> dict[str, dict[str, Any]]:
    """Weekly pruning on Saturday mornings, a daily prune of processed import files, and a
    sync of aborted runs every 30 minutes (times in the app's timezone, UTC by default)."""
    return {
        "prune-old-artifact-files": {
            "task": f"{TASKS}db.prune_old_files",
            "schedule": crontab(minute=0, hour=4, day_of_week=SATURDAY),
            "args": (retention.files_months,),
        },
        "prune-old-results": {
            "task": f"{TASKS}db.prune_old_results",
            "schedule": crontab(minute=0, hour=5, day_of_week=SATURDAY),
            "args": (retention.results_months,),
        },
        "prune-old-runs": {
            "task": f"{TASKS}db.prune_old_runs",
            "schedule": crontab(minute=0, hour=6, day_of_week=SATURDAY),
            "args": (retention.runs_months,),
        },
        "sync-aborted-runs": {
            "task": f"{TASKS}runs.sync_aborted_runs",
            "schedule": crontab(minute="*/30"),
        },
        "prune-old-import-files": {
            "task": f"{TASKS}db.prune_old_import_files",
            "schedule": crontab(minute=30, hour=3),
            "args": (retention.import_files_days,),
        },
    }
