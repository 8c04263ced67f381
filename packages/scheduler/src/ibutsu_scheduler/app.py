"""``ibutsu_server:scheduler_app``: the Celery app of the beat scheduler."""

from ibutsu_scheduler.schedule import beat_schedule
from ibutsu_server.app_factory import create_flask_celery_app
from ibutsu_server.settings import Role

app = create_flask_celery_app(Role.SCHEDULER)
app.conf.beat_schedule = beat_schedule()
