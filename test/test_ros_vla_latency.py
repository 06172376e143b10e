"""vla_node (real rclpy) moves the arm at the model's own velocity whatever the inference latency.

The model answers `latency` seconds after each frame, as the released 7B does on real hardware
(0.17-0.25 s on a desktop GPU, 0.34-0.84 s on a Jetson): once through the real remote engine
against a deploy.py-style /act server on loopback that answers one 7-D action (1 cm over
dt = 0.2 s: 0.05 m/s intended), and with an in-process engine that answers K-action chunks after
the same kind of delay (the model itself cannot run here at that size; the worker, buffer and
control stream are the real ones). The twist stream's mean velocity is compared with delta / dt.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, wait_until  # noqa: F401
from test_ros_vla_node import CHUNK, INSTRUCTION, STATUS, TIMEOUT, TWIST, Camera, start_vla, status_values, stripes  # noqa: F401

from openvla_ros.engines import json_numpy
from openvla_ros.engines.base import ActionChunk
from openvla_ros.engines.remote import RemoteEngine
from openvla_ros.imaging import rgb_to_image_fields
from openvla_ros.nodes.ros_common import latched_qos
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES

pytestmark = pytest.mark.ros

VX = 0.05  # m/s the model intends: dx = VX * dt per action
MEASURE_S = 2.0  # seconds of twists averaged once the arm moves


class DeployStyleServer(ThreadingHTTPServer):
    """deploy.py's protocol: POST /act -> one bare json_numpy 7-D action, `latency` s later; no /info."""

    daemon_threads = True

    def __init__(self, latency_s: float, action):
        self.latency_s = latency_s
        self.answer = json.dumps(json_numpy.encode_array(np.asarray(action, dtype=np.float64))).encode()
        self.requests = 0
        super().__init__(("127.0.0.1", 0), _DeployHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/act"


class _DeployHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_error(404)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        time.sleep(self.server.latency_s)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.answer)))
        self.end_headers()
        self.wfile.write(self.server.answer)


class DelayedChunkEngine:
    """Answers K identical actions of VX * dt along x, `latency_s` after being asked (an Engine)."""

    name = "delayed_chunk"
    supports_forced_prefix = False

    def __init__(self, latency_s: float, chunk_len: int, dt: float):
        self.latency_s, self.chunk_len, self.dt = latency_s, chunk_len, dt
        self.dim_names = list(DEFAULT_ACTION_DIM_NAMES)

    def predict(self, image, instruction, *, stamp=0.0, unnorm_key=None):
        time.sleep(self.latency_s)
        actions = np.tile([VX * self.dt, 0, 0, 0, 0, 0, 1.0], (self.chunk_len, 1))
        return ActionChunk(actions=actions, dim_names=self.dim_names, dt=self.dt, stamp=stamp)

    def info(self):
        return {"engine": self.name}


def start_following(probe, start_vla, engine, execution):
    """vla_node following the latched instruction on a streaming camera; returns the camera.

    A generous camera timeout: on a loaded machine the probe's camera timer can stall for longer
    than the default 0.5 s, and a stale-camera flush is not what these tests measure.
    """
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    probe.publish(String, "/vla/instruction", String(data=INSTRUCTION), qos=latched_qos())
    camera = Camera(probe, rgb_to_image_fields(stripes(), "rgb8"))
    camera.start()
    start_vla(engine, parameter_overrides=[Parameter("start_enabled", value=True),
                                           Parameter("status_rate_hz", value=10.0),
                                           Parameter("stale_image_timeout_s", value=2.0),
                                           Parameter("execution", value=execution)])
    return camera


def measured_stream(probe, start_vla, engine, execution="auto"):
    """Mean twist x velocity over MEASURE_S after the first moving twist, the share of moving ticks,
    the largest step between consecutive twists there, and the last status."""
    camera = start_following(probe, start_vla, engine, execution)
    first = probe.wait_for(TWIST, lambda m: m.twist.linear.x != 0.0, timeout=TIMEOUT)
    assert first is not None, "the arm never moved"
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started > MEASURE_S, MEASURE_S + 5)
    camera.stop()
    xs = np.array([m.twist.linear.x for m in probe.messages(TWIST, since=started)])
    xs = xs[xs.size - int(MEASURE_S * 100) * 9 // 10:] if xs.size > 50 else xs  # the last ~1.8 s
    status = status_values(probe.messages(STATUS)[-1])
    return float(xs.mean()), float(np.mean(xs != 0.0)), float(np.abs(np.diff(xs)).max()), status


@pytest.mark.parametrize("latency", [0.1, 0.25, 0.5])
def test_a_one_action_deploy_style_server_moves_the_arm_at_its_intended_velocity(latency, probe, start_vla):
    server = DeployStyleServer(latency, [VX * 0.2, 0, 0, 0, 0, 0, 1.0])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = RemoteEngine(server.url)  # no /info: dims and dt = 0.2 s are the release's
        assert engine.chunk_len == 1 and engine.dt == 0.2
        mean, moving, largest_step, status = measured_stream(probe, start_vla, engine)
    finally:
        server.shutdown()
        server.server_close()
    print(f"one action, latency {latency} s: mean twist {mean / VX:.3f} of delta/dt, moving {moving:.3f}")
    assert mean >= 0.9 * VX, f"mean {mean:.4f} m/s of {VX} intended at {latency} s latency ({status})"
    assert mean <= 1.0001 * VX, f"mean {mean:.4f} m/s exceeds the {VX} intended: a delta was replayed"
    assert moving > 0.9
    # A constant model: no twist may step once moving (a gap would step to zero and back).
    assert largest_step < 1e-9, f"twist stepped by {largest_step} between ticks"
    # One 0.2 s action never outlasts the time to the next answer (two latencies): arrival execution.
    assert status["buffer.execution"] == "arrival" and status["buffer.execution_setting"] == "auto"
    assert server.requests >= 3


# auto keeps the timeline while chunks span 1.2x the time they must cover (frame to the next answer,
# about two latencies back to back), else plays them from their arrival.
@pytest.mark.parametrize("latency, chunk_len, execution", [(0.1, 8, "timeline"), (0.25, 4, "arrival"),
                                                           (0.5, 4, "arrival")])
def test_a_chunked_model_moves_the_arm_at_its_intended_velocity(latency, chunk_len, execution, probe, start_vla):
    engine = DelayedChunkEngine(latency, chunk_len=chunk_len, dt=0.1)
    mean, moving, largest_step, status = measured_stream(probe, start_vla, engine)
    print(f"K={chunk_len} chunks of 0.1 s, latency {latency} s: mean twist {mean / VX:.3f} of delta/dt, "
          f"moving {moving:.3f}")
    assert 0.9 * VX <= mean <= 1.0001 * VX, f"mean {mean:.4f} m/s of {VX} at {latency} s ({status})"
    assert moving > 0.9 and largest_step < 1e-9
    assert status["buffer.execution"] == execution


def test_forcing_timeline_execution_shows_why_auto_exists(probe, start_vla):
    # The released model's geometry at a desktop GPU's latency, played latency-compensated: each
    # one-action chunk is already over when it lands, so the arm does not move.
    engine = DelayedChunkEngine(0.25, chunk_len=1, dt=0.2)
    camera = start_following(probe, start_vla, engine, "timeline")
    status = probe.wait_for(STATUS, lambda m: int(status_values(m).get("buffer.rejected_by_reason.expired", 0)) >= 3,
                            timeout=TIMEOUT)
    camera.stop()
    assert status is not None, "expired one-action chunks were not reported"
    assert all(m.twist.linear.x == 0.0 for m in probe.messages(TWIST))


def test_prefix_execution_decodes_chunks_after_the_actions_committed_during_the_latency(tiny_chunk_checkpoint,
                                                                                      probe, start_vla):
    from openvla_ros.engines.torch_engine import TorchEngine
    from openvla_ros.nodes.ros_common import stamp_to_seconds

    engine = TorchEngine(tiny_chunk_checkpoint)  # K = 4 actions of 0.2 s
    camera = start_following(probe, start_vla, engine, "prefix")
    # Once a latency is measured, each chunk is decoded after ceil(p95 latency / dt) committed steps
    # (1 on a quiet machine, more on a loaded one) and holds only the K - P free actions.
    chunk = probe.wait_for(CHUNK, lambda m: len(m.points) < 4, timeout=TIMEOUT)
    status = probe.wait_for(STATUS, lambda m: int(status_values(m).get("worker.forced_steps", 0)) >= 1,
                            timeout=TIMEOUT)
    camera.stop()
    assert chunk is not None and status is not None
    assert status_values(status)["buffer.execution"] == "timeline"
    forced = 4 - len(chunk.points)
    assert 1 <= forced <= 3
    # The chunk's timeline starts `forced` actions after the frame it was computed from.
    frame_stamp = stamp_to_seconds(chunk.header.stamp) - forced * 0.2
    assert min(abs(frame_stamp - s) for s in camera.stamps) < 1e-6
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in chunk.points]
    assert times == pytest.approx([0.2 * i for i in range(len(chunk.points))])


def test_prefix_execution_with_an_engine_that_cannot_force_is_refused_by_name(rclpy_context):
    from rclpy.parameter import Parameter

    from openvla_ros.nodes.vla_node import make_node

    with pytest.raises(ValueError, match="cannot decode with a forced prefix"):
        make_node(engine=DelayedChunkEngine(0.1, 4, 0.1), context=rclpy_context,
                  parameter_overrides=[Parameter("execution", value="prefix")])
