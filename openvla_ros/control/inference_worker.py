"""Runs `Engine.predict` off the caller's (executor's) thread, always on the newest observation.

`InferenceWorker` owns one daemon thread. `submit()` hands it an observation through a queue of
one: a newer observation replaces a pending one (the replaced frame is counted as dropped), so the
model always works on the freshest image and never falls behind. Each finished, finite chunk goes
to ``on_chunk(chunk, epoch)`` (typically `ChunkBuffer.push`), from the worker thread.

Scheduling modes:

* ``continuous``: predict as soon as a new observation is pending (each observation is used once).
* ``threshold``: predict only while ``depth_fn()`` (seconds of actions left, e.g.
  `ChunkBuffer.depth_s`) is below ``threshold_s``; the worker re-checks every ``poll_s``.

Committed prefix: with ``prefix_fn`` set, the worker asks it for the actions already committed
for an observation (``prefix_fn(observation) -> (P, D) array or None``) and passes them to the
engine as ``forced_prefix``, so a token model decodes its chunk as the continuation of the motion
the arm makes while it thinks (real-time chunking); None decodes plainly.

Errors: an exception from the engine, a result that is not an ActionChunk, or a chunk with
NaN/inf counts as an error. After ``max_consecutive_errors`` in a row the worker enters
``failed`` (the caller should hold position: no chunks arrive, so the buffer underruns), reports
the last error in `status()` and through ``on_error``, and retries on the newest observation once
``backoff_s`` has passed on the injected clock; one success brings it back to ``running``.

States: ``idle`` (not started), ``running`` (started and healthy; ``busy`` says whether a
prediction is in flight), ``failed``, ``stopped``.

Process option: ``use_process=True`` runs the engine in a child process, for engines whose Python
work holds the GIL and would disturb the control timer. ``engine`` must then be a picklable
zero-argument factory (e.g. a module-level function or `functools.partial`) that builds the engine
inside the child; `ProcessEngine` is the proxy the thread talks to over a pipe. A child that dies
fails the prediction in flight (an error) and is restarted by the next one.

Timings (``clock`` seconds): ``predict_ms`` is the duration of the engine call, ``latency_ms`` the
time from the observation stamp to the chunk being ready (so stamps must be on the same clock),
``timings_ms`` the engine's own per-stage figures of the last chunk and ``timings_ms_mean`` their
means over the statistics window.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple

import numpy as np

from openvla_ros.engines.base import ActionChunk, supports_forced_prefix

logger = logging.getLogger(__name__)

MODE_CONTINUOUS = "continuous"
MODE_THRESHOLD = "threshold"
MODES = (MODE_CONTINUOUS, MODE_THRESHOLD)

STATE_IDLE = "idle"
STATE_RUNNING = "running"
STATE_FAILED = "failed"
STATE_STOPPED = "stopped"


class Observation(NamedTuple):
    """One camera frame with the instruction and the buffer epoch it was taken under."""

    image: np.ndarray
    instruction: str
    stamp: float
    epoch: int


class NonFiniteChunkError(ValueError):
    """The engine answered NaN or inf."""


class EngineProcessError(RuntimeError):
    """The engine in the child process raised or the process died."""


def _serve_engine(factory: Callable[[], Any], conn) -> None:
    """Child-process loop of `ProcessEngine`: build the engine, then answer predict requests."""
    try:
        engine = factory()
        conn.send(("ready", {"name": engine.name, "dim_names": list(engine.dim_names), "dt": engine.dt,
                             "chunk_len": engine.chunk_len, "info": engine.info(),
                             "supports_forced_prefix": supports_forced_prefix(engine)}))
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("error", f"engine factory failed: {type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request[0] == "close":
            return
        _, image, instruction, stamp, unnorm_key, extra = request
        try:
            conn.send(("ok", engine.predict(image, instruction, stamp=stamp, unnorm_key=unnorm_key, **extra)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessEngine:
    """An Engine proxy whose real engine lives in a child process built by ``factory``."""

    def __init__(self, factory: Callable[[], Any], *, start_method: str = "spawn",
                 start_timeout_s: float = 300.0):
        if not callable(factory):
            raise ValueError(f"ProcessEngine needs a zero-argument engine factory, got {factory!r}")
        self._factory = factory
        self._ctx = multiprocessing.get_context(start_method)
        self._start_timeout_s = start_timeout_s
        self._proc = None
        self._conn = None
        self._start()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve_engine, args=(self._factory, child), daemon=True,
                                       name="vla-engine")
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            kind, payload = self._receive(self._start_timeout_s)
        except EngineProcessError:
            self._reap()
            raise
        if kind != "ready":
            self._reap()
            raise EngineProcessError(payload)
        self.name = payload["name"]
        self.dim_names = payload["dim_names"]
        self.dt = payload["dt"]
        self.chunk_len = payload["chunk_len"]
        self.supports_forced_prefix = payload["supports_forced_prefix"]
        self._info = payload["info"]

    def _receive(self, timeout: float | None):
        if not self._conn.poll(timeout):
            raise EngineProcessError(f"engine process gave no answer within {timeout} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineProcessError(f"engine process exited (code {self._reap()})") from exc

    def _reap(self) -> int | None:
        """Collect a dead (or hung) child so the next predict starts a fresh one; returns its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        self._conn.close()
        return proc.exitcode

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None, **extra) -> ActionChunk:
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self._reap()
            self._start()
        try:
            self._conn.send(("predict", image, instruction, stamp, unnorm_key, extra))
        except (BrokenPipeError, OSError) as exc:
            raise EngineProcessError(f"engine process exited (code {self._reap()})") from exc
        kind, payload = self._receive(None)
        if kind != "ok":
            raise EngineProcessError(payload)
        return payload

    def info(self) -> dict:
        return dict(self._info, process=True, pid=self.pid)

    def close(self) -> None:
        """Ask the child to exit and collect it (terminated if it does not)."""
        if self._proc is None:
            return
        try:
            self._conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self._reap()


class InferenceWorker:
    """Background inference on the newest observation; see the module docstring."""

    def __init__(self, engine, on_chunk: Callable[[ActionChunk, int], Any], *,
                 clock: Callable[[], float] = time.monotonic, mode: str = MODE_CONTINUOUS,
                 threshold_s: float = 0.2, depth_fn: Callable[[], float] | None = None,
                 max_consecutive_errors: int = 3, backoff_s: float = 1.0, use_process: bool = False,
                 unnorm_key: str | None = None, poll_s: float = 0.005, stats_window: int = 100,
                 on_error: Callable[[BaseException, str], Any] | None = None,
                 prefix_fn: Callable[[Observation], np.ndarray | None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == MODE_THRESHOLD and depth_fn is None:
            raise ValueError("mode='threshold' needs depth_fn (seconds of actions left), got None")
        for name, value in (("threshold_s", threshold_s), ("backoff_s", backoff_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(poll_s, (int, float)) and math.isfinite(poll_s) and poll_s > 0):
            raise ValueError(f"poll_s must be a positive number of seconds, got {poll_s!r}")
        if not (isinstance(max_consecutive_errors, int) and max_consecutive_errors >= 1):
            raise ValueError(f"max_consecutive_errors must be an integer >= 1, got {max_consecutive_errors!r}")
        if not (isinstance(stats_window, int) and stats_window >= 2):
            raise ValueError(f"stats_window must be an integer >= 2, got {stats_window!r}")
        if not callable(on_chunk):
            raise ValueError(f"on_chunk must be callable, got {on_chunk!r}")
        self._owns_engine = bool(use_process)
        if use_process:
            if hasattr(engine, "predict"):
                raise ValueError("use_process=True needs a picklable engine factory (built in the child), "
                                 f"got an engine instance {engine!r}")
            engine = ProcessEngine(engine)
        elif not hasattr(engine, "predict"):
            raise ValueError(f"engine must have predict(image, instruction, stamp=, unnorm_key=), got {engine!r}")
        if prefix_fn is not None and not supports_forced_prefix(engine):
            raise ValueError(f"engine {getattr(engine, 'name', engine)!r} cannot decode with a forced prefix "
                             "(supports_forced_prefix is False)")
        self.engine = engine
        self._prefix_fn = prefix_fn
        self._on_chunk = on_chunk
        self._on_error = on_error
        self._clock = clock
        self.mode = mode
        self.threshold_s = float(threshold_s)
        self._depth_fn = depth_fn
        self.max_consecutive_errors = max_consecutive_errors
        self.backoff_s = float(backoff_s)
        self.unnorm_key = unnorm_key
        self._poll_s = float(poll_s)

        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pending: Observation | None = None
        self._stopping = False
        self._state = STATE_IDLE
        self._busy = False
        self._retry_at = -math.inf
        self._consecutive_errors = 0
        self._counts = {"submitted": 0, "dropped": 0, "predictions": 0, "chunks": 0, "errors": 0,
                        "non_finite": 0, "failures": 0, "recoveries": 0, "callback_errors": 0,
                        "threshold_waits": 0}
        self._last_forced_steps = 0  # committed steps the last chunk was decoded after
        self._last_error: str | None = None
        self._done_times: deque[float] = deque(maxlen=stats_window)
        self._predict_ms: deque[float] = deque(maxlen=stats_window)
        self._latency_ms: deque[float] = deque(maxlen=stats_window)
        self._stage_ms: dict[str, deque[float]] = {}
        self._last_timings: dict[str, float] = {}
        self._waiting_for_depth = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "InferenceWorker":
        with self._cond:
            if self._thread is not None:
                raise ValueError(f"worker already started (state {self._state})")
            self._state = STATE_RUNNING
            self._thread = threading.Thread(target=self._run, name="vla-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Ask the thread to finish (after any prediction in flight) and join it; True when joined."""
        with self._cond:
            self._stopping = True
            self._pending = None
            self._state = STATE_STOPPED
            self._cond.notify_all()
        joined = self.join(timeout)
        if joined and self._owns_engine:
            self.engine.close()
        return joined

    def join(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def __enter__(self) -> "InferenceWorker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def state(self) -> str:
        with self._cond:
            return self._state

    # ------------------------------------------------------------------ input
    def submit(self, observation) -> bool:
        """Queue the newest observation; returns False when it replaced (dropped) a pending one."""
        obs = observation if isinstance(observation, Observation) else Observation(*observation)
        with self._cond:
            if self._stopping:
                return False
            replaced = self._pending is not None
            if replaced:
                self._counts["dropped"] += 1
            self._pending = obs
            self._counts["submitted"] += 1
            self._cond.notify_all()
            return not replaced

    def wake(self) -> None:
        """Re-check the scheduling conditions now (e.g. after the buffer drained or time advanced)."""
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ thread
    def _take_locked(self) -> tuple[Observation | None, float | None]:
        """The observation to run now, or (None, seconds to wait; None = until notified)."""
        if self._pending is None:
            return None, None
        if self._state == STATE_FAILED and self._clock() < self._retry_at:
            return None, self._poll_s
        if self.mode == MODE_THRESHOLD:
            depth = float(self._depth_fn())
            if not depth < self.threshold_s:  # also waits on NaN depth
                if not self._waiting_for_depth:
                    self._counts["threshold_waits"] += 1
                    self._waiting_for_depth = True
                return None, self._poll_s
            self._waiting_for_depth = False
        obs, self._pending = self._pending, None
        self._busy = True
        return obs, None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    obs, wait_s = self._take_locked()
                    if obs is not None:
                        break
                    self._cond.wait(wait_s)
            try:
                self._predict_one(obs)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _predict_one(self, obs: Observation) -> None:
        started = self._clock()
        try:
            prefix = None if self._prefix_fn is None else self._prefix_fn(obs)
            extra = {} if prefix is None or len(prefix) == 0 else {"forced_prefix": prefix}
            chunk = self.engine.predict(obs.image, obs.instruction, stamp=obs.stamp, unnorm_key=self.unnorm_key,
                                        **extra)
            if not isinstance(chunk, ActionChunk):
                raise TypeError(f"engine returned {type(chunk).__name__}, not an ActionChunk")
            if not chunk.is_finite:
                raise NonFiniteChunkError(f"engine returned non-finite actions {chunk.actions.tolist()}")
        except Exception as exc:  # any engine failure is counted, reported and survived
            self._record_error(exc)
            return
        done = self._clock()
        with self._cond:
            self._counts["predictions"] += 1
            self._consecutive_errors = 0
            if self._state == STATE_FAILED:
                self._counts["recoveries"] += 1
                logger.info("inference recovered after failure")
            if self._state != STATE_STOPPED:
                self._state = STATE_RUNNING
            self._done_times.append(done)
            self._predict_ms.append(1000.0 * (done - started))
            self._latency_ms.append(1000.0 * (done - obs.stamp))
            self._last_timings = dict(chunk.timings_ms)
            self._last_forced_steps = chunk.forced_steps
            for stage, ms in chunk.timings_ms.items():
                self._stage_ms.setdefault(stage, deque(maxlen=self._done_times.maxlen)).append(float(ms))
            stopping = self._stopping
        if stopping:
            return
        try:
            self._on_chunk(chunk, obs.epoch)
            with self._cond:
                self._counts["chunks"] += 1
        except Exception:
            logger.exception("on_chunk callback failed")
            with self._cond:
                self._counts["callback_errors"] += 1

    def _record_error(self, exc: BaseException) -> None:
        with self._cond:
            self._counts["errors"] += 1
            if isinstance(exc, NonFiniteChunkError):
                self._counts["non_finite"] += 1
            self._consecutive_errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._consecutive_errors >= self.max_consecutive_errors and self._state != STATE_STOPPED:
                if self._state != STATE_FAILED:
                    self._counts["failures"] += 1
                    logger.error("inference failed %d times in a row: %s", self._consecutive_errors,
                                 self._last_error)
                self._state = STATE_FAILED
                self._retry_at = self._clock() + self.backoff_s
            else:
                logger.warning("inference error %d/%d: %s", self._consecutive_errors,
                               self.max_consecutive_errors, self._last_error)
            state = self._state
        if self._on_error is not None:
            try:
                self._on_error(exc, state)
            except Exception:
                logger.exception("on_error callback failed")

    # ------------------------------------------------------------------ status
    def latency_p95_s(self) -> float | None:
        """p95 of the observation-to-chunk latency over the statistics window (None before any chunk)."""
        with self._cond:
            return float(np.percentile(self._latency_ms, 95)) / 1000.0 if self._latency_ms else None

    def status(self) -> dict:
        with self._cond:
            done = list(self._done_times)
            hz = (len(done) - 1) / (done[-1] - done[0]) if len(done) >= 2 and done[-1] > done[0] else 0.0

            def pct(values, q):
                return float(np.percentile(values, q)) if values else None

            return {
                "state": self._state,
                "busy": self._busy,
                "mode": self.mode,
                "pending": self._pending is not None,
                **self._counts,
                "consecutive_errors": self._consecutive_errors,
                "last_error": self._last_error,
                "retry_in_s": max(0.0, self._retry_at - self._clock()) if self._state == STATE_FAILED else 0.0,
                "inference_hz": hz,
                "predict_ms_p50": pct(self._predict_ms, 50),
                "predict_ms_p95": pct(self._predict_ms, 95),
                "latency_ms_p50": pct(self._latency_ms, 50),
                "latency_ms_p95": pct(self._latency_ms, 95),
                "timings_ms": dict(self._last_timings),
                "forced_steps": self._last_forced_steps,
                "timings_ms_mean": {k: float(np.mean(v)) for k, v in self._stage_ms.items()},
            }
