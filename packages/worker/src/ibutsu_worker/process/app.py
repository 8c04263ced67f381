"""``ibutsu_server:worker_app``: the Celery app of the worker role.

Process-level set-up lives here, in the entry point, not in the factory the command line
shares: the metrics folder is prepared before prometheus_client is first imported.
"""

import gc

from celery.signals import worker_init

from ibutsu_server.celery_utils import settings_or_exit
from ibutsu_server.settings import Role
from ibutsu_worker.process.metrics_dir import prepare_multiprocess_dir

settings = settings_or_exit(Role.WORKER)
if settings.metrics is not None:
    prepare_multiprocess_dir()

from ibutsu_worker.process import (  # noqa: E402 - after the metrics folder
    consumer,
    instrumentation,
    leases,
    receipt_origin,
    shutdown,
)
from ibutsu_worker.process.factory import create_worker_app  # noqa: E402

app = create_worker_app(settings, events=receipt_origin.EVENTS)
app.conf.worker_consumer = consumer.CONSUMER
consumer.quiet_unacknowledged()
instrumentation.install(app, settings.metrics)
receipt_origin.install()
leases.install(app, settings.visibility_timeout)
shutdown.install()
# The pool forks after this: what the main process built (Celery, SQLAlchemy, every task) lives
# as long as each child, so the collector need not walk it again at every full collection.
worker_init.connect(lambda **_: gc.freeze(), weak=False)
