"""Sessions, and work deferred until a transaction commits.

The ORM is imported when the first session registry is made, not with this module: IbutsuTask
imports it, and the scheduler, which runs no task, should not pay for the ORM at start-up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, event

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, scoped_session

_AFTER_COMMIT = "ibutsu_after_commit"


class Transaction(Protocol):
    """The seam for domain code that must commit before its task ends (an import's "running",
    each pruning batch): the session it works in, and commits and rollbacks by name. A task
    (IbutsuTask) is one; :class:`SessionTransaction` is one over a bare session."""

    @property
    def session(self) -> Session: ...

    def checkpoint(self, reason: str) -> None:
        """Commit now, so others see the work so far; ``reason`` says why."""

    def abandon(self, reason: str) -> None:
        """Roll back the work since the last checkpoint and go on; ``reason`` says why."""


@dataclass
class SessionTransaction:
    """A :class:`Transaction` over a session of the caller's (tests, benchmarks, scripts)."""

    session: Session

    def checkpoint(self, reason: str) -> None:
        """Commit the session."""
        self.session.commit()

    def abandon(self, reason: str) -> None:
        """Roll the session back."""
        self.session.rollback()


def after_commit(session: Session, callback: Callable[[], Any]) -> None:
    """Run ``callback`` once the session's current transaction commits; drop it on rollback.

    Tasks use this to enqueue follow-up work, so no task ever sees uncommitted rows.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        callback()


def _discard_after_commit(session: Session, previous_transaction: Any) -> None:
    # A rolled-back savepoint leaves the outer transaction, and its callbacks, alive.
    if not previous_transaction.nested:
        session.info.pop(_AFTER_COMMIT, None)


def make_session_factory(engine: Engine) -> scoped_session[Session]:
    """A thread-scoped session registry whose sessions honour :func:`after_commit`."""
    from sqlalchemy.orm import scoped_session, sessionmaker

    factory = sessionmaker(bind=engine, expire_on_commit=False)
    event.listen(factory, "after_commit", _run_after_commit)
    event.listen(factory, "after_soft_rollback", _discard_after_commit)
    return scoped_session(factory)


class Database:
    """An engine and its thread-scoped session registry."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session: scoped_session[Session] = make_session_factory(engine)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """This thread's session for one transaction: committed if the block returns, rolled
        back if it raises (even on a connection that is already gone), always removed. The
        one place a session is opened and closed: tasks (IbutsuTask.session_scope), the
        command line and the tests all go through it."""
        session = self.session()
        try:
            yield session
            # Any use of the session (a statement, an add, a change to a loaded row) begins a
            # transaction; a session with none and no follow-up waiting has nothing to commit,
            # and committing would begin one first: a cost every task that does little paid.
            if session.in_transaction() or session.info.get(_AFTER_COMMIT):
                session.commit()
        except BaseException:
            # A rollback on a dead connection raises too; the original error matters.
            with suppress(Exception):
                session.rollback()
            raise
        finally:
            self.session.remove()
