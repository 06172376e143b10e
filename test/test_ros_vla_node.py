"""vla_node with real rclpy, in-process, running the real torch engine on tiny checkpoints.

A probe node (test/ros_helpers.py) streams camera frames, publishes the latched instruction,
calls the services and records every output topic. Each node spins on its own
SingleThreadedExecutor thread. The measured twist rate is only a liveness bound.
"""
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.imaging import rgb_to_image_fields
from openvla_ros.nodes.ros_common import latched_qos, stamp_to_seconds

pytestmark = pytest.mark.ros

CONFIG = Path(__file__).resolve().parents[1] / "config" / "vla_node.yaml"
INSTRUCTION = "pick up the screw"
CAMERA_HZ = 30.0
TIMEOUT = 10.0  # upper bound for anything to happen; the tests finish far sooner

TWIST = "/vla/eef_delta"
GRIPPER = "/vla/gripper_command"
CHUNK = "/vla/action_chunk"
STATUS = "/vla/status"


def stripes() -> np.ndarray:
    """A frame whose colour channels matter to the tiny models (swapping R and B changes the answer)."""
    img = np.zeros((96, 128, 3), np.uint8)
    img[:, :40, 0] = 255
    img[:, 40:80, 1] = 180
    img[:, 80:, 2] = 60
    return img


def image_message(fields, stamp, encoding=None):
    from sensor_msgs.msg import Image

    msg = Image(height=fields.height, width=fields.width, encoding=encoding or fields.encoding,
                is_bigendian=fields.is_bigendian, step=fields.step, data=fields.data.tobytes())
    msg.header.stamp = stamp
    return msg


def status_values(msg) -> dict:
    return {kv.key: kv.value for kv in msg.status[0].values}


def is_zero(twist_msg) -> bool:
    t = twist_msg.twist
    return all(v == 0.0 for v in (t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z))


def linear_of(twist_msg) -> np.ndarray:
    t = twist_msg.twist.linear
    return np.array([t.x, t.y, t.z])


class Camera:
    """Streams one frame from the probe at CAMERA_HZ and remembers the stamps it sent."""

    def __init__(self, probe, fields, encoding=None):
        self.probe, self.fields, self.encoding = probe, fields, encoding
        self.stamps: list[float] = []
        self.bad_every = 0  # > 0: every n-th frame goes out with an unknown encoding
        self._count = 0

    def _next(self):
        stamp = self.probe.now_msg()
        self._count += 1
        if self.bad_every and self._count % self.bad_every == 0:
            return image_message(self.fields, stamp, encoding="yuv422_weird")
        self.stamps.append(stamp_to_seconds(stamp))
        return image_message(self.fields, stamp, self.encoding)

    def start(self):
        from sensor_msgs.msg import Image

        self.probe.stream(Image, "/camera/image_raw", CAMERA_HZ, self._next)

    def stop(self):
        self.probe.stop_stream("/camera/image_raw")


@pytest.fixture
def start_vla(rclpy_context, probe):
    """Start vla_node (in-process, own executor thread) with the given engine and ROS arguments."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import Float64
    from trajectory_msgs.msg import JointTrajectory

    from openvla_ros.nodes.vla_node import make_node

    for msg_type, topic in ((TwistStamped, TWIST), (Float64, GRIPPER), (JointTrajectory, CHUNK),
                            (DiagnosticArray, STATUS)):
        probe.record(msg_type, topic)
    started = []

    def start(engine, **node_kwargs):
        node = make_node(engine=engine, context=rclpy_context, **node_kwargs)
        started.append(spin_in_background(node, rclpy_context))
        return node

    yield start
    for spinner in started:
        spinner.stop()


def wait_status(probe, predicate, since=None, timeout=TIMEOUT):
    return probe.wait_for(STATUS, lambda m: predicate(status_values(m)), timeout=timeout, since=since)


def test_follows_the_latched_instruction_after_enable_publishes_all_outputs_and_stops(torch_engine, probe, start_vla):
    from std_msgs.msg import String
    from std_srvs.srv import SetBool, Trigger

    img = stripes()
    expected = torch_engine.predict(img, INSTRUCTION)  # computed before the node shares the engine
    assert not np.allclose(expected.actions, torch_engine.predict(img[..., ::-1].copy(), INSTRUCTION).actions)
    # The instruction is published (latched) before the node exists: transient_local must deliver it.
    probe.publish(String, "/vla/instruction", String(data=INSTRUCTION), qos=latched_qos())
    camera = Camera(probe, rgb_to_image_fields(img, "rgb8", row_padding=7))
    camera.start()
    start_vla(torch_engine, cli_args=["--ros-args", "--params-file", str(CONFIG),
                                      "-p", "base_frame:=test_base", "-p", "status_rate_hz:=10.0"])

    status = wait_status(probe, lambda v: v["state"] == "disabled" and v["instruction"] == INSTRUCTION)
    assert status is not None, "latched instruction not received or node not disabled at start"
    assert probe.wait_for(TWIST) is not None
    assert all(is_zero(m) for m in probe.messages(TWIST)), "moved before ~/enable"
    assert int(status_values(status)["worker.submitted"]) == 0

    reply = probe.call(SetBool, "/vla_node/enable", SetBool.Request(data=True))
    assert reply.success
    first_move = probe.wait_for(TWIST, lambda m: not is_zero(m))
    assert first_move is not None, "no motion after ~/enable"

    window_start = time.monotonic()
    time.sleep(2.0)
    window = probe.received(TWIST, since=window_start)
    window = [r for r in window if r.time < window_start + 2.0]
    rate_hz = len(window) / 2.0
    assert rate_hz > 50.0, f"twist stream at {rate_hz:.1f} Hz"  # liveness only; 100 Hz configured
    assert {r.msg.header.frame_id for r in window} == {"test_base"}
    moving = [r.msg for r in window if not is_zero(r.msg)]
    # Mostly moving; a loaded CPU can stretch inference past dt and cause short underruns.
    assert len(moving) > 0.5 * len(window), f"{len(moving)} of {len(window)} twists moving"
    # Same frame every time, replace policy: the twist is the model's delta over dt.
    np.testing.assert_allclose(linear_of(moving[-1]), expected.actions[0, :3] / expected.dt, rtol=1e-9)

    chunks = probe.messages(CHUNK)
    assert chunks, "no /vla/action_chunk"
    chunk = chunks[-1]
    assert list(chunk.joint_names) == list(torch_engine.dim_names)
    assert len(chunk.points) == expected.chunk_len
    np.testing.assert_allclose(chunk.points[0].positions, expected.actions[0], rtol=1e-12)
    assert min(abs(stamp_to_seconds(chunk.header.stamp) - s) for s in camera.stamps) < 1e-6
    grippers = probe.messages(GRIPPER)
    assert grippers and grippers[-1].data == pytest.approx(expected.actions[0, 6])

    status = wait_status(probe, lambda v: v["state"] == "ok" and float(v["worker.inference_hz"]) > 0)
    assert status is not None
    values = status_values(status)
    for key in ("worker.latency_ms_p50", "worker.latency_ms_p95", "buffer.depth_s", "worker.dropped",
                "worker.timings_ms.total", "image_age_s"):
        assert key in values, key
    assert float(values["worker.latency_ms_p95"]) >= float(values["worker.latency_ms_p50"]) > 0
    assert status.status[0].message == "ok" and status.status[0].level == b"\x00"

    reply = probe.call(Trigger, "/vla_node/stop", Trigger.Request())
    assert reply.success
    after_stop = time.monotonic()
    time.sleep(0.3)
    stopped = probe.messages(TWIST, since=after_stop)
    assert len(stopped) > 10 and all(is_zero(m) for m in stopped)
    assert wait_status(probe, lambda v: v["state"] == "stopped", since=after_stop) is not None
    camera.stop()


def test_bgr8_padded_frames_with_a_chunked_model_and_unknown_encodings(tiny_chunk_checkpoint, probe, start_vla):
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    from openvla_ros.engines.torch_engine import TorchEngine

    engine = TorchEngine(tiny_chunk_checkpoint)  # K = 4 actions per chunk
    img = stripes()
    expected = engine.predict(img, INSTRUCTION)
    assert expected.chunk_len == 4
    assert not np.allclose(expected.actions, engine.predict(img[..., ::-1].copy(), INSTRUCTION).actions)
    probe.publish(String, "/vla/instruction", String(data=INSTRUCTION), qos=latched_qos())
    camera = Camera(probe, rgb_to_image_fields(img, "bgr8", row_padding=13))
    camera.bad_every = 3
    camera.start()
    start_vla(engine, parameter_overrides=[Parameter("start_enabled", value=True),
                                           Parameter("status_rate_hz", value=10.0)])

    chunk = probe.wait_for(CHUNK)
    assert chunk is not None, "no chunk from bgr8 frames"
    assert len(chunk.points) == 4
    for i, point in enumerate(chunk.points):
        np.testing.assert_allclose(point.positions, expected.actions[i], rtol=1e-12)
        t = point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
        assert t == pytest.approx(i * expected.dt, abs=1e-9)

    status = wait_status(probe, lambda v: int(v["bad_images"]) >= 3 and v["state"] == "ok")
    assert status is not None, "bad frames not counted, or the node stopped following good ones"
    assert "yuv422_weird" in status_values(status)["last_error"]
    since = time.monotonic()
    assert probe.wait_for(TWIST, lambda m: not is_zero(m), since=since) is not None  # still following
    camera.stop()


def test_stale_camera_holds_within_the_timeout_and_recovers(torch_engine, probe, start_vla):
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    img = stripes()
    probe.publish(String, "/vla/instruction", String(data=INSTRUCTION), qos=latched_qos())
    camera = Camera(probe, rgb_to_image_fields(img, "rgb8"))
    camera.start()
    node = start_vla(torch_engine, parameter_overrides=[Parameter("start_enabled", value=True),
                                                        Parameter("status_rate_hz", value=10.0)])
    # stale_image_timeout_s is runtime-settable: the change must reach the controller.
    assert node.set_parameters([Parameter("stale_image_timeout_s", value=0.3)])[0].successful
    assert node.controller.stale_image_timeout_s == 0.3
    assert not node.set_parameters([Parameter("stale_image_timeout_s", value=-1.0)])[0].successful
    assert node.controller.stale_image_timeout_s == 0.3
    assert probe.wait_for(TWIST, lambda m: not is_zero(m)) is not None

    camera.stop()
    stopped_at = time.monotonic()
    assert wait_until(lambda: any(is_zero(m) for m in probe.messages(TWIST, since=stopped_at)), TIMEOUT)
    first_zero = next(r for r in probe.received(TWIST, since=stopped_at) if is_zero(r.msg))
    # Held within the timeout (plus a generous allowance for scheduling on a shared CPU).
    assert first_zero.time - stopped_at < 0.3 + 0.5
    time.sleep(0.2)
    held = probe.messages(TWIST, since=first_zero.time)
    assert len(held) > 5 and all(is_zero(m) for m in held)
    assert wait_status(probe, lambda v: v["state"] == "stale_camera", since=stopped_at) is not None

    camera.start()
    restarted = time.monotonic()
    assert probe.wait_for(TWIST, lambda m: not is_zero(m), since=restarted) is not None, "no recovery"
    camera.stop()


def test_compressed_transport_decodes_png_frames(torch_engine, probe, start_vla):
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import String

    from openvla_ros.imaging import encode_compressed_image

    img = stripes()
    expected = torch_engine.predict(img, INSTRUCTION)
    fmt, data = encode_compressed_image(img, "png")  # lossless, so the model sees the same pixels

    def frame():
        msg = CompressedImage(format=fmt, data=data.tobytes())
        msg.header.stamp = probe.now_msg()
        return msg

    probe.publish(String, "/vla/instruction", String(data=INSTRUCTION), qos=latched_qos())
    probe.stream(CompressedImage, "/camera/image_raw/compressed", CAMERA_HZ, frame)
    start_vla(torch_engine, parameter_overrides=[Parameter("start_enabled", value=True),
                                                 Parameter("image_transport", value="compressed")])
    chunk = probe.wait_for(CHUNK)
    assert chunk is not None, "no chunk from compressed frames"
    np.testing.assert_allclose(chunk.points[0].positions, expected.actions[0], rtol=1e-12)
    probe.stop_stream("/camera/image_raw/compressed")


def test_a_chunk_flushed_by_a_new_instruction_is_not_published_as_the_plan(torch_engine, probe, start_vla):
    """A chunk accepted just before an instruction change waits for the next tick to be published;
    by then the new instruction has flushed it from the plan, so /vla/action_chunk must not show it."""
    from openvla_ros.engines.base import ActionChunk

    node = start_vla(torch_engine)  # no camera: the only chunks are the ones handed to it here
    assert probe.wait_for(TWIST) is not None

    def chunk(stamp):
        return ActionChunk(np.zeros((2, 7)), list(torch_engine.dim_names), 0.2, stamp=stamp)

    with node._control_lock:  # as the worker and the instruction callback would, between two ticks
        node._on_chunk(chunk(1.0), node.controller.buffer.epoch, True)
        node.controller.set_instruction("reach the blue cube")
    time.sleep(0.3)
    assert probe.messages(CHUNK) == []
    with node._control_lock:
        node._on_chunk(chunk(2.0), node.controller.buffer.epoch, True)
    published = probe.wait_for(CHUNK)
    assert published is not None and stamp_to_seconds(published.header.stamp) == pytest.approx(2.0)
