"""The liveness watch: alive while ticks come, or while out of the loop on purpose."""

from __future__ import annotations

from ibutsu_server.liveness import LoopWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_alive_until_the_loop_stops_ticking() -> None:
    clock = Clock()
    watch = LoopWatch(60, clock)
    clock.now += 600
    assert watch.check() is None  # starting: not in the loop yet, whatever the time
    watch.tick()
    clock.now += 59
    assert watch.check() is None
    clock.now += 2
    assert watch.check() == "main loop stalled for 61 s"
    watch.tick()
    assert watch.check() is None


def test_out_of_the_loop_on_purpose_is_alive() -> None:
    clock = Clock()
    watch = LoopWatch(60, clock)
    watch.tick()
    watch.leave()  # reconnecting to the broker, say
    clock.now += 600
    assert watch.check() is None
    watch.tick()
    clock.now += 61
    assert watch.check() is not None
