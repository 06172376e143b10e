"""`openvla-ros bench control`: the command stream of a real vla_node, measured from another process.

    openvla-ros bench control [--rate 100] [--seconds 10] [--checkpoint DIR] [--json]

vla_node runs as its own process (`python -m openvla_ros.nodes.vla_node`) with the tiny engine
inferring continuously on a 30 Hz camera stream published from this process, which also receives
/vla/eef_delta and /vla/action_chunk and reports period errors of the stream (at the receiver,
and at the sender from the header stamps), the achieved rate, inference Hz and the latency from
an image's stamp to the first command that follows its chunk.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..eval.metrics import period_errors_ms

ISOLATION_VARS = ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")


def isolated_ros_env(domain_id: int | None = None) -> dict:
    """Environment for a private ROS graph on this machine (set before rclpy.init)."""
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(domain_id if domain_id is not None else random.randint(101, 200)))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    return env


class VlaNodeProcess:
    """vla_node in a child process with `-p name:=value` overrides; stopped with SIGINT, then killed."""

    def __init__(self, params: dict, env: dict, log_path: Path | None = None):
        args = [sys.executable, "-m", "openvla_ros.nodes.vla_node", "--ros-args"]
        for name, value in params.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args += ["-p", f"{name}:={text}"]
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vla_node_", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class StreamMonitor:
    """A node in this process: publishes camera + instruction, records commands with arrival times."""

    def __init__(self, context, camera_hz: float = 30.0, image_shape=(224, 224, 3)):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from ..imaging import rgb_to_image_fields
        from .ros_common import SpinningNode, latched_qos, sensor_qos, stamp_to_seconds

        self._stamp_to_seconds = stamp_to_seconds
        self.node = rclpy.create_node("bench_control_monitor", context=context)
        self.lock = threading.Lock()
        self.twists: list[tuple[float, float, float]] = []  # (arrival, header stamp, |v|)
        self.chunks: list[tuple[float, float]] = []  # (arrival, observation stamp)
        self.status: dict[str, str] = {}
        self.images_sent: list[float] = []
        self.publish_images = True
        rng = np.random.default_rng(0)
        self._frames = [rng.integers(0, 256, image_shape, dtype=np.uint8) for _ in range(4)]
        self._image_cls, self._fields = Image, rgb_to_image_fields
        # The camera has its own node and executor thread: building and publishing a frame must not
        # delay the twist callbacks whose arrival times are the measurement.
        self.camera_node = rclpy.create_node("bench_control_camera", context=context)
        self.image_pub = self.camera_node.create_publisher(Image, "/camera/image_raw", sensor_qos())
        self.instruction_pub = self.camera_node.create_publisher(String, "/vla/instruction", latched_qos())
        self._string_cls = String
        self.node.create_subscription(TwistStamped, "/vla/eef_delta", self._on_twist, 100)
        self.node.create_subscription(JointTrajectory, "/vla/action_chunk", self._on_chunk, 10)
        self.node.create_subscription(DiagnosticArray, "/vla/status", self._on_status, 10)
        self.camera_node.create_timer(1.0 / camera_hz, self._on_camera)
        self.spinner = SpinningNode(self.node, context)
        self.camera_spinner = SpinningNode(self.camera_node, context)

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def send_instruction(self, text: str) -> None:
        self.instruction_pub.publish(self._string_cls(data=text))

    def call_service(self, srv_type, name: str, request, timeout: float = 10.0):
        """Call a service of the other process and wait for the answer."""
        from .ros_common import call_service

        return call_service(self.node, srv_type, name, request, timeout)

    def _on_camera(self):
        if not self.publish_images:
            return
        frame = self._frames[len(self.images_sent) % len(self._frames)]
        fields = self._fields(frame)
        msg = self._image_cls(height=fields.height, width=fields.width, encoding=fields.encoding, step=fields.step,
                              data=fields.data.tobytes())
        msg.header.stamp = self.camera_node.get_clock().now().to_msg()
        msg.header.frame_id = "camera"
        self.image_pub.publish(msg)
        with self.lock:
            self.images_sent.append(self._stamp_to_seconds(msg.header.stamp))

    def _on_twist(self, msg):
        arrival = self.now()
        speed = float(np.linalg.norm([msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z,
                                      msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z]))
        with self.lock:
            self.twists.append((arrival, self._stamp_to_seconds(msg.header.stamp), speed))

    def _on_chunk(self, msg):
        with self.lock:
            self.chunks.append((self.now(), self._stamp_to_seconds(msg.header.stamp)))

    def _on_status(self, msg):
        with self.lock:
            for status in msg.status:
                self.status = {kv.key: kv.value for kv in status.values}
                self.status["state"] = status.message

    def snapshot(self):
        with self.lock:
            return list(self.twists), list(self.chunks), dict(self.status)

    def close(self):
        self.camera_spinner.stop()
        self.spinner.stop()


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def summarise(twists, chunks, status, rate: float, t_start: float, t_end: float) -> dict:
    period = 1.0 / rate
    window = [t for t in twists if t_start <= t[0] <= t_end]
    if len(window) < 3:
        raise ValueError(f"only {len(window)} commands arrived in the measuring window; is vla_node running?")
    arrivals = [t[0] for t in window]
    stamps = [t[1] for t in window]
    recv = period_errors_ms(arrivals, period)
    sent = period_errors_ms(stamps, period)
    latencies = []
    for arrival, obs_stamp in chunks:
        if not (t_start <= arrival <= t_end):
            continue
        following = [t[0] for t in window if t[0] >= arrival]
        if following:
            latencies.append((following[0] - obs_stamp) * 1e3)
    moving = sum(1 for t in window if t[2] > 0)
    return {
        "benchmark": "control",
        "rate_hz": rate,
        "seconds": t_end - t_start,
        "commands": len(window),
        "achieved_rate_hz": (len(window) - 1) / (arrivals[-1] - arrivals[0]),
        "p50_period_error_ms": float(np.percentile(recv, 50)),
        "p99_period_error_ms": float(np.percentile(recv, 99)),
        "max_period_error_ms": float(recv.max()),
        "sender_p50_period_error_ms": float(np.percentile(sent, 50)),
        "sender_p99_period_error_ms": float(np.percentile(sent, 99)),
        "sender_max_period_error_ms": float(sent.max()),
        "moving_fraction": moving / len(window),
        "chunks": len([c for c in chunks if t_start <= c[0] <= t_end]),
        "inference_hz": float(status.get("worker.inference_hz", "nan")),
        "e2e_latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
        "e2e_latency_ms_p95": float(np.percentile(latencies, 95)) if latencies else None,
        "measured_at": "receiver in another process (sender figures from header stamps)",
        # vla_node's own control thread (control_timing thread): tick start after its deadline, last 1000 ticks.
        "control_loop": {k[len("control_loop_"):]: _number(v) for k, v in status.items() if k.startswith("control_loop_")},
    }


def bench_control(*, checkpoint=None, rate: float = 100.0, seconds: float = 10.0, camera_hz: float = 30.0,
                  warmup_s: float = 2.0, startup_timeout_s: float = 90.0, node_params: dict | None = None,
                  receiver_priority: int = 0, progress=print) -> dict:
    """vla_node in its own process, measured by a subscriber here (see the module docstring).

    `receiver_priority` > 0 runs this process's threads (the subscriber's executor and its DDS
    threads) at that SCHED_FIFO priority, as the arm's controller manager would run, so the figures
    show the stream rather than this process waiting for a core.
    """
    import rclpy

    if not (rate > 0 and seconds > 0 and camera_hz > 0):
        raise ValueError(f"rate, seconds and camera_hz must be > 0, got {rate}, {seconds}, {camera_hz}")
    with tempfile.TemporaryDirectory(prefix="bench_control_") as tmp:
        if checkpoint is None:
            from ..vla.tiny import write_tiny_checkpoint

            checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        env = isolated_ros_env()
        env["ROS_LOG_DIR"] = tmp
        saved = {k: os.environ.get(k) for k in ISOLATION_VARS}
        os.environ.update({k: env[k] for k in ISOLATION_VARS})
        context = rclpy.Context()
        rclpy.init(context=context)
        monitor = None
        try:
            params = {"checkpoint": checkpoint, "start_enabled": True, "control_rate_hz": float(rate), **(node_params or {})}
            with VlaNodeProcess(params, env, Path(tmp) / "vla_node.log") as node:
                monitor = StreamMonitor(context, camera_hz=camera_hz)
                receiver_realtime = None
                if receiver_priority:
                    from ..control.periodic import set_process_realtime

                    why = set_process_realtime(receiver_priority)
                    receiver_realtime = why is None
                    if why:
                        progress(f"[bench control] receiver stays at normal priority: {why}")
                monitor.send_instruction("reach the red cube")
                progress(f"[bench control] waiting for vla_node (domain {env['ROS_DOMAIN_ID']}) ...")
                deadline = time.monotonic() + startup_timeout_s
                while not monitor.snapshot()[1]:
                    if not node.alive():
                        raise ValueError(f"vla_node exited with {node.proc.returncode}:\n{node.log()[-2000:]}")
                    if time.monotonic() > deadline:
                        raise ValueError(f"no action chunk within {startup_timeout_s} s:\n{node.log()[-2000:]}")
                    time.sleep(0.05)
                time.sleep(warmup_s)
                t_start = monitor.now()
                progress(f"[bench control] measuring {seconds:.0f} s at {rate:.0f} Hz ...")
                time.sleep(seconds)
                t_end = monitor.now()
                twists, chunks, status = monitor.snapshot()
        finally:
            if monitor is not None:
                monitor.close()
            rclpy.shutdown(context=context)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        result = summarise(twists, chunks, status, rate, t_start, t_end)
        result["node_params"] = dict(node_params or {})
        result["receiver_priority"] = receiver_priority
        result["receiver_realtime"] = receiver_realtime
        return result
