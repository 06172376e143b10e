"""bag_player with real rclpy: a probe receives a written bag's frames with their timing and stamps.

The timing bound is loose (a shared 2-core CPU): it checks that the player follows the bag's
timeline instead of dumping the bag at once, not how precisely.
"""
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background  # noqa: F401

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.nodes.ros_common import latched_qos, stamp_to_seconds

pytestmark = pytest.mark.ros

CONFIG = Path(__file__).resolve().parents[1] / "config" / "bag_player.yaml"
N = 10
PERIOD = 0.1  # s between frames in the bag


def _write_bag(path, storage):
    with BagWriter(path, storage) as w:
        w.write_string("/bag/instruction", 0.95, "pick up the screw")
        for i in range(N):
            w.write_image("/bag/cam", 1.0 + PERIOD * i, np.full((6, 8, 3), 10 * i, np.uint8), row_padding=3)
    return path


def _play(rclpy_context, probe, bag, **params):
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from openvla_ros.nodes.bag_player import make_node

    probe.record(Image, "/camera/image_raw")
    probe.record(String, "/vla/instruction", qos=latched_qos())
    overrides = [Parameter("bag", value=str(bag)), Parameter("wait_for_subscribers_s", value=5.0)]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    node = make_node(context=rclpy_context, parameter_overrides=overrides,
                     cli_args=["--ros-args", "--params-file", str(CONFIG), "-r", "/bag/cam:=/camera/image_raw",
                               "-r", "/bag/instruction:=/vla/instruction"])
    spinner = spin_in_background(node, rclpy_context)
    try:
        assert node.finished.wait(10.0), "playback did not finish"
        assert node.error is None
        deadline = time.monotonic() + 3.0
        while len(probe.received("/camera/image_raw")) < N and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        spinner.stop()
    return probe.received("/camera/image_raw"), probe.messages("/vla/instruction")


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_replays_frames_with_their_timing_and_stamps_of_now(rclpy_context, probe, tmp_path, storage):
    bag = _write_bag(tmp_path / "bag", storage)
    start = time.time()
    frames, instructions = _play(rclpy_context, probe, bag)
    assert [m.data for m in instructions] == ["pick up the screw"]  # latched, remapped
    assert len(frames) == N
    for i, r in enumerate(frames):  # order and content kept, row padding included
        assert r.msg.step == 8 * 3 + 3 and r.msg.data[0] == 10 * i
        assert start <= stamp_to_seconds(r.msg.header.stamp) <= time.time()  # stamp_mode now
    gaps = np.diff([r.time for r in frames])
    assert 0.5 * PERIOD < np.median(gaps) < 1.5 * PERIOD
    assert frames[-1].time - frames[0].time > 0.7 * (N - 1) * PERIOD


def test_rate_factor_and_kept_stamps(rclpy_context, probe, tmp_path):
    bag = _write_bag(tmp_path / "bag", "mcap")
    frames, _ = _play(rclpy_context, probe, bag, rate=2.0, stamp_mode="keep", start_offset_s=0.5)
    # From 0.5 s after the bag's start (0.95): frames at 1.5 .. 1.9 s, at twice the speed.
    assert [round(stamp_to_seconds(r.msg.header.stamp), 6) for r in frames] == [1.5, 1.6, 1.7, 1.8, 1.9]
    assert [r.msg.data[0] for r in frames] == [50, 60, 70, 80, 90]
    assert 0.25 * PERIOD < np.median(np.diff([r.time for r in frames])) < 0.75 * PERIOD


def test_missing_bag_parameter_is_a_clear_error(rclpy_context):
    from openvla_ros.nodes.bag_player import make_node

    with pytest.raises(ValueError, match="'bag' is empty"):
        make_node(context=rclpy_context)
