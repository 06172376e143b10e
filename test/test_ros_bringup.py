"""The in-process bringup: file parsing and overrides, and the whole simulated loop
sim_node -> vla_node (tiny torch model) -> ik_node -> sim_node with the parameter files the launch
files use. The measured rates are printed (liveness bounds only; figures go to the report).
"""
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import Probe, ros_env, wait_until  # noqa: F401

from openvla_ros.nodes.bringup import Bringup, bringup_main, coerce_override, parse_set, read_bringup_file
from openvla_ros.sim.scene import PANDA_REST_POSTURE

ROOT = Path(__file__).resolve().parents[1]
SIM_BRINGUP = ROOT / "config" / "sim_bringup.yaml"


def test_bringup_file_lists_nodes_and_files_with_itself_last():
    nodes, files = read_bringup_file(SIM_BRINGUP)
    assert nodes == ["sim_node", "vla_node", "ik_node"]
    assert [f.relative_to(ROOT / "config").as_posix() for f in files] == [
        "sim_node.yaml", "vla_node.yaml", "ik_node.yaml", "robots/panda.yaml", "sim_bringup.yaml"]


def test_bringup_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bringup:\n  ros__parameters:\n    nodes: [sim_node, arm_node]\n")
    with pytest.raises(ValueError, match="unknown node 'arm_node'"):
        read_bringup_file(bad)
    bad.write_text("bringup:\n  ros__parameters:\n    nodes: [ik_node]\n    params_files: [missing.yaml]\n")
    with pytest.raises(ValueError, match="'missing.yaml' not found"):
        read_bringup_file(bad)
    bad.write_text("bringup:\n  ros__parameters:\n    nodes: [ik_node]\n    extra: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        read_bringup_file(bad)
    bad.write_text("ik_node:\n  ros__parameters:\n    rate_hz: 10.0\n")
    with pytest.raises(ValueError, match="no 'bringup: ros__parameters:' section"):
        read_bringup_file(bad)


def test_overrides_are_typed_by_the_node_tables():
    assert parse_set(["vla_node.checkpoint=/ckpt", "ik_node.rate_hz=200", "sim_node.real_time=false"]) == {
        "vla_node": {"checkpoint": "/ckpt"}, "ik_node": {"rate_hz": 200}, "sim_node": {"real_time": False}}
    value = coerce_override("ik_node", "rate_hz", 200)
    assert value == 200.0 and isinstance(value, float)
    with pytest.raises(ValueError, match="ik_node has no parameter 'rte_hz'"):
        coerce_override("ik_node", "rte_hz", 1.0)
    with pytest.raises(ValueError, match="'output_type'.*'velocity'"):
        coerce_override("ik_node", "output_type", "velocity")
    with pytest.raises(ValueError, match="NODE.PARAM=VALUE"):
        parse_set(["rate_hz=1"])
    with pytest.raises(ValueError, match="not started"):
        Bringup(["ik_node"], overrides={"vla_node": {"checkpoint": "x"}})


def test_bringup_main_runs_for_the_given_seconds_and_reports_config_errors(ros_env, capsys):
    assert bringup_main(["--nodes", "ik_node", "--params-file", str(ROOT / "config" / "ik_node.yaml"),
                         "--params", str(ROOT / "config" / "robots" / "panda.yaml"),
                         "--set", "ik_node.use_sim_urdf=true", "--seconds", "0.5"]) == 0
    assert "bringup: running ik_node" in capsys.readouterr().out
    assert bringup_main(["--nodes", "ik_node", "--set", "ik_node.rate_hz=fast"]) == 2
    assert "'rate_hz'" in capsys.readouterr().out
    # A node that fails to configure stops the bringup with the reason (no URDF anywhere).
    assert bringup_main(["--nodes", "ik_node", "--set", "ik_node.robot_description_topic=", "--seconds", "1"]) == 2
    assert "no URDF" in capsys.readouterr().out


def test_closed_loop_in_one_process_moves_the_simulated_arm_through_ik_node(ros_env, tiny_chunk_checkpoint):
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import Image, JointState

    overrides = {"vla_node": {"checkpoint": str(tiny_chunk_checkpoint)}}
    with Bringup.from_file(SIM_BRINGUP, overrides=overrides) as bringup:
        sim, vla, ik = bringup["sim_node"], bringup["vla_node"], bringup["ik_node"]
        # Same parameter files as the launch file: the cell's settings reached every node.
        assert vla.params["base_frame"] == "panda_link0" and vla.params["start_enabled"]
        assert ik.params["output_type"] == "joint_state" and ik.resolve_topic_name(ik.params["command_topic"]) == "/joint_commands"
        assert ik.params["tip_frame"] == "panda_grasptarget" and ik.params["joint_state_timeout"] == 0.2
        probe = Probe(bringup._context, "bringup_probe")
        try:
            probe.record(JointState, "/joint_commands")
            probe.record(TwistStamped, "/vla/eef_delta")
            probe.record(Image, "/camera/image_raw")
            start = time.monotonic()
            moving = wait_until(lambda: ik.controller.counters["ik_ok"] > 50 and any(
                abs(v) > 0 for m in probe.messages("/vla/eef_delta")[-20:] for v in (m.twist.linear.x, m.twist.linear.z)),
                30.0)
            assert moving, f"no motion commanded: vla {vla.controller.status()['state']}, ik {ik.controller.status()}"
            window_start = time.monotonic()
            time.sleep(3.0)
            window_end = time.monotonic()
            ready = np.array(PANDA_REST_POSTURE)

            def commanded_motion():
                return float(np.max(np.abs(np.array(ik.controller.status()["q_command"]) - ready)))

            # However slow inference is on a loaded CPU, the commands keep adding up.
            assert wait_until(lambda: commanded_motion() > 0.02, 30.0), f"ik_node commanded {commanded_motion()} rad"
            time.sleep(0.5)
            # The simulated arm followed ik_node's commands (nothing else publishes /joint_commands).
            q_sim, q_cmd = sim.snapshot().positions[:7], np.array(ik.controller.status()["q_command"])
            assert np.max(np.abs(q_sim - ready)) > 0.015, f"the simulated arm did not move: {q_sim - ready}"
            np.testing.assert_allclose(q_sim, q_cmd, atol=0.03)
            np.testing.assert_allclose(sim.sim.scene.joint_targets, q_cmd, atol=0.03)
            commands = probe.received("/joint_commands", since=window_start)
            assert commands and sim.sim.counters["joint_commands"] >= len(commands) // 2
            assert all(list(m.msg.name) == list(ik.joint_names) for m in commands)
            rate = lambda topic: len([r for r in probe.received(topic, since=window_start)  # noqa: E731
                                      if r.time < window_end]) / (window_end - window_start)
            figures = {
                "joint_command_hz": rate("/joint_commands"), "twist_hz": rate("/vla/eef_delta"),
                "camera_hz": rate("/camera/image_raw"), "ik_loop_hz": ik.controller.loop_rate_hz(),
                "sim_real_time_factor": sim.sim.real_time_factor(),
                "inference_hz": vla.controller.status()["worker"]["inference_hz"],
                "startup_to_motion_s": window_start - start,
            }
            print("bringup figures:", {k: round(v, 2) for k, v in figures.items()})
            assert figures["joint_command_hz"] > 20 and figures["twist_hz"] > 20  # liveness only (100 Hz configured)
        finally:
            probe.close()
    assert bringup.errors == {}
    assert bringup.nodes == {}
