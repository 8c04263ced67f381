"""``ibutsu_server:flower_app``: a broker-only Celery app for Flower."""

from ibutsu_server.celery_utils import create_broker_celery_app

app = create_broker_celery_app()
