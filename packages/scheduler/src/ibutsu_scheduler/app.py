"""``ibutsu_server:scheduler_app``: the Celery app of the beat scheduler."""

from ibutsu_scheduler.factory import create_scheduler_app

app = create_scheduler_app()
