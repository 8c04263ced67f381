"""``ibutsu_server:flower_app``: a broker-only Celery app for Flower."""

from ibutsu_flower.metrics_auth import require_auth_for_metrics
from ibutsu_server.celery_utils import create_broker_celery_app

app = create_broker_celery_app()
require_auth_for_metrics()
