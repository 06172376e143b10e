"""PeriodicLoop: absolute deadlines, sleep-then-spin, overrun skipping, error tolerance (driven clock)."""
import threading
import time

import pytest

from openvla_ros.control.periodic import PeriodicLoop


class FakeTime:
    """A clock that advances only when slept on (plus a fixed cost per clock read while spinning)."""

    def __init__(self, read_cost: float = 1e-6):
        self.now = 0.0
        self.read_cost = read_cost
        self.sleeps: list[float] = []

    def clock(self) -> float:
        self.now += self.read_cost
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_ticks_land_on_absolute_deadlines_without_drift():
    t = FakeTime(read_cost=1e-5)
    stamps = []
    loop = PeriodicLoop(0.01, lambda d: stamps.append((d, t.now)), clock=t.clock, sleep=t.sleep, spin_s=0.0003)
    deadline = 0.01
    for _ in range(1000):
        deadline = loop.run_once(deadline)
    deadlines = [d for d, _ in stamps]
    assert deadlines[-1] == pytest.approx(10.0, abs=1e-9)  # k * period, no accumulated error
    # Each tick starts at or just after its deadline (the spin's resolution), never before.
    lateness = [now - d for d, now in stamps]
    assert min(lateness) >= 0.0 and max(lateness) <= 2e-5
    # Most of the wait is a sleep; only the last spin_s is spun.
    assert all(s <= 0.01 for s in t.sleeps) and len(t.sleeps) == 1000
    assert loop.missed_deadlines == 0 and loop.ticks == 1000


def test_overrun_skips_missed_deadlines_instead_of_bursting():
    t = FakeTime()
    ticked = []

    def slow_tick(deadline):
        ticked.append(deadline)
        if len(ticked) == 3:
            t.now += 0.035  # this tick overran three and a half periods

    loop = PeriodicLoop(0.01, slow_tick, clock=t.clock, sleep=t.sleep, spin_s=0.0)
    deadline = 0.01
    for _ in range(5):
        deadline = loop.run_once(deadline)
    assert ticked[:3] == pytest.approx([0.01, 0.02, 0.03])
    # 0.04, 0.05, 0.06 were missed (the tick ended at 0.065): the next tick is at 0.07, not a burst.
    assert ticked[3:] == pytest.approx([0.07, 0.08])
    assert loop.missed_deadlines == 3


def test_a_failing_tick_is_counted_and_the_loop_goes_on():
    t = FakeTime()
    calls = []

    def tick(deadline):
        calls.append(deadline)
        if len(calls) % 2:
            raise RuntimeError("publisher gone")

    loop = PeriodicLoop(0.01, tick, clock=t.clock, sleep=t.sleep)
    deadline = 0.01
    for _ in range(4):
        deadline = loop.run_once(deadline)
    assert len(calls) == 4 and loop.tick_errors == 2
    assert "publisher gone" in loop.last_error
    status = loop.status()
    assert {k: status[k] for k in ("running", "ticks", "missed_deadlines", "tick_errors", "realtime")} == {
        "running": False, "ticks": 4, "missed_deadlines": 0, "tick_errors": 2, "realtime": False}
    assert 0.0 <= status["late_p50_ms"] <= status["late_p99_ms"] <= status["late_max_ms"] < 0.1


@pytest.mark.parametrize("period, spin", [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (0.01, 0.01), (0.01, -1.0)])
def test_bad_settings_are_rejected_with_the_value(period, spin):
    with pytest.raises(ValueError, match="period_s|spin_s"):
        PeriodicLoop(period, lambda d: None, spin_s=spin)


def test_thread_runs_at_the_rate_and_stops():
    ticks = []
    done = threading.Event()

    def tick(deadline):
        ticks.append(time.monotonic())
        if len(ticks) >= 20:
            done.set()

    loop = PeriodicLoop(0.005, tick, name="test_loop")
    loop.start()
    with pytest.raises(RuntimeError, match="already started"):
        loop.start()
    try:
        assert done.wait(10.0)
    finally:
        loop.stop()
    assert not loop.running
    count = len(ticks)
    time.sleep(0.05)
    assert len(ticks) == count  # stopped: no more ticks
    assert ticks == sorted(ticks) and count >= 20


def test_no_tick_after_stop_was_asked():
    t = FakeTime()
    ticked = []
    loop = PeriodicLoop(0.01, ticked.append, clock=t.clock, sleep=t.sleep)
    deadline = loop.run_once(0.01)
    loop._stop.set()  # what stop() does before joining the thread
    assert loop.run_once(deadline) == deadline
    assert ticked == [0.01] and loop.ticks == 1
