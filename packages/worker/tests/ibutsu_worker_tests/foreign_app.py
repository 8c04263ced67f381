"""A worker that is not ours, as upstream 3.1.1 runs beside ours during a rolling update: a
plain Celery app on Kombu's stock Redis transport (nothing of ours is imported here), early
acknowledgement, prefetch 4, Kombu's default visibility timeout (3,600 s). It registers one of
the names both fleets know, ``runs.update_run``, records in Redis which task ids it started
and finished, and takes FOREIGN_SLOW_SECONDS over a run id that starts with ``slow-``: busy,
it holds the messages it prefetched."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

STARTED = "foreign:started"
FINISHED = "foreign:finished"
FOREIGN_SLOW_SECONDS = 60.0

app = Celery("foreign", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(
    task_acks_late=False,
    worker_prefetch_multiplier=4,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
)


@app.task(name="ibutsu_server.tasks.runs.update_run", bind=True)
def update_run(self: object, run_id: str) -> None:
    task_id = self.request.id  # type: ignore[attr-defined]
    with redis.Redis.from_url(app.conf.broker_url) as client:
        client.rpush(STARTED, task_id)
        if str(run_id).startswith("slow-"):
            time.sleep(FOREIGN_SLOW_SECONDS)
        client.rpush(FINISHED, task_id)
