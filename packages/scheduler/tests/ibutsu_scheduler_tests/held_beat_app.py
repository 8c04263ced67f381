"""A scheduler app whose schedule has one of the entries upstream's beat also sends, every
2 s, beside one only ours sends: tests watch the first held while upstream's workers are
about."""

from ibutsu_scheduler.factory import create_scheduler_app
from ibutsu_server import task_names

PERIOD = 2.0

app = create_scheduler_app(
    schedule={
        "sync-aborted-runs": {"task": task_names.SYNC_ABORTED_RUNS, "schedule": PERIOD},
        "recover-imports": {"task": task_names.RECOVER_IMPORTS, "schedule": PERIOD},
    }
)
