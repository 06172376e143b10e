"""Two arms side by side in one ROS graph: each cell's nodes in their own namespace.

Each cell is vla_node (tiny torch engine) + ik_node, started as `ros2 launch ... namespace:=NS`
starts them: `__ns:=/NS` and the package's parameter files, whose `/**/<node>` sections apply in
any namespace. The topics are relative, so each cell talks only to its own camera, instruction,
joint states and controller.
"""
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.imaging import rgb_to_image_fields
from openvla_ros.nodes.ros_common import latched_qos
from openvla_ros.sim.scene import PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS, PANDA_REST_POSTURE

CONFIG = Path(__file__).resolve().parents[1] / "config"
CELLS = {"left_arm": "reach the red cube", "right_arm": "reach the blue cube"}
TIMEOUT = 30.0


def status_values(msg) -> dict:
    return {kv.key: kv.value for kv in msg.status[0].values}


def start_cell(context, namespace: str, engine):
    from openvla_ros.nodes import ik_node, vla_node

    ns = ["--ros-args", "-r", f"__ns:=/{namespace}"]
    vla = vla_node.make_node(engine=engine, context=context, cli_args=ns + [
        "--params-file", str(CONFIG / "vla_node.yaml"), "-p", "start_enabled:=true", "-p", "base_frame:=panda_link0"])
    ik = ik_node.make_node(context=context, cli_args=ns + [
        "--params-file", str(CONFIG / "ik_node.yaml"), "--params-file", str(CONFIG / "robots" / "panda.yaml"),
        "-p", "use_sim_urdf:=true"])
    return [spin_in_background(vla, context), spin_in_background(ik, context)]


def test_two_cells_in_namespaces_each_follow_their_own_instruction_and_arm(rclpy_context, probe, torch_engine):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    for ns in CELLS:
        probe.record(DiagnosticArray, f"/{ns}/vla/status")
        probe.record(TwistStamped, f"/{ns}/vla/eef_delta")
        probe.record(JointTrajectory, f"/{ns}/joint_trajectory_controller/joint_trajectory")
    probe.record(TwistStamped, "/vla/eef_delta")  # the root namespace must stay silent

    fields = rgb_to_image_fields(np.full((64, 64, 3), 90, np.uint8), "rgb8")

    def frame():
        msg = Image(height=fields.height, width=fields.width, encoding=fields.encoding, step=fields.step,
                    data=fields.data.tobytes())
        msg.header.stamp = probe.now_msg()
        return msg

    def joints():
        msg = JointState(name=list(PANDA_FINGER_JOINTS) + list(PANDA_ARM_JOINTS),
                         position=[0.04, 0.04] + list(PANDA_REST_POSTURE))
        msg.header.stamp = probe.now_msg()
        return msg

    spinners = []
    try:
        for ns, instruction in CELLS.items():
            spinners += start_cell(rclpy_context, ns, torch_engine)
            probe.publish(String, f"/{ns}/vla/instruction", String(data=instruction), qos=latched_qos())
            probe.stream(Image, f"/{ns}/camera/image_raw", 20.0, frame)
            probe.stream(JointState, f"/{ns}/joint_states", 50.0, joints)

        for ns, instruction in CELLS.items():
            status = probe.wait_for(f"/{ns}/vla/status", lambda m: status_values(m).get("instruction") == instruction,
                                    timeout=TIMEOUT)
            assert status is not None, f"{ns}: vla_node never reported its instruction"
            assert status.status[0].hardware_id == "vla_node"
            assert probe.wait_for(f"/{ns}/vla/eef_delta", timeout=TIMEOUT) is not None, f"{ns}: no twists"
            assert probe.wait_for(f"/{ns}/joint_trajectory_controller/joint_trajectory",
                                  timeout=TIMEOUT) is not None, f"{ns}: ik_node sent no joint targets"
        assert all(m.header.frame_id == "panda_link0" for ns in CELLS for m in probe.messages(f"/{ns}/vla/eef_delta"))
        for ns, instruction in CELLS.items():  # neither cell ever took the other's instruction
            assert {status_values(m).get("instruction") for m in probe.messages(f"/{ns}/vla/status")} <= {instruction, "None"}
        assert probe.messages("/vla/eef_delta") == []
    finally:
        for ns in CELLS:
            probe.stop_stream(f"/{ns}/camera/image_raw")
            probe.stop_stream(f"/{ns}/joint_states")
        for spinner in spinners:
            spinner.stop()
