"""Our scheduler as deployed for the mixed-fleet test: the production schedule, with the
recovery of stuck imports every RECOVER_SECONDS and the sync of aborted runs (an entry
upstream's beat also sends) every SYNC_SECONDS, so that both come due within the test."""

from ibutsu_scheduler.factory import create_scheduler_app
from ibutsu_scheduler.schedule import beat_schedule
from ibutsu_server.settings import Retention

RECOVER_SECONDS = 15.0
SYNC_SECONDS = 30.0

schedule = beat_schedule(Retention())
schedule["recover-imports"]["schedule"] = RECOVER_SECONDS
schedule["sync-aborted-runs"]["schedule"] = SYNC_SECONDS

app = create_scheduler_app(schedule=schedule)
