"""Closed-loop replay: scoring of a recorded output bag (hand-made, exact values), and a real replay
of a small bag through bag_player -> vla_node (tiny torch engine) -> recorder with real rclpy, also
with ik_node turning the twists into joint commands on a recorded simulated-Panda episode.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import ros_env  # noqa: F401

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import RosBag
from openvla_ros.eval.closed_loop import (CHUNK_TOPIC, STATUS_TOPIC, TWIST_TOPIC, PublishedFrame, ReplayOptions,
                                          SourceFrames, score_replay, write_replay_outputs)
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES

DIMS = list(DEFAULT_ACTION_DIM_NAMES)
DT = 0.2
REPO = Path(__file__).resolve().parents[1]
IK_FILES = [str(REPO / "config" / "ik_node.yaml"), str(REPO / "config" / "robots" / "panda.yaml")]


@pytest.fixture
def one_torch_thread():
    """The tiny engine on one intra-op thread: on a small shared machine two threads contending with
    other work took 0.8-1.2 s per prediction (10 ms on one), past the 0.2 s a chunk covers, so
    every chunk expired before use and nothing moved."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_scores_joint_commands_exactly(tmp_path):
    # ik_node-like JointState commands at 100 Hz: one 25 ms gap, holds (repeats) and a 0.1 rad jump.
    times = [10.0 + 0.01 * i for i in range(20)] + [10.215]
    q = np.zeros((21, 2))
    q[5:, 0] = 0.01 * np.arange(1, 17)  # joint a moves 0.01 rad per command from command 5 on
    q[12:, 1] = 0.1  # joint b jumps once (a re-seed)
    stamps_ns = [100_000_000_000 + int(round(k * 1e8)) for k in range(3)]
    source = SourceFrames(path=Path("src"), image_topic="/cam", image_type="sensor_msgs/msg/Image",
                          instruction_topic="/i", stamps_ns=np.array(stamps_ns), truths=None, dim_names=None,
                          sync={}, dt=DT)
    with BagWriter(tmp_path / "rec", "mcap") as w:
        for t in (10.0, 10.01):
            w.write_twist(TWIST_TOPIC, t, [0, 0, 0], [0, 0, 0])
        for t, row in zip(times, q):
            w.write_joint_state("/joint_commands", t, ["a", "b"], row, receive_time=t + 0.003)
    summary, series = score_replay(tmp_path / "rec", [], source, joint_command_topic="/joint_commands",
                                   ik_rate_hz=100.0)
    joints = summary["joint_commands"]
    assert joints["count"] == 21 and joints["stamps"] == "header" and joints["joint_names"] == ["a", "b"]
    assert joints["rate_hz"] == pytest.approx(20 / 0.215)
    assert joints["period_error_ms"]["max"] == pytest.approx(15.0, abs=1e-3)
    assert joints["period_error_ms"]["p50"] == pytest.approx(0.0, abs=1e-3)
    assert joints["distinct_positions"] == 17  # 5 identical, then 16 different rows
    assert joints["max_step_rad"] == pytest.approx(0.1) and joints["max_step_joint"] == "b"
    assert joints["joint_range_rad"] == pytest.approx({"a": 0.16, "b": 0.1})
    report = write_replay_outputs(summary, series, tmp_path / "out", plots=False)["report"].read_text()
    assert "## Joint commands (ik_node)" in report and "| distinct commanded positions | 17 |" in report
    # Without a joint command topic there is no section.
    assert score_replay(tmp_path / "rec", [], source)[0]["joint_commands"] is None


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


@pytest.mark.ros
def test_replay_with_ik_node_records_and_scores_joint_commands(ros_env, tiny_checkpoint, one_torch_thread,
                                                               tmp_path, capsys):
    from openvla_ros.demo import record_episode
    from openvla_ros.nodes.replay import closed_loop_main

    bag = tmp_path / "episode"
    episode = record_episode(bag, seed=3, max_seconds=2.0)  # 10 frames + joint states at 5 Hz, 1.8 s
    assert episode["frames"] == 10
    out = tmp_path / "out"
    code = closed_loop_main(["--checkpoint", str(tiny_checkpoint), "--bag", str(bag), "--out", str(out),
                             "--drain", "0.5", "--no-plots", "--ik-params", IK_FILES[0], "--ik-params", IK_FILES[1],
                             "--ik-param", "use_sim_urdf:=true"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    ik, joints = summary["ik"], summary["joint_commands"]
    topic = "/joint_trajectory_controller/joint_trajectory"  # panda.yaml: joint_trajectory_controller
    assert ik["command_topic"] == topic and ik["source_joint_states_topic"] == "/joint_states"
    assert ik["joint_state_timeout"] == pytest.approx(1.5 * 0.2)  # widened to the bag's 5 Hz joint states
    with RosBag(out / "replay_bag") as recorded:
        assert recorded.topics[topic].msgtype == "trajectory_msgs/msg/JointTrajectory"
        assert recorded.topics[topic].count == joints["count"]
        assert recorded.topics["/gripper/command"].count > 0  # forwarded by ik_node
        first = next(recorded.messages([topic])).msg
        assert list(first.joint_names) == [f"panda_joint{i}" for i in range(1, 8)]
    # ~100 Hz over the 1.8 s of bag (commands start with the first joint state).
    assert 60.0 < joints["rate_hz"] < 140.0 and joints["target_rate_hz"] == 100.0
    assert joints["count"] >= 0.6 * 100 * 1.8
    assert joints["period_error_ms"]["p50"] < 5.0
    # Moved by the twists: re-seeding from the bag's 10 joint states gives at most 10 positions.
    assert joints["distinct_positions"] > 10 + 1 and summary["chunks"] >= 3
    assert max(joints["joint_range_rad"].values()) > 1e-3
    assert 0.0 < joints["max_step_rad"] < 1.0
    counters = joints["ik_final_status"]
    assert int(counters["counters.ik_ok"]) > 0 and counters["expected_frame"] == "panda_link0"
    assert "## Joint commands (ik_node)" in (out / "report.md").read_text()


@pytest.mark.ros
def test_replay_with_ik_on_a_bag_without_joint_states_names_its_topics(ros_env, tiny_checkpoint, tmp_path, capsys):
    from openvla_ros.nodes.replay import closed_loop_main

    bag = tmp_path / "src"
    with BagWriter(bag, "sqlite3") as w:
        w.write_string("/vla/instruction", 0.9, "pick up the screw")
        for i in range(3):
            w.write_image("/cam/color", 1.0 + 0.1 * i, np.zeros((8, 8, 3), dtype=np.uint8))
    args = ["--checkpoint", str(tiny_checkpoint), "--bag", str(bag), "--out", str(tmp_path / "out"),
            "--ik-params", IK_FILES[0], "--ik-params", IK_FILES[1]]
    assert closed_loop_main(args) == 2
    err = capsys.readouterr().err
    assert "0 sensor_msgs/msg/JointState topics" in err and "/cam/color" in err and "/vla/instruction" in err
    assert not (tmp_path / "out" / "replay_bag").exists()  # failed before anything ran
    # A named topic that is not there: the same list of topics.
    assert closed_loop_main(args + ["--joint-states-topic", "/arm/joint_states"]) == 2
    err = capsys.readouterr().err
    assert "'/arm/joint_states' is not in bag" in err and "/cam/color" in err


def test_replay_ik_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="without ik_node parameter files"):
        ReplayOptions(ik_parameters={"rate_hz": 50.0}).validated()
    with pytest.raises(ValueError, match="does not exist"):
        ReplayOptions(ik_params_files=(str(tmp_path / "missing.yaml"),)).validated()
