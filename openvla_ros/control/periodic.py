"""A fixed-rate loop on its own thread, ticking at absolute deadlines: the control stream's clock.

An rclpy timer is dispatched by the executor, so a control tick waits for whatever callback the
executor is running (an image conversion, a service) and for the executor's own Python work; on a
2-core machine that put the 100 Hz stream's p99 period error at 5-8 ms. `PeriodicLoop` owns a
thread that only sleeps and ticks:

- deadlines are absolute (`start + k * period`), so errors never accumulate into drift;
- it sleeps until shortly before the deadline and spins the last `spin_s` (a sleep wakes up
  50-100 us late, and a waking thread may wait for the GIL; the short spin absorbs both);
- a tick that ends after the next deadline is an overrun: missed deadlines are counted and
  skipped (never replayed in a burst), the loop realigns to the next future deadline;
- with `realtime_priority` > 0 the thread asks Linux for SCHED_FIFO at that priority (as
  ros2_control's loop does): on a busy CPU an ordinary thread that wakes up can wait several ms for
  a core behind other runnable threads, a FIFO thread preempts them. Without the privilege
  (CAP_SYS_NICE or an rtprio limit) it logs why and runs at normal priority.

Clock and sleep are injected so tests drive time. No ROS imports.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_SPIN_S = 0.0003
STATS_WINDOW = 1000  # ticks kept for the lateness/duration percentiles in status()


def set_realtime(priority: int, thread_id: int = 0) -> str | None:
    """SCHED_FIFO at `priority` for one thread (0: the caller); returns why not, or None when it worked.

    With SCHED_RESET_ON_FORK, so processes started from a real-time thread start at normal priority.
    """
    import os

    if not (isinstance(priority, int) and 1 <= priority <= 99):
        raise ValueError(f"SCHED_FIFO priority must be an integer in [1, 99], got {priority!r}")
    try:
        policy = os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0)
        os.sched_setscheduler(thread_id, policy, os.sched_param(priority))
    except (AttributeError, OSError) as exc:
        return str(exc)
    return None


def set_process_realtime(priority: int) -> str | None:
    """SCHED_FIFO for every other thread this process has now (e.g. a subscriber's executor and DDS
    threads); the calling thread keeps its scheduling, so processes it starts are not real-time."""
    import os

    if not os.path.isdir("/proc/self/task"):
        return "no /proc/self/task (not Linux)"
    me = threading.get_native_id()
    failed = []
    for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
        if tid == me:
            continue
        why = set_realtime(priority, tid)
        if why and os.path.isdir(f"/proc/self/task/{tid}"):  # a thread that ended meanwhile is no failure
            failed.append(why)
    return failed[0] if failed else None


class PeriodicLoop:
    """Call `tick(deadline)` every `period_s` seconds on a thread (see the module docstring)."""

    def __init__(self, period_s: float, tick: Callable[[float], None], *, name: str = "periodic",
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 spin_s: float = DEFAULT_SPIN_S, realtime_priority: int = 0):
        if not (isinstance(period_s, (int, float)) and math.isfinite(period_s) and period_s > 0):
            raise ValueError(f"period_s must be a positive number, got {period_s!r}")
        if not (math.isfinite(spin_s) and 0 <= spin_s < period_s):
            raise ValueError(f"spin_s must be in [0, period_s={period_s}), got {spin_s!r}")
        if not (isinstance(realtime_priority, int) and 0 <= realtime_priority <= 99):
            raise ValueError(f"realtime_priority must be an integer in [0, 99], got {realtime_priority!r}")
        self.realtime_priority = realtime_priority
        self.realtime = False  # whether the thread got SCHED_FIFO
        self.period_s = float(period_s)
        self.spin_s = float(spin_s)
        self._tick = tick
        self._clock = clock
        self._sleep = sleep
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.missed_deadlines = 0
        self.tick_errors = 0
        self.last_error: str | None = None
        # (lateness, duration) of the last ticks, seconds: how far after its deadline a tick started
        # and how long it ran. Appended by the loop thread, read by status() (deque appends are atomic).
        self._timings: collections.deque = collections.deque(maxlen=STATS_WINDOW)

    # -- one step, separated from the thread so tests can drive it

    def wait_for(self, deadline: float) -> None:
        """Return at `deadline` (clock time): sleep most of the way, spin the rest."""
        remaining = deadline - self._clock()
        if remaining > self.spin_s:
            self._sleep(remaining - self.spin_s)
        while self._clock() < deadline and not self._stop.is_set():
            pass

    def next_deadline(self, deadline: float) -> float:
        """The deadline after `deadline`, skipping (and counting) those already past."""
        following = deadline + self.period_s
        now = self._clock()
        if now >= following:
            missed = int((now - following) // self.period_s) + 1
            self.missed_deadlines += missed
            following += missed * self.period_s
        return following

    def run_once(self, deadline: float) -> float:
        """Wait for `deadline`, tick, and return the next deadline (no tick once stop() was asked)."""
        self.wait_for(deadline)
        if self._stop.is_set():
            return deadline
        start = self._clock()
        try:
            self._tick(deadline)
        except Exception as exc:  # a bad tick must not stop the stream; the node reports it
            self.tick_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.tick_errors & (self.tick_errors - 1) == 0:  # 1st, 2nd, 4th, 8th ...: never a flood
                log.exception("%s: tick failed (%d so far)", self._name, self.tick_errors)
        self.ticks += 1
        self._timings.append((start - deadline, self._clock() - start))
        return self.next_deadline(deadline)

    # -- thread

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} loop already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _set_realtime(self) -> None:
        if not self.realtime_priority:
            return
        why = set_realtime(self.realtime_priority)
        self.realtime = why is None
        if why:
            log.warning("%s: could not get SCHED_FIFO priority %d (%s); running at normal priority",
                        self._name, self.realtime_priority, why)

    def _run(self) -> None:
        self._set_realtime()
        deadline = self._clock() + self.period_s
        while not self._stop.is_set():
            deadline = self.run_once(deadline)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: the loop thread did not end within %.1f s", self._name, timeout)
            else:
                self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        out = {"running": self.running, "ticks": self.ticks, "missed_deadlines": self.missed_deadlines,
               "tick_errors": self.tick_errors, "realtime": self.realtime}
        timings = list(self._timings)
        if timings:
            import numpy as np

            late, duration = (np.array(v) * 1e3 for v in zip(*timings))
            out.update({"late_p50_ms": float(np.percentile(late, 50)), "late_p99_ms": float(np.percentile(late, 99)),
                        "late_max_ms": float(late.max()), "tick_p99_ms": float(np.percentile(duration, 99))})
        return out
