"""The scheduler as deployed, with a schedule of one entry due every BEAT_PERIOD seconds, so a
fault test sees many slots go by: ``importers.recover_imports``, which workers run."""

from ibutsu_scheduler.factory import create_scheduler_app
from ibutsu_server import task_names

BEAT_PERIOD = 2.0

app = create_scheduler_app(
    schedule={"tick": {"task": task_names.RECOVER_IMPORTS, "schedule": BEAT_PERIOD}}
)
