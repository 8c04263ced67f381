"""Flower serves /metrics without authentication; ours needs the Flower credentials.

Flower's metrics name every task (``flower_events_total{task=...}``), and task names must not
be readable without FLOWER_BASIC_AUTH. /healthcheck stays open for probes: it says only OK.
"""

from __future__ import annotations

from typing import Any

from flower.views.monitor import Metrics

_MARK = "_ibutsu_requires_auth"


def require_auth_for_metrics() -> None:
    """Make Flower's /metrics handler demand the same credentials as the UI (idempotent)."""
    original = Metrics.get
    if getattr(original, _MARK, False):
        return

    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Flower's own check: answers 401 unless the request carries FLOWER_BASIC_AUTH.
        self.get_current_user()
        return await original(self, *args, **kwargs)

    setattr(guarded, _MARK, True)
    Metrics.get = guarded
