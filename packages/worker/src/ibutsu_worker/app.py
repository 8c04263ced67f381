"""``ibutsu_server:worker_app``: the Celery app of the worker role.

Process-level set-up lives here, in the entry point, not in the factory the command line
shares: the metrics folder is prepared before prometheus_client is first imported.
"""

from ibutsu_server.celery_utils import settings_or_exit
from ibutsu_server.settings import Role
from ibutsu_worker.metrics_dir import prepare_multiprocess_dir

settings = settings_or_exit(Role.WORKER)
if settings.metrics is not None:
    prepare_multiprocess_dir()

from ibutsu_worker import instrumentation, leases, shutdown  # noqa: E402 - after the metrics folder
from ibutsu_worker.factory import create_worker_app  # noqa: E402

app = create_worker_app(settings)
instrumentation.install(app, settings.metrics)
leases.install(app, settings.visibility_timeout)
shutdown.install()
