"""The vla_node's ROS-free logic (openvla_ros.control.vla_controller) with the real torch engine.

The clock is injected and only moves when a test advances it; inference runs on the worker thread
for real (tiny checkpoints), and tests wait for its results by counters, never by sleeping a guess.
Wrappers around the real engine inject failures (raise, NaN) or hold a prediction in flight.
"""
import math
import threading
import time

import numpy as np
import pytest

from openvla_ros.control.chunk_buffer import ChunkBuffer
from openvla_ros.control.vla_controller import (
    GRIPPER_MODES, HOLD_BAD_CAMERA, HOLD_DISABLED, HOLD_ENGINE_FAILED, HOLD_NO_CAMERA, HOLD_NO_INSTRUCTION, HOLD_STALE_CAMERA,
    HOLD_STOPPED, HOLD_UNDERRUN, VlaController, clamp_norm, map_gripper,
)
from conftest import ManualClock as FakeClock
from openvla_ros.engines.base import ActionChunk

WAIT_S = 20.0  # upper bound for the worker; predictions take tens of ms
PERIOD = 0.01  # 100 Hz control tick
INSTRUCTION = "pick up the screw"
OTHER_INSTRUCTION = "reach the red cube"




def wait_until(predicate, timeout=WAIT_S):
    """Poll (real time) until ``predicate()`` holds; False after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


def image(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)


def rpy_to_rotvec_reference(rpy):
    """Independent reference: R = Rz(yaw) Ry(pitch) Rx(roll), then the matrix logarithm."""
    r, p, y = rpy
    rx = np.array([[1, 0, 0], [0, math.cos(r), -math.sin(r)], [0, math.sin(r), math.cos(r)]])
    ry = np.array([[math.cos(p), 0, math.sin(p)], [0, 1, 0], [-math.sin(p), 0, math.cos(p)]])
    rz = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    m = rz @ ry @ rx
    angle = math.acos(max(-1.0, min(1.0, (np.trace(m) - 1) / 2)))
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def expected_twist(engine, img, instruction, index=0):
    chunk = engine.predict(img, instruction)
    action = chunk.actions[index]
    return action[:3] / chunk.dt, rpy_to_rotvec_reference(action[3:6]) / chunk.dt, action[6]


def make_controller(engine, clock, **kwargs):
    buffer = ChunkBuffer(clock=clock, control_period_s=PERIOD)
    worker_options = kwargs.pop("worker_options", {})
    return VlaController(engine, buffer, clock=clock, worker_options=worker_options, **kwargs).start()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def controllers():
    made = []
    yield made
    for c in made:
        c.shutdown()


def new_controller(controllers, engine, clock, **kwargs):
    c = make_controller(engine, clock, **kwargs)
    controllers.append(c)
    return c


def feed_and_wait(ctrl, clock, img, *, accepted=None):
    """Submit a frame stamped now and wait until the worker delivered a chunk for it."""
    before = ctrl.worker.status()["predictions"] + ctrl.worker.status()["errors"]
    assert ctrl.on_image(img, clock())
    assert wait_until(lambda: ctrl.worker.status()["predictions"] + ctrl.worker.status()["errors"] > before
                      and not ctrl.worker.status()["busy"])
    if accepted is not None:
        assert wait_until(lambda: ctrl.buffer.status()["accepted"] >= accepted)


class ScriptedEngine:
    """The real engine behind a switchboard: raise, answer NaN, or block until released."""

    def __init__(self, engine):
        self.engine = engine
        self.name = "scripted-" + engine.name
        self.dim_names = engine.dim_names
        self.dt = engine.dt
        self.chunk_len = engine.chunk_len
        self.raise_next = 0
        self.nan_next = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.instructions = []

    def info(self):
        return self.engine.info()

    def predict(self, image, instruction, *, stamp=0.0, unnorm_key=None):
        self.instructions.append(instruction)
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        if self.raise_next > 0:
            self.raise_next -= 1
            raise RuntimeError("injected engine failure")
        chunk = self.engine.predict(image, instruction, stamp=stamp, unnorm_key=unnorm_key)
        if self.nan_next > 0:
            self.nan_next -= 1
            actions = chunk.actions.copy()
            actions[:, 0] = np.nan
            return ActionChunk(actions, chunk.dim_names, chunk.dt, stamp=chunk.stamp)
        return chunk


@pytest.fixture(scope="module")
def chunk_engine(tiny_chunk_checkpoint):
    from openvla_ros.engines.torch_engine import TorchEngine

    return TorchEngine(tiny_chunk_checkpoint)


def test_nothing_moves_until_enabled_then_the_twist_is_the_models_delta_over_dt(torch_engine, clock, controllers):
    ctrl = new_controller(controllers, torch_engine, clock)
    img = image(1)
    ctrl.set_instruction(INSTRUCTION)
    for _ in range(5):
        assert ctrl.on_image(img, clock())
        out = ctrl.tick(PERIOD)
        assert out.state == HOLD_DISABLED and not out.moving
        clock.advance(PERIOD)
    assert ctrl.worker.status()["submitted"] == 0  # no inference while disabled
    assert ctrl.status()["state"] == HOLD_DISABLED

    ctrl.set_enabled(True)
    feed_and_wait(ctrl, clock, img, accepted=1)
    clock.advance(0.03)
    out = ctrl.tick(PERIOD)
    linear, angular, gripper = expected_twist(torch_engine, img, INSTRUCTION)
    assert out.state == "ok" and out.moving
    np.testing.assert_allclose(out.linear, linear, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.angular, angular, rtol=1e-7, atol=1e-10)
    assert out.gripper == pytest.approx(gripper)
    assert ctrl.status()["state"] == "ok"


def test_no_instruction_and_no_camera_hold(torch_engine, clock, controllers):
    ctrl = new_controller(controllers, torch_engine, clock, start_enabled=True)
    out = ctrl.tick(PERIOD)
    assert out.state == HOLD_NO_INSTRUCTION and not out.moving
    assert ctrl.on_image(image(2), clock())
    assert ctrl.tick(PERIOD).state == HOLD_NO_INSTRUCTION
    assert ctrl.worker.status()["submitted"] == 0
    assert not ctrl.set_instruction("   ")  # blank text is refused and counted
    assert ctrl.status()["bad_instructions"] == 1 and ctrl.instruction is None

    ctrl2 = new_controller(controllers, torch_engine, clock, start_enabled=True)
    ctrl2.set_instruction(INSTRUCTION)
    assert ctrl2.tick(PERIOD).state == HOLD_NO_CAMERA


def test_stale_camera_holds_flushes_the_old_plan_and_recovers_on_fresh_frames(chunk_engine, clock, controllers):
    # K=4 actions of 0.2 s: a chunk stamped t covers [t, t+0.8), longer than the 0.5 s timeout.
    engine = ScriptedEngine(chunk_engine)
    ctrl = new_controller(controllers, engine, clock, start_enabled=True, stale_image_timeout_s=0.5)
    ctrl.set_instruction(INSTRUCTION)
    img = image(3)
    feed_and_wait(ctrl, clock, img, accepted=1)
    clock.advance(0.1)
    assert ctrl.tick(PERIOD).moving
    epoch = ctrl.buffer.epoch

    clock.advance(0.45)  # newest frame now 0.55 s old; its chunk would still cover until +0.8
    out = ctrl.tick(PERIOD)
    assert out.state == HOLD_STALE_CAMERA and not out.moving
    assert ctrl.status()["state"] == HOLD_STALE_CAMERA
    assert ctrl.buffer.epoch == epoch + 1 and ctrl.counters.stale_flushes == 1

    # A fresh frame arrives: before its chunk is in, the old plan must not resume.
    clock.advance(0.05)
    engine.gate.clear()
    engine.entered.clear()
    fresh = image(4)
    assert ctrl.on_image(fresh, clock())
    assert engine.entered.wait(WAIT_S)  # its prediction is in flight
    out = ctrl.tick(PERIOD)
    assert out.state == HOLD_UNDERRUN and not out.moving  # old chunk (covering until +0.8) was flushed
    engine.gate.set()
    assert wait_until(lambda: ctrl.buffer.status()["accepted"] >= 2)
    clock.advance(0.02)
    out = ctrl.tick(PERIOD)
    linear, _, _ = expected_twist(chunk_engine, fresh, INSTRUCTION)
    assert out.state == "ok"
    np.testing.assert_allclose(out.linear, linear, rtol=1e-9, atol=1e-12)


def test_bad_frames_are_counted_never_crash_and_never_reach_the_engine(torch_engine, clock, controllers):
    ctrl = new_controller(controllers, torch_engine, clock, start_enabled=True)
    ctrl.set_instruction(INSTRUCTION)
    good = image(5)
    bad_frames = [
        (good[:, :, 0], clock()),  # HxW
        (good.astype(np.float32), clock()),  # wrong dtype
        (np.zeros((8, 8, 4), np.uint8), clock()),  # 4 channels
        (np.zeros((1, 1, 3), np.uint8), clock()),  # too small
        (None, clock()),
        ("not an image", clock()),
        (good, float("nan")),  # bad stamp
        (good, None),
    ]
    for frame, stamp in bad_frames:
        assert ctrl.on_image(frame, stamp) is False
    ctrl.on_bad_image("unsupported image encoding 'yuv422_weird'")
    status = ctrl.status()
    assert status["bad_images"] == len(bad_frames) + 1
    assert status["images"] == 0 and ctrl.worker.status()["submitted"] == 0
    assert "yuv422_weird" in status["last_error"]
    assert ctrl.tick(PERIOD).state == HOLD_BAD_CAMERA  # frames arrive, but none is usable
    feed_and_wait(ctrl, clock, good, accepted=1)  # good frames still work
    assert ctrl.tick(PERIOD).moving


def test_engine_failures_hold_then_recover_after_backoff(torch_engine, clock, controllers):
    engine = ScriptedEngine(torch_engine)
    engine.raise_next = 2
    ctrl = new_controller(controllers, engine, clock, start_enabled=True,
                          worker_options={"max_consecutive_errors": 2, "backoff_s": 1.0})
    ctrl.set_instruction(INSTRUCTION)
    feed_and_wait(ctrl, clock, image(6))
    assert ctrl.worker.state == "running" and ctrl.worker.status()["errors"] == 1
    clock.advance(0.05)
    feed_and_wait(ctrl, clock, image(7))
    assert ctrl.worker.state == "failed"
    out = ctrl.tick(PERIOD)
    assert out.state == HOLD_ENGINE_FAILED and not out.moving
    status = ctrl.status()
    assert status["state"] == HOLD_ENGINE_FAILED and "injected engine failure" in status["last_error"]

    clock.advance(0.1)  # still inside the back-off: a new frame is held back
    img = image(8)
    assert ctrl.on_image(img, clock())
    assert not wait_until(lambda: ctrl.worker.status()["predictions"] > 0, timeout=0.2)
    assert ctrl.tick(PERIOD).state == HOLD_ENGINE_FAILED

    clock.advance(1.0)  # back-off over: the newest frame is retried and succeeds
    img = image(9)
    assert ctrl.on_image(img, clock())
    assert wait_until(lambda: ctrl.buffer.status()["accepted"] >= 1)
    assert ctrl.worker.state == "running"
    clock.advance(0.02)
    out = ctrl.tick(PERIOD)
    assert out.state == "ok"
    np.testing.assert_allclose(out.linear, expected_twist(torch_engine, img, INSTRUCTION)[0], rtol=1e-9)


def test_a_nan_chunk_never_moves_the_arm(torch_engine, clock, controllers):
    engine = ScriptedEngine(torch_engine)
    engine.nan_next = 1
    ctrl = new_controller(controllers, engine, clock, start_enabled=True)
    ctrl.set_instruction(INSTRUCTION)
    feed_and_wait(ctrl, clock, image(10))
    assert ctrl.worker.status()["non_finite"] == 1 and ctrl.buffer.status()["accepted"] == 0
    for _ in range(30):
        out = ctrl.tick(PERIOD)
        assert not out.moving and out.state == HOLD_UNDERRUN
        assert np.all(np.isfinite(out.linear)) and np.all(np.isfinite(out.angular))
        clock.advance(PERIOD)
    # A NaN chunk offered straight to the buffer (bypassing the worker's check) is refused too.
    chunk = torch_engine.predict(image(11), INSTRUCTION, stamp=clock())
    chunk.actions[0, 3] = np.inf
    ctrl._on_chunk(chunk, ctrl.buffer.epoch)
    assert ctrl.buffer.status()["non_finite"] == 1
    assert not ctrl.tick(PERIOD).moving


def test_new_instruction_discards_the_chunk_in_flight_for_the_old_one(torch_engine, clock, controllers):
    engine = ScriptedEngine(torch_engine)
    ctrl = new_controller(controllers, engine, clock, start_enabled=True)
    ctrl.set_instruction(INSTRUCTION)
    engine.gate.clear()
    img = np.zeros((96, 128, 3), np.uint8)  # a frame on which the tiny model's two answers differ
    assert ctrl.on_image(img, clock())
    assert engine.entered.wait(WAIT_S)  # the old instruction's prediction is in flight
    epoch = ctrl.buffer.epoch
    assert ctrl.set_instruction(OTHER_INSTRUCTION)
    assert ctrl.buffer.epoch == epoch + 1
    assert ctrl.set_instruction(OTHER_INSTRUCTION) and ctrl.buffer.epoch == epoch + 2  # repeated text: a new start, flushed too
    engine.gate.set()
    assert wait_until(lambda: ctrl.buffer.status()["rejected_by_reason"].get("stale_epoch") == 1)
    clock.advance(0.02)
    assert not ctrl.tick(PERIOD).moving

    feed_and_wait(ctrl, clock, img, accepted=1)
    assert engine.instructions == [INSTRUCTION, OTHER_INSTRUCTION]
    clock.advance(0.02)
    out = ctrl.tick(PERIOD)
    new_linear = expected_twist(torch_engine, img, OTHER_INSTRUCTION)[0]
    old_linear = expected_twist(torch_engine, img, INSTRUCTION)[0]
    assert not np.allclose(new_linear, old_linear)  # the two instructions give different actions
    np.testing.assert_allclose(out.linear, new_linear, rtol=1e-9)


def test_stop_holds_until_enabled_again(torch_engine, clock, controllers):
    ctrl = new_controller(controllers, torch_engine, clock, start_enabled=True)
    ctrl.set_instruction(INSTRUCTION)
    feed_and_wait(ctrl, clock, image(13), accepted=1)
    assert ctrl.tick(PERIOD).moving
    ctrl.stop()
    submitted = ctrl.worker.status()["submitted"]
    for i in range(5):
        clock.advance(PERIOD)
        assert ctrl.on_image(image(14 + i), clock())
        out = ctrl.tick(PERIOD)
        assert out.state == HOLD_STOPPED and not out.moving
    assert ctrl.worker.status()["submitted"] == submitted  # no inference while stopped
    ctrl.set_enabled(False)  # disabling does not leave the stopped state
    assert ctrl.tick(PERIOD).state == HOLD_STOPPED
    ctrl.set_enabled(True)
    clock.advance(PERIOD)
    feed_and_wait(ctrl, clock, image(20), accepted=2)
    clock.advance(0.02)
    assert ctrl.tick(PERIOD).moving


@pytest.mark.parametrize("mode, invert, g, expected", [
    ("identity", False, 0.8, 0.8), ("identity", True, 0.8, 0.2),
    ("signed", False, 0.8, 0.6), ("signed", True, 0.8, -0.6), ("signed", False, 0.0, -1.0),
    ("binary", False, 0.8, 1.0), ("binary", False, 0.2, -1.0), ("binary", True, 0.8, -1.0),
    ("binary", False, 0.5, 0.0),
])
def test_gripper_mapping_modes(mode, invert, g, expected):
    assert map_gripper(g, mode, invert) == pytest.approx(expected)


def test_gripper_mapping_rejects_bad_modes_and_passes_no_command_through():
    assert map_gripper(None, "signed") is None
    assert map_gripper(float("nan"), "identity") is None
    with pytest.raises(ValueError, match="'clamp'"):
        map_gripper(0.5, "clamp")
    assert set(GRIPPER_MODES) == {"identity", "signed", "binary"}


def test_controller_applies_the_gripper_mode_and_speed_clamps(torch_engine, clock, controllers):
    ctrl = new_controller(controllers, torch_engine, clock, start_enabled=True, gripper_mode="signed",
                          gripper_invert=True, max_linear_speed=0.05, max_angular_speed=0.2)
    ctrl.set_instruction(INSTRUCTION)
    img = image(21)
    feed_and_wait(ctrl, clock, img, accepted=1)
    clock.advance(0.02)
    out = ctrl.tick(PERIOD)
    linear, angular, g = expected_twist(torch_engine, img, INSTRUCTION)
    assert np.linalg.norm(linear) > 0.05 and np.linalg.norm(angular) > 0.2  # both limits bite
    np.testing.assert_allclose(out.linear, linear * 0.05 / np.linalg.norm(linear), rtol=1e-9)
    np.testing.assert_allclose(out.angular, angular * 0.2 / np.linalg.norm(angular), rtol=1e-7)
    assert out.gripper == pytest.approx(min(1.0, max(-1.0, -(2 * g - 1))))  # the command stays in -1..1
    assert ctrl.status()["clamped_ticks"] == 1


def test_clamp_norm_keeps_short_vectors_and_scales_long_ones():
    v, clamped = clamp_norm(np.array([0.3, 0.4, 0.0]), 1.0)
    assert not clamped and np.array_equal(v, [0.3, 0.4, 0.0])
    v, clamped = clamp_norm(np.array([3.0, 4.0, 0.0]), 1.0)
    assert clamped and np.allclose(v, [0.6, 0.8, 0.0])


@pytest.mark.parametrize("kwargs, needle", [
    ({"stale_image_timeout_s": 0.0}, "stale_image_timeout_s.*0.0"),
    ({"stale_image_timeout_s": float("nan")}, "stale_image_timeout_s.*nan"),
    ({"max_linear_speed": -1.0}, "max_linear_speed.*-1.0"),
    ({"max_angular_speed": 0}, "max_angular_speed.*0"),
    ({"gripper_mode": "weird"}, "'weird'"),
])
def test_invalid_options_raise_value_error_naming_them(torch_engine, clock, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        VlaController(torch_engine, ChunkBuffer(clock=clock), clock=clock, **kwargs)
