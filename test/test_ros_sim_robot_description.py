"""sim_node publishes the simulated Panda's URDF latched on `robot_description`, as
robot_state_publisher does on a real arm: a late subscriber gets it, and an ik_node given no URDF
parameter builds its model from it."""
from pathlib import Path

import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.nodes.ros_common import latched_qos
from openvla_ros.sim.scene import panda_urdf_path

CONFIG = Path(__file__).resolve().parents[1] / "config"
TIMEOUT = 30.0


def test_ik_node_without_a_urdf_parameter_takes_the_simulated_panda_from_sim_node(rclpy_context, probe):
    from std_msgs.msg import String

    from openvla_ros.nodes import ik_node, sim_node

    spinners = []
    try:
        spinners.append(spin_in_background(sim_node.make_node(context=rclpy_context, cli_args=[
            "--ros-args", "--params-file", str(CONFIG / "sim_node.yaml")]), rclpy_context))
        probe.record(String, "/robot_description", qos=latched_qos())  # after the node: transient_local
        description = probe.wait_for("/robot_description", timeout=TIMEOUT)
        assert description is not None and description.data == Path(panda_urdf_path()).read_text()

        ik = ik_node.make_node(context=rclpy_context, cli_args=[
            "--ros-args", "--params-file", str(CONFIG / "ik_node.yaml"),
            "--params-file", str(CONFIG / "robots" / "panda.yaml")])
        spinners.append(spin_in_background(ik, rclpy_context))
        assert ik.params["urdf_path"] == "" and ik.params["use_sim_urdf"] is False
        assert wait_until(lambda: ik.controller is not None, TIMEOUT), "ik_node never built its model"
    finally:
        for spinner in reversed(spinners):
            spinner.stop()
