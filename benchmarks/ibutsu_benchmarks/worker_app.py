"""``ibutsu_benchmarks.worker_app:app``: the worker app as deployed (``ibutsu_server:worker_app``:
its consumer, metrics, leases and shutdown handling) with the benchmarks' reference tasks,
which differ only in their base class and body."""

from __future__ import annotations

from celery import Task
from sqlalchemy import text

from ibutsu_benchmarks.workers import EMPTY, NOOP, ONE_STATEMENT
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker.process.app import app


@app.task(base=Task, name=NOOP, ignore_result=True, shared=False)
def noop() -> None:
    """A bare Celery task that does nothing: the floor."""


@app.task(bind=True, name=EMPTY, ignore_result=True, shared=False)
def empty(self: IbutsuTask) -> None:
    """An IbutsuTask that does nothing: its session scope is never used."""


@app.task(bind=True, name=ONE_STATEMENT, ignore_result=True, shared=False)
def one_statement(self: IbutsuTask) -> None:
    """An IbutsuTask whose body is one SQL statement: a transaction is begun and committed."""
    self.session.execute(text("SELECT 1"))
