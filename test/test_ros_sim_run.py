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


def test_record_demos_writes_bags_training_reads(tmp_path):
    from openvla_ros.eval.bags import BagReadOptions, read_frames
    from openvla_ros.nodes.sim_run import record_demos

    summary = record_demos(episodes=2, out=tmp_path / "demos", seed=5, progress=False)
    assert summary["episodes"] == 2
    for i in range(2):
        frames = read_frames(tmp_path / "demos" / f"episode_{i:04d}",
                             BagReadOptions(truth_topic="/vla/eef_delta", dt=0.2)).frames
        assert len(frames) > 3
        assert frames[0].instruction.startswith("reach the ")
        assert abs(frames[0].truth[0]) + abs(frames[0].truth[1]) + abs(frames[0].truth[2]) > 0  # the expert moves
    with pytest.raises(ValueError, match="--episodes must be >= 1, got 0"):
        record_demos(episodes=0, out=tmp_path / "none")
    with pytest.raises(ValueError, match="--noise must be a number >= 0"):
        record_demos(episodes=1, out=tmp_path / "none", noise_m=-1.0)
    # Finished episodes with the same settings are kept; other settings record them again.
    bag = tmp_path / "demos" / "episode_0001"
    stamp = (bag / "metadata.yaml").stat().st_mtime_ns
    again = record_demos(episodes=2, out=tmp_path / "demos", seed=5, progress=False)
    assert again["outcomes"] == summary["outcomes"] and (bag / "metadata.yaml").stat().st_mtime_ns == stamp
    noisy = record_demos(episodes=2, out=tmp_path / "demos", seed=5, noise_m=0.01, progress=False)
    assert (bag / "metadata.yaml").stat().st_mtime_ns != stamp
    assert [o["seed"] for o in noisy["outcomes"]] == [5, 6]
