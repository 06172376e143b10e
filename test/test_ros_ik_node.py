"""ik_node with real rclpy, in-process, on the pybullet_data Panda URDF.

A probe node plays the arm (it publishes /joint_states and echoes nothing back unless a test says
so), streams TwistStamped commands and records the node's outputs. Expected tip motion comes from
an independent pinocchio model of the same URDF (FK of the published joint targets).
"""
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.nodes.ik_node import NODE_NAME, PARAMS
from openvla_ros.nodes.params import load_yaml_parameters, validate_all
from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS, PANDA_REST_POSTURE, panda_urdf_path

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
IK_YAML = ROOT / "config" / "ik_node.yaml"
PANDA_YAML = ROOT / "config" / "robots" / "panda.yaml"
PARAM_ARGS = ["--ros-args", "--params-file", str(IK_YAML), "--params-file", str(PANDA_YAML)]
READY = list(PANDA_REST_POSTURE)
CMD = "/test/joint_commands"
STATUS = "/ik_node/status"
TIMEOUT = 10.0


def twist_msg(probe, vx=0.0, vy=0.0, vz=0.0, frame="panda_link0", nan=False):
    from geometry_msgs.msg import TwistStamped

    msg = TwistStamped()
    msg.header.stamp = probe.now_msg()
    msg.header.frame_id = frame
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = vx, vy, vz
    if nan:
        msg.twist.angular.y = float("nan")
    return msg


def joint_state_msg(probe, q):
    from sensor_msgs.msg import JointState

    msg = JointState(name=list(PANDA_FINGER_JOINTS) + list(PANDA_ARM_JOINTS), position=[0.04, 0.04] + list(q))
    msg.header.stamp = probe.now_msg()
    return msg


def status_values(msg) -> dict:
    return {kv.key: kv.value for kv in msg.status[0].values}


@pytest.fixture
def start_ik(rclpy_context, probe):
    started = []

    def start(output_type="joint_state", **overrides):
        from rclpy.parameter import Parameter

        from openvla_ros.nodes.ik_node import make_node

        values = dict(use_sim_urdf=True, output_type=output_type, command_topic=CMD, status_rate_hz=20.0)
        values.update(overrides)
        node = make_node(context=rclpy_context, cli_args=PARAM_ARGS,
                         parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        started.append(spin_in_background(node, rclpy_context))
        return node

    yield start
    for spinner in started:
        spinner.stop()


class FakeArm:
    """Publishes joint states at 100 Hz: READY, or (with `positions_of`) the newest command on CMD,
    like a perfectly tracking position-controlled arm."""

    def __init__(self, probe, positions_of=None):
        from sensor_msgs.msg import JointState

        self.probe, self.q, self.positions_of = probe, list(READY), positions_of
        probe.stream(JointState, "/joint_states", 100.0, self._next)

    def _next(self):
        if self.positions_of is not None:
            msgs = self.probe.messages(CMD)
            if msgs:
                self.q = self.positions_of(msgs[-1])[1]
        return joint_state_msg(self.probe, self.q)


def positions_and_names(output_type):
    def of(msg):
        if output_type == "joint_trajectory":
            return list(msg.joint_names), list(msg.points[0].positions)
        if output_type == "float64_multi_array":
            return list(PANDA_ARM_JOINTS), list(msg.data)
        return list(msg.name), list(msg.position)
    return of


@pytest.mark.parametrize("output_type", ["joint_trajectory", "float64_multi_array", "joint_state"])
def test_twists_become_joint_targets_that_move_the_tip_then_hold_after_the_timeout(output_type, probe, start_ik):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory

    msg_type = {"joint_trajectory": JointTrajectory, "float64_multi_array": Float64MultiArray,
                "joint_state": JointState}[output_type]
    probe.record(msg_type, CMD)
    of = positions_and_names(output_type)
    FakeArm(probe, of)
    start_ik(output_type)
    first = probe.wait_for(CMD, timeout=TIMEOUT)
    assert first is not None, "no joint targets while holding"
    names, q0 = of(first)
    assert names == list(PANDA_ARM_JOINTS)
    np.testing.assert_allclose(q0, READY)  # no twist yet: hold the measured posture
    if output_type == "joint_trajectory":
        assert len(first.points) == 1
        assert first.points[0].time_from_start.sec == 0 and first.points[0].time_from_start.nanosec == 10_000_000

    kin = panda_kinematics()
    started = time.monotonic()
    probe.stream(type(twist_msg(probe)), "/vla/eef_delta", 100.0, lambda: twist_msg(probe, vx=0.05, vz=-0.05))
    time.sleep(1.0)
    probe.stop_stream("/vla/eef_delta")
    stopped = time.monotonic()
    time.sleep(0.5)
    during = [of(m)[1] for m in probe.messages(CMD, since=started)]
    p_start = kin.tip_pose(READY).position
    p_end = kin.tip_pose(during[-1]).position
    moved = p_end - p_start
    # ~1 s of 0.05 m/s along +x and -z (twists arriving for ~1 s, plus up to the 0.1 s timeout).
    direction = np.array([1.0, 0.0, -1.0]) / np.sqrt(2)
    assert moved @ direction == pytest.approx(0.05 * np.sqrt(2) * 1.05, rel=0.25)
    assert np.linalg.norm(moved - (moved @ direction) * direction) < 2e-3  # straight line
    # After the timeout every target is the same hold position.
    late = [r for r in probe.received(CMD, since=stopped + 0.3)]
    assert len(late) > 10
    assert all(np.array_equal(of(r.msg)[1], of(late[0].msg)[1]) for r in late)


def test_wrong_frame_and_nan_twists_are_refused_the_arm_holds_and_status_says_why(probe, start_ik):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import JointState

    probe.record(JointState, CMD)
    probe.record(DiagnosticArray, STATUS)
    FakeArm(probe)
    start_ik()
    probe.stream(TwistStamped, "/vla/eef_delta", 100.0, lambda: twist_msg(probe, vx=0.1, frame="base_link"))
    since = time.monotonic()
    status = probe.wait_for(STATUS, lambda m: status_values(m)["state"] == "bad_command", timeout=TIMEOUT, since=since)
    assert status is not None
    assert "'base_link' is not the base frame 'panda_link0'" in status_values(status)["last_error"]
    assert status.status[0].level == b"\x02"
    time.sleep(0.3)
    assert all(np.allclose(m.position, READY) for m in probe.messages(CMD)), "moved on a refused twist"

    probe.stream(TwistStamped, "/vla/eef_delta", 100.0, lambda: twist_msg(probe, vx=0.1, nan=True))
    since = time.monotonic()
    status = probe.wait_for(STATUS, lambda m: "finite" in status_values(m)["last_error"], timeout=TIMEOUT, since=since)
    assert status is not None and status_values(status)["state"] == "bad_command"
    assert all(np.allclose(m.position, READY) for m in probe.messages(CMD))

    probe.stream(TwistStamped, "/vla/eef_delta", 100.0, lambda: twist_msg(probe, vx=0.1))
    assert probe.wait_for(CMD, lambda m: not np.allclose(m.position, READY), timeout=TIMEOUT) is not None
    probe.stop_stream("/vla/eef_delta")


def test_stale_joint_states_hold(probe, start_ik):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import JointState

    probe.record(JointState, CMD)
    probe.record(DiagnosticArray, STATUS)
    FakeArm(probe)
    start_ik(command_timeout=5.0)
    probe.stream(TwistStamped, "/vla/eef_delta", 100.0, lambda: twist_msg(probe, vy=0.05))
    assert probe.wait_for(CMD, lambda m: not np.allclose(m.position, READY), timeout=TIMEOUT) is not None
    probe.stop_stream("/joint_states")
    since = time.monotonic()
    status = probe.wait_for(STATUS, lambda m: status_values(m)["state"] == "stale_joint_states", timeout=TIMEOUT,
                            since=since)
    assert status is not None
    time.sleep(0.2)
    held = probe.messages(CMD, since=time.monotonic() - 0.15)
    assert len(held) > 5 and all(np.array_equal(m.position, held[0].position) for m in held)
    probe.stop_stream("/vla/eef_delta")


def test_gripper_commands_are_forwarded_and_nan_is_dropped(probe, start_ik):
    from std_msgs.msg import Float64

    probe.record(Float64, "/test/gripper")
    start_ik(gripper_command_topic="/test/gripper")
    pub = probe.publisher(Float64, "/vla/gripper_command")
    assert wait_until(lambda: pub.get_subscription_count() > 0, TIMEOUT)
    for value in (0.25, float("nan"), 0.75):
        pub.publish(Float64(data=value))
    got = probe.wait_for("/test/gripper", lambda m: m.data == 0.75, timeout=TIMEOUT)
    assert got is not None
    assert [m.data for m in probe.messages("/test/gripper")] == [0.25, 0.75]


def test_robot_description_string_and_latched_topic(probe, start_ik, rclpy_context):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from openvla_ros.nodes.ros_common import latched_qos

    xml = Path(panda_urdf_path()).read_text()
    probe.record(JointState, CMD)
    FakeArm(probe)
    node = start_ik(use_sim_urdf=False, robot_description=xml)
    assert node.controller is not None
    assert probe.wait_for(CMD, timeout=TIMEOUT) is not None

    # No URDF parameter: nothing is commanded until /robot_description (latched) arrives.
    node2 = start_ik(use_sim_urdf=False, command_topic="/test/other", robot_description_topic="/test/robot_description")
    probe.record(JointState, "/test/other")
    time.sleep(0.3)
    assert node2.controller is None and probe.messages("/test/other") == []
    probe.publish(String, "/test/robot_description", String(data=xml), qos=latched_qos())
    assert probe.wait_for("/test/other", timeout=TIMEOUT) is not None
    assert node2.controller is not None


def test_configuration_errors_name_the_problem(rclpy_context):
    from rclpy.parameter import Parameter

    from openvla_ros.nodes.ik_node import make_node

    def build(**values):
        return make_node(context=rclpy_context, cli_args=PARAM_ARGS,
                         parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])

    with pytest.raises(ValueError, match="no URDF"):
        build(robot_description_topic="")
    with pytest.raises(ValueError, match="URDF file not found: '/nonexistent.urdf'"):
        build(urdf_path="/nonexistent.urdf")
    with pytest.raises(ValueError, match="frame 'tool0' is not in the URDF"):
        build(use_sim_urdf=True, tip_frame="tool0")
    with pytest.raises(ValueError, match="output_type"):
        build(use_sim_urdf=True, output_type="velocity")


def test_config_files_hold_every_parameter_and_validate():
    base = load_yaml_parameters(IK_YAML, NODE_NAME)
    assert set(base) == {s.name for s in PARAMS}, "config/ik_node.yaml and ik_node.PARAMS differ"
    defaults = {s.name: s.default for s in PARAMS}
    for name, value in base.items():
        assert value == defaults[name], name
    robot = load_yaml_parameters(PANDA_YAML, NODE_NAME)
    validated = validate_all(PARAMS, {**base, **robot})
    assert validated["joint_names"] == list(PANDA_ARM_JOINTS)
    assert validated["rest_posture"] == READY
    with open(PANDA_YAML) as f:
        assert set(yaml.safe_load(f)["/**/ik_node"]["ros__parameters"]) <= {s.name for s in PARAMS}


def test_list_parameters_with_empty_defaults_keep_their_element_type():
    from openvla_ros.nodes.params import ParamSpec

    spec = ParamSpec("position_lower", [], "limits", item_type=float)
    assert spec.validate([1, 2.5]) == [1.0, 2.5] and isinstance(spec.validate([1])[0], float)
    with pytest.raises(ValueError, match="'position_lower': expected a list of finite numbers"):
        spec.validate([0.1, float("nan")])
    with pytest.raises(ValueError, match="finite numbers"):
        spec.validate(["a"])
    names = ParamSpec("joint_names", [], "joints", item_type=str)
    with pytest.raises(ValueError, match="'joint_names': expected a list of str"):
        names.validate(["a", 1])
