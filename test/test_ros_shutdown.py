"""Ctrl-C / SIGTERM end a node in order: its own threads stop before the ROS context goes.

Each test runs a node process through `spin_node` (as `ros2 run` / `ros2 launch` do) and signals it.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ros_helpers import session_domain_id

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 120.0  # a loaded 2-core machine imports torch slowly; a liveness bound only

# A node whose control thread publishes at 1 kHz (as vla_node's does at its control rate) while an
# executor callback is busy for a while: a signal that shuts the context down at once leaves the
# thread publishing into a dead context for the whole busy time.
BUSY_NODE = textwrap.dedent("""
    import sys, time
    from openvla_ros.control.periodic import PeriodicLoop
    from openvla_ros.nodes.ros_common import spin_node

    def make_node():
        from rclpy.node import Node
        from std_msgs.msg import Float64

        class BusyNode(Node):
            def __init__(self):
                super().__init__("busy_node")
                self.pub = self.create_publisher(Float64, "/busy/out", 10)
                self.loop = PeriodicLoop(0.001, lambda deadline: self.pub.publish(Float64(data=deadline)))
                self.loop.start()
                self.create_timer(0.05, self._busy)

            def _busy(self):
                print("busy", flush=True)
                time.sleep(0.5)

            def close(self):
                self.loop.stop()
                print(f"ticks {self.loop.ticks} errors {self.loop.tick_errors}", flush=True)

        return BusyNode()

    sys.exit(spin_node(make_node))
""")


def ros_process_env(tmp_path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), ROS_DOMAIN_ID=str(session_domain_id()),
                ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_LOG_DIR=str(tmp_path / "ros_log"))


def run_until_then_signal(command, env, marker: str, sig=signal.SIGINT, settle_s: float = 0.0):
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.monotonic() + READY_TIMEOUT
    try:
        while marker not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        assert marker in seen, f"process never printed {marker!r}:\n{seen}"
        time.sleep(settle_s)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, seen + rest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_nodes_threads_before_the_context_so_nothing_publishes_into_a_dead_context(tmp_path, sig):
    code, output = run_until_then_signal([sys.executable, "-c", BUSY_NODE], ros_process_env(tmp_path), "busy",
                                         sig=sig, settle_s=0.1)
    assert code == 0, output
    assert "context is invalid" not in output and "Traceback" not in output, output
    assert "errors 0" in output, output


def test_vla_node_ends_cleanly_on_ctrl_c_while_streaming_at_1_khz(tmp_path, tiny_checkpoint):
    command = [sys.executable, "-m", "openvla_ros.nodes.vla_node", "--ros-args", "-p",
               f"checkpoint:={tiny_checkpoint}", "-p", "control_rate_hz:=1000.0"]
    code, output = run_until_then_signal(command, ros_process_env(tmp_path), "vla_node ready", settle_s=0.3)
    assert code == 0, output
    assert "RCLError" not in output and "Traceback" not in output, output
