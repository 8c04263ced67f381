"""The beat schedule of the architecture document; tasks are sent by name."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from ibutsu_server import task_names
from ibutsu_server.settings import Retention

SATURDAY = "sat"
# How often imports nobody will finish (worker or message gone) are looked for.
RECOVER_SECONDS = 120.0


def beat_schedule(retention: Retention) -> dict[str, dict[str, Any]]:
    """Weekly pruning on Saturday mornings, a daily prune of processed import files, a sync
    of aborted runs every 30 minutes (times in the app's timezone, UTC by default), and the
    recovery of imports nobody will finish every two minutes."""
    return {
        "prune-old-artifact-files": {
            "task": task_names.PRUNE_OLD_FILES,
            "schedule": crontab(minute=0, hour=4, day_of_week=SATURDAY),
            "args": (retention.files_months,),
        },
        "prune-old-results": {
            "task": task_names.PRUNE_OLD_RESULTS,
            "schedule": crontab(minute=0, hour=5, day_of_week=SATURDAY),
            "args": (retention.results_months,),
        },
        "prune-old-runs": {
            "task": task_names.PRUNE_OLD_RUNS,
            "schedule": crontab(minute=0, hour=6, day_of_week=SATURDAY),
            "args": (retention.runs_months,),
        },
        "sync-aborted-runs": {
            "task": task_names.SYNC_ABORTED_RUNS,
            "schedule": crontab(minute="*/30"),
        },
        "recover-imports": {
            "task": task_names.RECOVER_IMPORTS,
            "schedule": RECOVER_SECONDS,
        },
        "prune-old-import-files": {
            "task": task_names.PRUNE_OLD_IMPORT_FILES,
            "schedule": crontab(minute=30, hour=3),
            "args": (retention.import_files_days,),
        },
    }
