"""sim_node with real rclpy: what it publishes, the reset service, bad commands, simulated time,
and the closed arm loop with ik_node (tip moves along the commanded twist, halts when twists stop)
for each of the three joint command formats, once with sim_node in a separate process.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.nodes.ros_common import latched_qos, stamp_to_seconds
from openvla_ros.sim.scene import CameraConfig
from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import (PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS, PANDA_REST_POSTURE, PandaScene,
                                   instruction_for, target_for_seed)

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
SIM_ARGS = ["--ros-args", "--params-file", str(CONFIG / "sim_node.yaml")]
IK_ARGS = ["--ros-args", "--params-file", str(CONFIG / "ik_node.yaml"), "--params-file",
           str(CONFIG / "robots" / "panda.yaml")]
TIMEOUT = 15.0
READY = np.array(PANDA_REST_POSTURE)


def params(**values):
    from rclpy.parameter import Parameter

    return [Parameter(k, value=v) for k, v in values.items()]


def status_values(msg) -> dict:
    return {kv.key: kv.value for kv in msg.status[0].values}


def position_of(pose_msg) -> np.ndarray:
    p = pose_msg.pose.position
    return np.array([p.x, p.y, p.z])


@pytest.fixture
def start(rclpy_context):
    spinners = []

    def start_node(module, args, **overrides):
        node = module.make_node(context=rclpy_context, cli_args=args, parameter_overrides=params(**overrides))
        spinners.append(spin_in_background(node, rclpy_context))
        return node

    yield start_node
    for spinner in reversed(spinners):
        spinner.stop()


def test_publishes_joint_states_camera_poses_and_the_latched_instruction(probe, start):
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import CameraInfo, Image, JointState
    from std_msgs.msg import String

    from openvla_ros.nodes import sim_node

    for msg_type, topic in ((JointState, "/joint_states"), (Image, "/camera/image_raw"),
                            (CameraInfo, "/camera/camera_info"), (PoseStamped, "/sim/tip_pose"),
                            (PoseStamped, "/sim/cubes/red"), (PoseStamped, "/sim/cubes/blue")):
        probe.record(msg_type, topic)
    start(sim_node, SIM_ARGS, seed=5)
    probe.record(String, "/vla/instruction", qos=latched_qos())  # after the node: transient_local delivers it
    instruction = probe.wait_for("/vla/instruction", timeout=TIMEOUT)
    assert instruction is not None and instruction.data == instruction_for(target_for_seed(5))

    image = probe.wait_for("/camera/image_raw", timeout=TIMEOUT)
    assert image is not None
    assert (image.height, image.width, image.encoding, image.step) == (224, 224, "rgb8", 672)
    assert image.header.frame_id == "camera" and len(image.data) == 224 * 672
    info = probe.wait_for("/camera/camera_info", timeout=TIMEOUT)
    fov = CameraConfig().fov_deg  # the default camera, as config/sim_node.yaml has it
    assert info.k[2] == 112.0 and info.k[5] == 112.0 and info.k[0] == pytest.approx(112.0 / np.tan(np.radians(fov / 2)))

    js = probe.wait_for("/joint_states", timeout=TIMEOUT)
    assert list(js.name) == list(PANDA_ARM_JOINTS + PANDA_FINGER_JOINTS)
    np.testing.assert_allclose(js.position[:7], READY, atol=0.02)
    np.testing.assert_allclose(js.position[7:], [0.04, 0.04], atol=0.002)  # gripper open

    # The camera shows the same scene as a fresh local one with the same seed (arm at rest).
    local = PandaScene(seed=5)
    try:
        expected_image = local.render()
        cubes = local.cube_positions()
        tip = local.tip_position()
    finally:
        local.close()
    received = np.frombuffer(bytes(image.data), np.uint8).reshape(224, 224, 3)
    assert np.mean(np.abs(received.astype(int) - expected_image.astype(int))) < 2.0
    for colour in ("red", "blue"):
        pose = probe.wait_for(f"/sim/cubes/{colour}", timeout=TIMEOUT)
        assert pose.header.frame_id == "panda_link0"
        np.testing.assert_allclose(position_of(pose), cubes[colour], atol=1e-3)
    tip_msg = probe.wait_for("/sim/tip_pose", timeout=TIMEOUT)
    np.testing.assert_allclose(position_of(tip_msg), tip, atol=5e-3)
    np.testing.assert_allclose(position_of(tip_msg), panda_kinematics().tip_pose(js.position[:7]).position, atol=2e-3)
    # Real time: stamps are the ROS clock's (wall) time.
    assert abs(stamp_to_seconds(js.header.stamp) - time.time()) < 5.0


def test_reset_service_starts_the_next_seeded_episode_and_republishes_the_instruction(probe, start):
    from geometry_msgs.msg import PoseStamped
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from openvla_ros.nodes import sim_node

    probe.record(String, "/vla/instruction", qos=latched_qos())
    probe.record(PoseStamped, "/sim/cubes/red")
    start(sim_node, SIM_ARGS, seed=7)
    assert probe.wait_for("/vla/instruction", timeout=TIMEOUT) is not None
    reply = probe.call(Trigger, "/sim_node/reset", Trigger.Request(), timeout=TIMEOUT)
    expected = instruction_for(target_for_seed(8))
    assert reply.success and reply.message == f"seed 8: {expected}"
    assert probe.wait_for("/vla/instruction", lambda m: m.data == expected, timeout=TIMEOUT) is not None
    local = PandaScene(seed=8)
    try:
        red = local.cube_position("red")
    finally:
        local.close()
    since = time.monotonic()
    pose = probe.wait_for("/sim/cubes/red", timeout=TIMEOUT, since=since)
    np.testing.assert_allclose(position_of(pose), red, atol=1e-3)


def test_bad_commands_are_logged_counted_and_ignored(probe, start):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64

    from openvla_ros.nodes import sim_node

    probe.record(JointState, "/joint_states")
    probe.record(DiagnosticArray, "/sim_node/status")
    node = start(sim_node, SIM_ARGS, status_rate_hz=10.0)
    pub = probe.publisher(JointState, "/joint_commands")
    assert wait_until(lambda: pub.get_subscription_count() > 0, TIMEOUT)
    names = list(PANDA_ARM_JOINTS)
    bad = [JointState(name=names, position=[float("nan")] + list(READY[1:])),
           JointState(name=names[:6], position=list(READY[:6])),
           JointState(name=names, position=list(READY[:3]) + [1.0] + list(READY[4:]))]  # joint 4 above 0
    for msg in bad:
        pub.publish(msg)
    gripper = probe.publisher(Float64, "/vla/gripper_command")
    gripper.publish(Float64(data=float("nan")))
    status = probe.wait_for("/sim_node/status",
                            lambda m: int(status_values(m).get("counters.bad_commands", 0)) == 2
                            and int(status_values(m).get("counters.errors", 0)) == 2, timeout=TIMEOUT)
    assert status is not None, "bad commands not counted"
    assert "gripper" in status_values(status)["last_error"] or "limits" in status_values(status)["last_error"]
    np.testing.assert_allclose(node.sim.scene.joint_targets, READY)
    # Still alive and obeying good commands (in any joint order).
    target = READY + np.array([0.15, 0, 0, 0, 0, 0, 0])
    pub.publish(JointState(name=names[::-1], position=list(target[::-1])))
    moved = probe.wait_for("/joint_states", lambda m: abs(m.position[0] - target[0]) < 0.01, timeout=TIMEOUT)
    assert moved is not None


def test_simulated_time_publishes_clock_and_stamps_with_it(probe, start):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, JointState

    from openvla_ros.nodes import sim_node

    probe.record(Clock, "/clock")
    probe.record(JointState, "/joint_states")
    probe.record(Image, "/camera/image_raw")
    start(sim_node, SIM_ARGS, real_time=False, speed=2.0)
    assert probe.wait_for("/camera/image_raw", lambda m: stamp_to_seconds(m.header.stamp) >= 0.3,
                          timeout=TIMEOUT) is not None
    clocks = [stamp_to_seconds(m.clock) for m in probe.messages("/clock")]
    assert len(clocks) > 10 and clocks[0] < 0.5
    assert all(b > a for a, b in zip(clocks, clocks[1:]))
    dt = 1.0 / 240.0
    assert all(abs(c / dt - round(c / dt)) < 1e-3 for c in clocks)  # on the physics grid
    for m in probe.messages("/camera/image_raw"):
        t = stamp_to_seconds(m.header.stamp)
        k = round(t / 0.1)
        assert k * 0.1 - 1e-6 <= t <= k * 0.1 + dt + 1e-6  # the camera's slots in simulated time
    js = [stamp_to_seconds(m.header.stamp) for m in probe.messages("/joint_states")]
    assert js and max(js) <= max(clocks) + 1e-9 + 1.0


def run_sim_node_process(extra_args):
    """sim_node as its own process (`python -m`), isolated by the test session's ROS environment."""
    return subprocess.Popen([sys.executable, "-m", "openvla_ros.nodes.sim_node", *SIM_ARGS, *extra_args],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("command_type, separate_process", [
    ("joint_state", True),
    ("float64_multi_array", False),
    ("joint_trajectory", False),
])
def test_ik_node_drives_the_simulated_tip_along_the_twist_and_halts_when_twists_stop(
        command_type, separate_process, probe, start):
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from sensor_msgs.msg import JointState

    from openvla_ros.nodes import ik_node, sim_node

    probe.record(PoseStamped, "/sim/tip_pose")
    probe.record(JointState, "/joint_states")
    process = None
    if separate_process:
        process = run_sim_node_process(["-p", f"command_type:={command_type}"])
    else:
        start(sim_node, SIM_ARGS, command_type=command_type)
    try:
        assert probe.wait_for("/sim/tip_pose", timeout=TIMEOUT) is not None, "sim_node not publishing"
        ik = start(ik_node, IK_ARGS, use_sim_urdf=True, output_type=command_type, command_topic="/joint_commands",
                   command_timeout=0.1)
        assert wait_until(lambda: ik.controller is not None and ik.controller.status()["state"] == "no_command",
                          TIMEOUT), "ik_node did not get joint states"
        time.sleep(0.3)  # settle
        p0 = position_of(probe.messages("/sim/tip_pose")[-1])
        velocity = np.array([0.0, 0.08, -0.04])

        def twist():
            msg = TwistStamped()
            msg.header.stamp, msg.header.frame_id = probe.now_msg(), "panda_link0"
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in velocity)
            return msg

        # The seconds of twist the controller integrated (the sum of its ticks' measured periods).
        # The expected distance follows these, not the wall clock: on a loaded machine the test's own
        # publisher can deliver fewer than 100 twists a second, and the controller rightly holds
        # between them once command_timeout passes.
        integrated_s = []
        controller_tick = ik.controller.tick

        def counting_tick():
            out = controller_tick()
            integrated_s.append(out.dt)  # 0 while holding
            return out

        ik.controller.tick = counting_tick
        started = time.monotonic()
        probe.stream(TwistStamped, "/vla/eef_delta", 100.0, twist)
        time.sleep(1.0)
        probe.stop_stream("/vla/eef_delta")
        stopped = time.monotonic()
        time.sleep(0.6)
        poses = probe.received("/sim/tip_pose", since=started)
        p_end = position_of(poses[-1].msg)
        moved = p_end - p0
        commanded_s = sum(integrated_s)
        counters = ik.controller.counters
        assert 0.25 < commanded_s <= stopped - started + 0.1 + 0.05, \
            f"integrated {commanded_s:.3f} s of a 1 s twist stream; ik_node counters {counters}"
        # Along the command: |v| times the integrated time (the arm catches up during the 0.6 s wait).
        along = moved @ velocity / np.linalg.norm(velocity)
        # (A shortfall with many reseeds means the arm lagged its commands by more than the reseed threshold.)
        assert along == pytest.approx(np.linalg.norm(velocity) * commanded_s, rel=0.15), \
            f"moved {along:.3f} m along the twist in {commanded_s:.3f} s of commands; ik_node counters {counters}"
        sideways = moved - along * velocity / np.linalg.norm(velocity)
        assert np.linalg.norm(sideways) < 0.01
        # Halted: the twist timeout plus the arm settling, then no motion.
        settled = [position_of(r.msg) for r in poses if r.time > stopped + 0.4]
        assert len(settled) > 5
        assert np.max(np.linalg.norm(np.array(settled) - settled[-1], axis=1)) < 1e-3
        assert ik.controller.status()["state"] == "command_timeout"
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            try:
                output, _ = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
            assert process.returncode == 0, output


def test_sim_node_config_file_holds_every_parameter_with_its_default():
    from openvla_ros.nodes.params import load_yaml_parameters
    from openvla_ros.nodes.sim_node import NODE_NAME, PARAMS

    values = load_yaml_parameters(CONFIG / "sim_node.yaml", NODE_NAME)
    assert set(values) == {s.name for s in PARAMS}
    for spec in PARAMS:
        assert spec.validate(values[spec.name]) == spec.default, spec.name
