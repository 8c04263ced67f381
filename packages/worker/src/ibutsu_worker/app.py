"""``ibutsu_server:worker_app``: the Celery app of the worker role."""

from ibutsu_worker.factory import create_worker_app

app = create_worker_app()
