"""Flower serves /metrics without authentication; ours needs the Flower credentials.

Flower's metrics name every task (``flower_events_total{task=...}``), and task names must not
be readable without FLOWER_BASIC_AUTH. /healthcheck stays open for probes: it says only OK.
"""

from __future__ import annotations

from flower.views.monitor import Metrics
from tornado.web import authenticated

_MARK = "_ibutsu_requires_auth"


def require_auth_for_metrics() -> None:
    """Make Flower's /metrics handler demand the same credentials as the UI (idempotent)."""
    if not getattr(Metrics.get, _MARK, False):
        guarded = authenticated(Metrics.get)
        setattr(guarded, _MARK, True)
        Metrics.get = guarded
