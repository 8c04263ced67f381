"""Liveness of a role's main loop: the process is alive while its loop makes progress.

A thread that answers /healthz while the loop it stands for hangs would keep a hung pod alive
for ever. The loop ticks instead (the worker's event loop through a timer of its own, beat
each time it looks at its schedule), and /healthz fails once no tick came for the configured
time (``IBUTSU_LIVENESS_TIMEOUT``). A process that is out of its loop on purpose (starting,
reconnecting to the broker, a scheduler standing by for the lease) is alive: restarting it
would not help, and /readyz says whether it can work.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LoopWatch:
    """Ticks from a main loop, and whether they still come."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._last = clock()
        self._in_loop = False

    def tick(self) -> None:
        """The loop went round."""
        self._last = self._clock()
        self._in_loop = True

    def leave(self) -> None:
        """The loop stopped on purpose (to reconnect, say); ticks resume when it runs again."""
        self._in_loop = False

    def check(self) -> str | None:
        """None while alive, else why not."""
        idle = self._clock() - self._last
        if self._in_loop and idle >= self.timeout:
            return f"main loop stalled for {idle:.0f} s"
        return None
