"""Scheduling of the background inference worker (openvla_ros.control.inference_worker).

The engine here is a small deterministic implementation of the Engine protocol (actions from the
image mean, failures on demand); the worker with the real torch engine is tested elsewhere.
"""
import os
import threading

import numpy as np
import pytest

from openvla_ros.control.inference_worker import (
    EngineProcessError, InferenceWorker, NonFiniteChunkError, Observation, ProcessEngine,
)
from conftest import ManualClock as FakeClock
from openvla_ros.engines.base import ActionChunk, Engine

NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
WAIT_S = 10.0  # generous upper bound for events; tests finish far sooner




class MeanEngine:
    """Actions = image mean / 255 in every cell; optional cost on a fake clock, gate, failures."""

    name = "mean"
    dim_names = NAMES
    dt = 0.2
    chunk_len = 2

    def __init__(self, clock=None, cost_s=0.0, gated=False):
        self.clock = clock
        self.cost_s = cost_s
        self.release = threading.Event()
        if not gated:
            self.release.set()
        self.started = threading.Event()
        self.calls = []
        self.fail_next = 0
        self.nan_next = 0
        self.wrong_type_next = 0

    def predict(self, image, instruction, *, stamp=0.0, unnorm_key=None):
        self.calls.append((float(image.mean()), instruction, stamp))
        self.started.set()
        assert self.release.wait(WAIT_S)
        if self.clock is not None:
            self.clock.advance(self.cost_s)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError(f"engine failure on call {len(self.calls)}")
        if self.wrong_type_next:
            self.wrong_type_next -= 1
            return {"action": [0.0] * 7}
        actions = np.full((2, 7), image.mean() / 255.0)
        if self.nan_next:
            self.nan_next -= 1
            actions[1, 3] = np.nan
        return ActionChunk(actions, NAMES, self.dt, stamp=stamp,
                           timings_ms={"vision": 2.0 * len(self.calls), "decode": 5.0})

    def info(self):
        return {"engine": self.name}


def make_process_engine():
    """Module-level factory, picklable for the spawned child process."""
    return MeanEngine()


class CrashableEngine(MeanEngine):
    def predict(self, image, instruction, *, stamp=0.0, unnorm_key=None):
        if instruction == "crash":
            os._exit(3)
        chunk = super().predict(image, instruction, stamp=stamp, unnorm_key=unnorm_key)
        chunk.timings_ms["pid"] = float(os.getpid())
        return chunk


def make_crashable_engine():
    return CrashableEngine()


class Collector:
    """on_chunk / on_error sink with an event per count reached."""

    def __init__(self):
        self.chunks = []
        self.errors = []
        self.cond = threading.Condition()

    def on_chunk(self, chunk, epoch):
        with self.cond:
            self.chunks.append((chunk, epoch))
            self.cond.notify_all()

    def on_error(self, exc, state):
        with self.cond:
            self.errors.append((exc, state))
            self.cond.notify_all()

    def wait_chunks(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.chunks) >= n, WAIT_S), f"{len(self.chunks)} chunks < {n}"

    def wait_errors(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.errors) >= n, WAIT_S), f"{len(self.errors)} errors < {n}"


def wait_until(predicate, timeout=WAIT_S):
    tick = threading.Event()
    for _ in range(int(timeout / 0.002)):
        if predicate():
            return True
        tick.wait(0.002)
    return predicate()


def image(value):
    return np.full((4, 4, 3), value, dtype=np.uint8)


def test_mean_engine_honours_the_engine_protocol():
    assert isinstance(MeanEngine(), Engine)


def test_newest_observation_wins_and_dropped_frames_are_counted():
    engine = MeanEngine(gated=True)
    sink = Collector()
    with InferenceWorker(engine, sink.on_chunk) as worker:
        assert worker.submit(Observation(image(51), "pick", 1.0, 7))
        assert engine.started.wait(WAIT_S)  # frame 1 is being predicted
        assert worker.submit((image(102), "pick", 2.0, 7))
        assert not worker.submit((image(204), "pick", 3.0, 8))  # replaces frame 2
        engine.release.set()
        sink.wait_chunks(2)
        status = worker.status()
    assert [c.actions[0, 0] for c, _ in sink.chunks] == [pytest.approx(0.2), pytest.approx(0.8)]
    assert [c.stamp for c, _ in sink.chunks] == [1.0, 3.0]
    assert [epoch for _, epoch in sink.chunks] == [7, 8]
    assert [call[2] for call in engine.calls] == [1.0, 3.0]
    assert status["dropped"] == 1 and status["submitted"] == 3 and status["predictions"] == 2
    assert worker.state == "stopped"


def test_status_reports_rates_latencies_and_stage_timings_on_the_injected_clock():
    clock = FakeClock(0.0)
    engine = MeanEngine(clock=clock, cost_s=0.1)
    sink = Collector()
    with InferenceWorker(engine, sink.on_chunk, clock=clock) as worker:
        for n in range(1, 4):
            worker.submit((image(10 * n), "pick", clock() - 0.05, 0))  # stamp 50 ms before submit
            sink.wait_chunks(n)
        status = worker.status()
    # Completions at t = 0.1, 0.2, 0.3 -> 10 Hz; each predict takes 100 ms; stamp -> ready 150 ms.
    assert status["inference_hz"] == pytest.approx(10.0)
    assert status["predict_ms_p50"] == pytest.approx(100.0) and status["predict_ms_p95"] == pytest.approx(100.0)
    assert status["latency_ms_p50"] == pytest.approx(150.0)
    assert status["timings_ms"] == {"vision": 6.0, "decode": 5.0}
    assert status["timings_ms_mean"] == {"vision": pytest.approx(4.0), "decode": pytest.approx(5.0)}
    assert status["chunks"] == 3 and status["errors"] == 0


def test_consecutive_errors_enter_failed_back_off_and_recover():
    clock = FakeClock(0.0)
    engine = MeanEngine()
    engine.fail_next = 3
    sink = Collector()
    worker = InferenceWorker(engine, sink.on_chunk, clock=clock, max_consecutive_errors=2, backoff_s=1.0,
                             on_error=sink.on_error).start()
    try:
        worker.submit((image(1), "pick", 0.0, 0))
        sink.wait_errors(1)
        assert worker.state == "running"  # one error is tolerated
        worker.submit((image(2), "pick", 0.1, 0))
        sink.wait_errors(2)
        assert [state for _, state in sink.errors] == ["running", "failed"]
        status = worker.status()
        assert status["state"] == "failed" and status["retry_in_s"] == pytest.approx(1.0)
        assert "engine failure on call 2" in status["last_error"]

        engine.started.clear()
        worker.submit((image(3), "pick", 0.2, 0))
        worker.wake()
        assert not engine.started.wait(0.1)  # backing off: the pending frame waits
        assert worker.status()["pending"]
        clock.advance(1.0)
        worker.wake()
        sink.wait_errors(3)  # the retry fails too: still failed, back-off restarted
        assert worker.state == "failed" and worker.status()["failures"] == 1

        worker.submit((image(4), "pick", 1.2, 0))
        clock.advance(1.0)
        worker.wake()
        sink.wait_chunks(1)
        assert wait_until(lambda: worker.status()["recoveries"] == 1)
        status = worker.status()
        assert status["state"] == "running" and status["consecutive_errors"] == 0 and status["errors"] == 3
        assert sink.chunks[0][0].stamp == 1.2
    finally:
        assert worker.stop()


def test_non_finite_and_wrong_type_results_count_as_errors_and_are_not_delivered():
    engine = MeanEngine()
    engine.nan_next = 1
    engine.wrong_type_next = 0
    sink = Collector()
    with InferenceWorker(engine, sink.on_chunk, max_consecutive_errors=5, on_error=sink.on_error) as worker:
        worker.submit((image(9), "pick", 0.0, 0))
        sink.wait_errors(1)
        engine.wrong_type_next = 1
        worker.submit((image(9), "pick", 0.1, 0))
        sink.wait_errors(2)
        worker.submit((image(9), "pick", 0.2, 0))
        sink.wait_chunks(1)
        status = worker.status()
    assert isinstance(sink.errors[0][0], NonFiniteChunkError)
    assert isinstance(sink.errors[1][0], TypeError)
    assert len(sink.chunks) == 1 and sink.chunks[0][0].stamp == 0.2
    assert status["non_finite"] == 1 and status["errors"] == 2 and status["state"] == "running"


def test_threshold_mode_waits_until_the_buffer_runs_low():
    depth = [0.5]
    engine = MeanEngine()
    sink = Collector()
    with InferenceWorker(engine, sink.on_chunk, mode="threshold", threshold_s=0.2,
                         depth_fn=lambda: depth[0]) as worker:
        worker.submit((image(5), "pick", 0.0, 0))
        assert wait_until(lambda: worker.status()["threshold_waits"] == 1)
        assert not engine.started.wait(0.05) and worker.status()["pending"]
        depth[0] = 0.1
        worker.wake()
        sink.wait_chunks(1)
    assert len(engine.calls) == 1


def test_stop_during_a_prediction_joins_cleanly_and_discards_its_chunk():
    engine = MeanEngine(gated=True)
    sink = Collector()
    worker = InferenceWorker(engine, sink.on_chunk).start()
    worker.submit((image(5), "pick", 0.0, 0))
    assert engine.started.wait(WAIT_S)
    assert not worker.stop(timeout=0.05)  # still inside predict
    assert worker.state == "stopped"
    assert not worker.submit((image(6), "pick", 0.1, 0))
    engine.release.set()
    assert worker.join(WAIT_S)
    assert sink.chunks == [] and len(engine.calls) == 1


def test_callback_errors_are_counted_and_survived():
    engine = MeanEngine()
    seen = []
    done = threading.Event()

    def flaky(chunk, epoch):
        seen.append(chunk.stamp)
        if len(seen) == 1:
            raise RuntimeError("buffer exploded")
        done.set()

    with InferenceWorker(engine, flaky) as worker:
        worker.submit((image(1), "pick", 0.0, 0))
        assert wait_until(lambda: worker.status()["callback_errors"] == 1)
        worker.submit((image(1), "pick", 0.1, 0))
        assert done.wait(WAIT_S)
        assert worker.status()["chunks"] == 1 and worker.state == "running"


def test_invalid_options_raise_value_error_naming_them():
    engine = MeanEngine()
    with pytest.raises(ValueError, match="sometimes"):
        InferenceWorker(engine, print, mode="sometimes")
    with pytest.raises(ValueError, match="depth_fn"):
        InferenceWorker(engine, print, mode="threshold")
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        InferenceWorker(engine, print, max_consecutive_errors=0)
    with pytest.raises(ValueError, match="factory"):
        InferenceWorker(engine, print, use_process=True)
    with pytest.raises(ValueError, match="on_chunk"):
        InferenceWorker(engine, None)


def test_process_option_runs_the_engine_in_a_child_and_restarts_it_after_a_crash():
    sink = Collector()
    worker = InferenceWorker(make_crashable_engine, sink.on_chunk, use_process=True,
                             max_consecutive_errors=5, on_error=sink.on_error).start()
    try:
        assert isinstance(worker.engine, ProcessEngine) and worker.engine.info()["process"]
        first_pid = worker.engine.pid
        assert first_pid != os.getpid()
        worker.submit((image(153), "pick", 0.5, 2))
        sink.wait_chunks(1)
        chunk, epoch = sink.chunks[0]
        assert chunk.actions[0, 0] == pytest.approx(0.6) and epoch == 2
        assert chunk.timings_ms["pid"] == first_pid

        worker.submit((image(1), "crash", 0.6, 2))
        sink.wait_errors(1)
        assert isinstance(sink.errors[0][0], EngineProcessError)
        assert "exited" in str(sink.errors[0][0]) and worker.engine.pid is None
        worker.submit((image(51), "pick", 0.7, 2))  # this call starts a fresh child
        sink.wait_chunks(2)
        new_pid = sink.chunks[1][0].timings_ms["pid"]
        assert new_pid == worker.engine.pid and new_pid != first_pid
        assert sink.chunks[1][0].actions[0, 0] == pytest.approx(0.2)
    finally:
        assert worker.stop()
    assert worker.engine.pid is None  # the child was closed


def failing_factory():
    raise RuntimeError("no checkpoint here")


def test_process_engine_reports_a_factory_failure():
    with pytest.raises(EngineProcessError, match="no checkpoint here"):
        ProcessEngine(failing_factory)


def test_worker_feeds_a_chunk_buffer_and_stale_epochs_are_discarded():
    from openvla_ros.control.chunk_buffer import ChunkBuffer

    clock = FakeClock(10.0)
    buffer = ChunkBuffer(clock=clock)
    results = []
    pushed = threading.Event()

    def push(chunk, epoch):
        results.append(buffer.push(chunk, epoch))
        pushed.set()

    with InferenceWorker(MeanEngine(), push, clock=clock) as worker:
        worker.submit((image(51), "pick", 10.0, buffer.epoch))
        assert pushed.wait(WAIT_S)
        pushed.clear()
        old_epoch = buffer.epoch
        buffer.reset()  # e.g. a new instruction while a frame of the old one is queued
        worker.submit((image(51), "pick", 10.01, old_epoch))
        assert pushed.wait(WAIT_S)
    assert [r.reason for r in results] == ["accepted", "stale_epoch"]
    assert buffer.sample(10.05).state == "underrun"
