"""`openvla-ros sim`: the scripted expert drives the simulated Panda through ik_node (real rclpy)."""
import pytest

from ros_helpers import ros_env  # noqa: F401  (fixture: isolated ROS domain and log dir)
from openvla_ros.nodes.sim_run import run_sim

pytestmark = pytest.mark.ros


def test_expert_reaches_the_cube_through_ik_node(ros_env):  # noqa: F811
    lines = []
    summary = run_sim(seconds=7.0, seed=3, progress=lines.append)
    assert summary["driver"] == "scripted expert"
    assert summary["ik_ok_steps"] > 100 and summary["joint_commands_applied"] > 100  # through ik_node
    assert summary["reached"], (summary, lines)
    assert summary["final_distance_m"] < 0.05
    assert any("distance to the" in line for line in lines)


def test_bad_arguments_are_named(ros_env, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="unknown task 'stack'"):
        run_sim(task="stack")
    with pytest.raises(ValueError, match="nowhere does not exist"):
        run_sim(checkpoint=tmp_path / "nowhere")
