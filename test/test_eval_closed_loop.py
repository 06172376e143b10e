"""Closed-loop replay: scoring of a recorded output bag (hand-made, exact values), and a real replay
of a small bag through bag_player -> vla_node (tiny torch engine) -> recorder with real rclpy.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import ros_env  # noqa: F401

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.closed_loop import (CHUNK_TOPIC, STATUS_TOPIC, TWIST_TOPIC, PublishedFrame, ReplayOptions,
                                          SourceFrames, score_replay, write_replay_outputs)
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES

DIMS = list(DEFAULT_ACTION_DIM_NAMES)
DT = 0.2


def _status(writer, receive, ticks, underruns, accepted):
    T = writer.typestore.types
    values = [T["diagnostic_msgs/msg/KeyValue"](key=k, value=str(v)) for k, v in
              (("ticks", ticks), ("holds.underrun", underruns), ("buffer.accepted", accepted))]
    entry = T["diagnostic_msgs/msg/DiagnosticStatus"](level=0, name="vla", message="ok", hardware_id="", values=values)
    writer.write_message(STATUS_TOPIC, "diagnostic_msgs/msg/DiagnosticArray",
                         T["diagnostic_msgs/msg/DiagnosticArray"](header=writer.header(receive), status=[entry]), receive)


def test_scores_a_recorded_stream_exactly(tmp_path):
    # Source: frames at bag times 1.0, 1.1, 1.2 with truth rows; published at 100.0, 100.1, 100.2.
    truth = np.array([[0.01, 0, 0, 0, 0, 0, 1], [0.02, 0, 0, 0, 0, 0, 1], [0.03, 0, 0, 0, 0, 0, 0]])
    source = SourceFrames(path=Path("src"), image_topic="/cam", image_type="sensor_msgs/msg/Image",
                          instruction_topic="/i", stamps_ns=np.array([1_000_000_000, 1_100_000_000, 1_200_000_000]),
                          truths=truth, dim_names=DIMS, sync={}, dt=DT)
    published = [PublishedFrame(1_000_000_000 + k * 100_000_000, 100_000_000_000 + k * 100_000_000) for k in range(3)]
    twist_times = [100.0 + 0.01 * i for i in range(40)] + [100.42]  # 10 ms steps, one 30 ms gap
    pred = truth + np.array([0.004, -0.002, 0, 0, 0, 0, 0])
    with BagWriter(tmp_path / "rec", "mcap") as w:
        for t in twist_times:
            w.write_twist(TWIST_TOPIC, t, [0.1, 0, 0], [0, 0, 0])  # commanded 0.1 m/s in x
        for k in range(3):  # chunk k: observation stamp = published frame k, 30/40/50 ms later
            w.write_joint_trajectory(CHUNK_TOPIC, 100.0 + 0.1 * k, DIMS, [pred[k]], dt=DT,
                                     receive_time=100.0 + 0.1 * k + 0.03 + 0.01 * k)
        _status(w, 99.9, ticks=10, underruns=10, accepted=0)  # start-up: outside the steady window
        _status(w, 100.05, ticks=15, underruns=10, accepted=1)
        _status(w, 100.35, ticks=45, underruns=13, accepted=3)
    summary, series = score_replay(tmp_path / "rec", published, source, control_rate_hz=100.0)
    assert summary["commands"] == 41 and summary["frames_published"] == 3 and summary["chunks"] == 3
    assert summary["control_rate_hz"] == pytest.approx(40 / 0.42)
    assert summary["command_interval_ms"]["max"] == pytest.approx(30.0, abs=1e-3)
    assert summary["latency_ms"]["p50"] == pytest.approx(40.0, abs=1e-3)
    assert summary["latency_ms"]["max"] == pytest.approx(50.0, abs=1e-3)
    assert summary["underrun_fraction"] == pytest.approx(3 / 30) and summary["steady_ticks"] == 30
    assert summary["first_action"]["frames"] == 3 and summary["unscored_chunks"] == 0
    assert summary["mae"]["dx"] == pytest.approx(0.004) and summary["rmse"]["dy"] == pytest.approx(0.002)
    assert summary["mae"]["gripper"] == pytest.approx(0.0)
    # Tracking: commands in [first chunk arrival 100.03, last frame 100.2 + dt]; truth delta / dt.
    tracking = summary["command_tracking"]
    in_window = [t for t in twist_times if 100.03 - 1e-9 <= t <= 100.4 + 1e-9]
    assert tracking["samples"] == len(in_window)
    # Truth in force at bag time 1.0 + (t - 100.0): 0.05, 0.10, 0.15 m/s; commanded 0.1 throughout.
    expected = [abs(0.1 - truth[min(2, int(round((t - 100.0) * 1e6)) // 100_000), 0] / DT) for t in in_window]
    assert tracking["mae"]["dx"] == pytest.approx(np.mean(expected))

    paths = write_replay_outputs(summary, series, tmp_path / "out")
    for name in ("summary", "report"):
        assert paths[name].exists()
    assert json.loads(paths["summary"].read_text())["underrun_fraction"] == pytest.approx(0.1)
    report = paths["report"].read_text()
    assert "First action vs truth" in report and "command_intervals.png" in report


@pytest.mark.ros
def test_replay_through_vla_node_with_the_tiny_engine(ros_env, torch_engine, tmp_path):
    from openvla_ros.nodes.replay import run_replay

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    offset = np.array([0.01, -0.02, 0.0, 0.03, 0.0, 0.0])  # m/s, added to the model's own velocity
    bag = tmp_path / "src"
    with BagWriter(bag, "sqlite3") as w:
        w.write_string("/vla/instruction", 0.9, "pick up the screw")
        for i in range(24):  # 2.4 s at 10 Hz, cycling through the images
            t = 1.0 + 0.1 * i
            w.write_image("/cam/color", t, images[i % 6])
            action = torch_engine.predict(images[i % 6], "pick up the screw").actions[0]
            # truth the model nearly agrees with: its own delta plus offset * dt
            w.write_twist("/expert/twist", t, action[:3] / DT + offset[:3], action[3:6] / DT + offset[3:])
    out = tmp_path / "out"
    summary = run_replay(torch_engine, bag, out, ReplayOptions(truth_topic="/expert/twist", drain_s=0.5),
                         progress=False)
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("commands", "control_rate_hz", "latency_ms", "underrun_fraction", "mae", "rmse", "chunks",
                "command_interval_ms", "first_action", "command_tracking", "frames_published", "engine"):
        assert key in on_disk, key
    assert summary["frames_published"] == 24
    assert summary["control_rate_hz"] > 50.0  # liveness: 100 Hz configured
    assert summary["chunks"] >= 5 and summary["first_action"]["frames"] == summary["chunks"]
    # Each chunk's first action is the model's answer on its frame: the error is exactly the offset * dt.
    for i, name in enumerate(DIMS[:6]):
        assert summary["mae"][name] == pytest.approx(abs(offset[i]) * DT, abs=1e-9)
    assert summary["latency_ms"]["p50"] > 0 and summary["latency_ms"]["count"] == summary["chunks"]
    assert summary["underrun_fraction"] is not None and 0.0 <= summary["underrun_fraction"] <= 1.0
    assert (out / "replay_bag" / "metadata.yaml").exists() and (out / "report.md").exists()
    assert (out / "pred_vs_true.png").exists() and (out / "commands_vs_truth.png").exists()


def test_replay_command_line_errors_exit_2(tiny_checkpoint, tmp_path, capsys):
    from openvla_ros.nodes.replay import closed_loop_main

    code = closed_loop_main(["--checkpoint", str(tiny_checkpoint), "--bag", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "out")])
    assert code == 2 and "missing' does not exist" in capsys.readouterr().err
