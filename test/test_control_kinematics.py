"""ArmKinematics against pybullet's Franka Panda (pybullet_data URDF, a model nobody here wrote)."""
from __future__ import annotations

import os

import numpy as np
import pinocchio as pin
import pybullet
import pybullet_data
import pytest
import yaml

from openvla_ros.control.kinematics import (
    ArmKinematics,
    IkStatus,
    WORKSPACE_TOLERANCE_M,
    WorkspaceBox,
    kinematics_from_params,
)

URDF = os.path.join(pybullet_data.getDataPath(), "franka_panda", "panda.urdf")
ARM = [f"panda_joint{i}" for i in range(1, 8)]
READY = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
BOX = WorkspaceBox((0.2, -0.45, 0.015), (0.8, 0.45, 0.7))
PANDA_YAML = os.path.join(os.path.dirname(__file__), "..", "config", "robots", "panda.yaml")

# Tracking tolerance of a twist held 1 s at 100 Hz: first-order integration drifts by the
# curvature of the FK over each step; measured 0.02-0.3 mm / 0.02-0.3 mrad for 0.1 m/s, 0.5 rad/s.
POS_TOL_M = 1e-3
ROT_TOL_RAD = 2e-3


@pytest.fixture(scope="module")
def kin():
    return ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, rest_posture=READY, workspace=BOX)


@pytest.fixture(scope="module")
def bullet():
    client = pybullet.connect(pybullet.DIRECT)
    robot = pybullet.loadURDF(URDF, useFixedBase=True, physicsClientId=client)
    links = {pybullet.getJointInfo(robot, i, physicsClientId=client)[12].decode(): i
             for i in range(pybullet.getNumJoints(robot, physicsClientId=client))}
    yield client, robot, links
    pybullet.disconnect(client)


def _bullet_link_pose(bullet, q, link):
    client, robot, links = bullet
    for i, v in enumerate(q):
        pybullet.resetJointState(robot, i, float(v), physicsClientId=client)
    ls = pybullet.getLinkState(robot, links[link], computeForwardKinematics=True, physicsClientId=client)
    return np.array(ls[4]), np.array(pybullet.getMatrixFromQuaternion(ls[5])).reshape(3, 3)


def _rot_err(Ra, Rb):
    return float(np.linalg.norm(pin.log3(Ra.T @ Rb)))


@pytest.mark.parametrize("tip", ["panda_grasptarget", "panda_hand", "panda_link7"])
def test_fk_matches_pybullet_link_frames(bullet, tip):
    kin = ArmKinematics.from_urdf(URDF, "panda_link0", tip, ARM)
    rng = np.random.default_rng(7)
    pos_err, rot_err = [], []
    for _ in range(100):
        q = rng.uniform(kin.position_lower, kin.position_upper)
        pose = kin.tip_pose(q)
        p_ref, R_ref = _bullet_link_pose(bullet, q, tip)
        pos_err.append(np.linalg.norm(pose.position - p_ref))
        rot_err.append(_rot_err(pose.rotation, R_ref))
    # pybullet reports float32-ish link frames; pinocchio is float64.
    assert max(pos_err) < 1e-6
    assert max(rot_err) < 1e-5


def test_robot_description_string_and_default_chain_give_the_same_model(kin):
    with open(URDF) as f:
        xml = f.read()
    from_xml = ArmKinematics.from_urdf(xml, "panda_link0", "panda_grasptarget")
    # The default joint list is the base->tip chain: the fingers are not part of it.
    assert from_xml.joint_names == tuple(ARM)
    np.testing.assert_allclose(from_xml.position_lower, [-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671])
    np.testing.assert_allclose(from_xml.velocity_limits, [2.175] * 4 + [2.61] * 3)
    q = np.array([0.3, -0.2, 0.1, -1.9, 0.4, 1.2, -0.5])
    np.testing.assert_allclose(from_xml.tip_pose(q).as_matrix(), kin.tip_pose(q).as_matrix(), atol=1e-12)


def test_controller_joint_order_is_honoured(bullet):
    order = ARM[::-1]
    kin_rev = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", order)
    q = np.array([0.3, -0.2, 0.1, -1.9, 0.4, 1.2, -0.5])
    p_ref, _ = _bullet_link_pose(bullet, q, "panda_grasptarget")
    np.testing.assert_allclose(kin_rev.tip_pose(q[::-1]).position, p_ref, atol=1e-6)
    np.testing.assert_allclose(kin_rev.position_upper, [2.9671, 3.8223, 2.9671, 0.0, 2.9671, 1.8326, 2.9671])


def _hold(kin, q, twist, seconds=1.0, rate=100.0, frame=None):
    statuses = set()
    for _ in range(int(round(seconds * rate))):
        res = kin.step(q, twist, 1.0 / rate, twist_frame=frame)
        statuses.add(res.status)
        q = res.q_next
    return q, statuses


@pytest.mark.parametrize("twist", [
    [0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, -0.1, -0.1, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
    [0.0, 0.0, 0.0, 0.3, -0.2, 0.0],
    [0.05, 0.05, -0.05, 0.2, -0.2, 0.2],
])
def test_twist_in_base_frame_held_one_second_moves_tip_by_twist(kin, twist):
    twist = np.array(twist)
    start = kin.tip_pose(READY)
    q, statuses = _hold(kin, READY, twist)
    end = kin.tip_pose(q)
    assert statuses == {IkStatus.OK}
    # Base-frame twist of the tip origin: position moves by v*t, orientation turns by exp(w*t).
    assert np.linalg.norm(end.position - (start.position + twist[:3])) < POS_TOL_M
    assert _rot_err(end.rotation, pin.exp3(twist[3:]) @ start.rotation) < ROT_TOL_RAD


@pytest.mark.parametrize("twist", [
    [0.0, 0.0, 0.1, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
    [0.05, 0.0, 0.05, 0.0, 0.0, 0.4],
])
def test_twist_in_tool_frame_is_a_body_twist(kin, twist):
    twist = np.array(twist)
    start = kin.tip_pose(READY)
    q, statuses = _hold(kin, READY, twist, frame="tool")
    end = kin.tip_pose(q)
    assert statuses == {IkStatus.OK}
    expected = pin.SE3(start.rotation, start.position) * pin.exp6(pin.Motion(twist[:3], twist[3:]))
    assert np.linalg.norm(end.position - expected.translation) < POS_TOL_M
    assert _rot_err(end.rotation, expected.rotation) < ROT_TOL_RAD
    # The hand points down at READY: +z of the tool is -z of the base.
    if np.allclose(twist, [0, 0, 0.1, 0, 0, 0]):
        assert end.position[2] < start.position[2] - 0.09


def test_random_twists_never_violate_limits_or_workspace(kin):
    rng = np.random.default_rng(3)
    dt = 0.01
    q = READY.copy()
    lo, hi, vmax = kin.position_lower, kin.position_upper, kin.velocity_limits
    seen = set()
    worst_box = 0.0
    twist = np.zeros(6)
    for i in range(10_000):
        if i % 40 == 0:  # piecewise-constant commands wander far enough to hit every limit
            twist = np.concatenate([rng.uniform(-0.6, 0.6, 3), rng.uniform(-2.5, 2.5, 3)])
        res = kin.step(q, twist, dt)
        assert np.all(np.isfinite(res.q_next))
        assert np.all(res.q_next >= lo) and np.all(res.q_next <= hi), (i, res)
        assert np.all(np.abs(res.q_next - q) <= vmax * dt + 1e-12), (i, res)
        p = kin.tip_pose(res.q_next).position
        worst_box = max(worst_box, float(np.max(np.maximum(np.asarray(BOX.lower) - p, p - np.asarray(BOX.upper)))))
        seen |= res.active
        q = res.q_next
    assert worst_box <= WORKSPACE_TOLERANCE_M + 1e-12
    # The walk really pressed against every kind of limit.
    assert {IkStatus.JOINT_LIMIT, IkStatus.VELOCITY_LIMIT, IkStatus.WORKSPACE_LIMIT} <= seen


def test_velocity_scaling_keeps_the_commanded_direction(kin):
    slow = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, rest_posture=READY,
                                   velocity_limits=[0.05] * 7, nullspace_gain=0.0)
    twist = np.array([0.3, 0.2, -0.1, 0.0, 0.0, 0.0])
    res = slow.step(READY, twist, 0.01)
    assert res.status is IkStatus.VELOCITY_LIMIT and 0 < res.scale < 1
    dq = res.q_next - READY
    assert np.max(np.abs(dq)) == pytest.approx(0.05 * 0.01, rel=1e-9)
    moved = slow.tip_pose(res.q_next).position - slow.tip_pose(READY).position
    cos = moved @ twist[:3] / (np.linalg.norm(moved) * np.linalg.norm(twist[:3]))
    assert cos > 0.9999
    assert np.linalg.norm(moved) == pytest.approx(res.scale * np.linalg.norm(twist[:3]) * 0.01, rel=1e-3)


def test_joint_limit_stops_the_whole_step_at_the_limit():
    kin = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, position_margin=0.0, nullspace_gain=0.0)
    q = READY.copy()
    q[0] = kin.position_upper[0] - 1e-3
    res = kin.step(q, [0, 0, 0, 0, 0, 1.0], 0.05)  # yaw about base z: mostly joint 1 and joint 7
    unscaled = kin.step(q, [0, 0, 0, 0, 0, 1.0], 1e-4)  # tiny step: no limit, same direction
    assert res.status is IkStatus.JOINT_LIMIT and res.scale < 1
    assert np.max(res.q_next - kin.position_upper) <= 1e-12
    d_lim = res.q_next - q
    d_free = unscaled.q_next - q
    cos = d_lim @ d_free / (np.linalg.norm(d_lim) * np.linalg.norm(d_free))
    assert cos > 0.9999  # scaled, not bent


def test_position_limit_override_and_margin():
    lower = [-1.0, -1.0, -1.0, -2.5, -1.0, 0.5, -1.0]
    upper = [1.0, 1.0, 1.0, -0.5, 1.0, 2.5, 1.0]
    kin = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, position_lower=lower,
                                  position_upper=upper, position_margin=0.05, rest_posture=READY)
    np.testing.assert_allclose(kin.position_lower, lower)
    q = READY.copy()
    rng = np.random.default_rng(0)
    for i in range(600):
        twist = np.concatenate([rng.uniform(-0.5, 0.5, 3), rng.uniform(-2, 2, 3)]) if i % 30 == 0 else twist
        q = kin.step(q, twist, 0.02).q_next
        assert np.all(q >= np.array(lower) + 0.05 - 1e-12) and np.all(q <= np.array(upper) - 0.05 + 1e-12)


def test_workspace_wall_cuts_the_outward_component_only(kin):
    # Start 1 cm above the floor of the box and command down-and-forward: the tip slides forward.
    q = READY.copy()
    for _ in range(200):
        res = kin.step(q, [0.0, 0.0, -0.3, 0.0, 0.0, 0.0], 0.01)
        q = res.q_next
    p0 = kin.tip_pose(q).position
    assert p0[2] == pytest.approx(BOX.lower[2], abs=2e-3)
    res = kin.step(q, [0.1, 0.0, -0.1, 0.0, 0.0, 0.0], 0.01)
    p1 = kin.tip_pose(res.q_next).position
    assert IkStatus.WORKSPACE_LIMIT in res.active
    assert p1[2] >= BOX.lower[2] - 1e-6
    assert p1[0] - p0[0] == pytest.approx(0.001, abs=5e-5)


def test_outside_the_box_only_motion_back_inside_is_allowed(kin):
    q = READY.copy()  # tip at z 0.485: inside a box that tops out at 0.4 it is not
    low_box = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, rest_posture=READY,
                                      workspace=WorkspaceBox((0.2, -0.45, 0.015), (0.8, 0.45, 0.4)))
    z0 = low_box.tip_pose(q).position[2]
    up = low_box.step(q, [0, 0, 0.1, 0, 0, 0], 0.01)
    assert up.status is IkStatus.WORKSPACE_LIMIT and up.halted
    np.testing.assert_array_equal(up.q_next, q)
    down = low_box.step(q, [0, 0, -0.1, 0, 0, 0], 0.01)
    assert down.status is IkStatus.OK
    assert low_box.tip_pose(down.q_next).position[2] == pytest.approx(z0 - 0.001, abs=1e-5)


def test_stretching_the_arm_decelerates_then_halts_and_reverse_is_allowed(kin):
    lower, hard = kin.singularity_thresholds
    free = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, rest_posture=READY)
    q = READY.copy()
    seq = []
    for _ in range(400):  # push the hand straight out along +x at 0.2 m/s for 4 s
        res = free.step(q, [0.2, 0, 0, 0, 0, 0], 0.01)
        seq.append(res)
        q = res.q_next
        assert free.condition_number(q) < hard
    statuses = [r.status for r in seq]
    first_decel = statuses.index(IkStatus.DECELERATE_FOR_SINGULARITY)
    first_halt = statuses.index(IkStatus.HALT_FOR_SINGULARITY)
    assert 0 < first_decel < first_halt
    assert all(s is IkStatus.HALT_FOR_SINGULARITY for s in statuses[first_halt:])
    decel_scales = [r.scale for r in seq[first_decel:first_halt] if r.status is IkStatus.DECELERATE_FOR_SINGULARITY]
    assert all(0 < s < 1 for s in decel_scales) and decel_scales[-1] < decel_scales[0]
    assert seq[first_halt].condition_number > lower
    halted = free.step(q, [0.2, 0, 0, 0, 0, 0], 0.01)
    assert halted.status is IkStatus.HALT_FOR_SINGULARITY and halted.halted
    np.testing.assert_array_equal(halted.q_next, q)
    # Moving back towards the body leaves the singularity: allowed at full speed.
    back = free.step(q, [-0.2, 0, 0, 0, 0, 0], 0.01)
    assert back.status is not IkStatus.HALT_FOR_SINGULARITY and back.scale > 0
    assert free.tip_pose(back.q_next).position[0] < free.tip_pose(q).position[0]


def test_exactly_singular_pose_gives_finite_targets_and_never_moves_against_the_command():
    kin = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, position_margin=0.0)
    q0 = np.zeros(7)  # arm straight up, wrist axes aligned: rank-deficient Jacobian
    assert kin.condition_number(q0) > 1e6
    for twist in ([0, 0, 0.1, 0, 0, 0], [0.1, 0, 0, 0, 0, 0], [0, 0.1, -0.1, 0, 0, 0]):
        q = q0.copy()
        for _ in range(20):
            res = kin.step(q, twist, 0.01)
            assert np.all(np.isfinite(res.q_next))
            assert np.all(np.abs(res.q_next - q) <= kin.velocity_limits * 0.01 + 1e-12)
            moved = kin.tip_pose(res.q_next).position - kin.tip_pose(q).position
            assert moved @ np.asarray(twist[:3]) >= -1e-9
            q = res.q_next


def test_nullspace_pull_does_not_change_the_tip_motion():
    with_pull = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, rest_posture=READY, nullspace_gain=2.0)
    no_pull = ArmKinematics.from_urdf(URDF, "panda_link0", "panda_grasptarget", ARM, rest_posture=READY, nullspace_gain=0.0)
    # An elbow-rotated posture with the same task: the pull moves it back towards READY.
    q = READY + np.array([0.4, 0.0, -0.4, 0.0, 0.2, 0.0, 0.0])
    twist = [0.02, 0.0, 0.0, 0.0, 0.0, 0.0]
    a, b = with_pull.step(q, twist, 0.01), no_pull.step(q, twist, 0.01)
    tip = with_pull.tip_pose(q).position
    da = with_pull.tip_pose(a.q_next).position - tip
    db = no_pull.tip_pose(b.q_next).position - tip
    np.testing.assert_allclose(da, db, atol=2e-6)
    assert np.linalg.norm(a.q_next - READY) < np.linalg.norm(b.q_next - READY) - 1e-3


def test_zero_twist_does_not_move(kin):
    q = READY + 0.1
    res = kin.step(q, np.zeros(6), 0.01)
    assert res.status is IkStatus.OK
    np.testing.assert_array_equal(res.q_next, q)


@pytest.mark.parametrize("bad, word", [
    ([np.nan, 0, 0, 0, 0, 0], "twist"),
    ([0, 0, 0, np.inf, 0, 0], "twist"),
    ([0, 0, 0], "twist"),
    ("fast", "twist"),
])
def test_bad_twist_raises_value_error_naming_it(kin, bad, word):
    with pytest.raises(ValueError, match=word):
        kin.step(READY, bad, 0.01)


def test_bad_q_dt_and_frame_raise(kin):
    with pytest.raises(ValueError, match="joint positions q"):
        kin.step(np.r_[READY[:6], np.nan], np.zeros(6), 0.01)
    with pytest.raises(ValueError, match="joint positions q"):
        kin.step(READY[:6], np.zeros(6), 0.01)
    for dt in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dt"):
            kin.step(READY, np.zeros(6), dt)
    with pytest.raises(ValueError, match="twist_frame"):
        kin.step(READY, np.zeros(6), 0.01, twist_frame="world")


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="panda_tool0"):
        ArmKinematics.from_urdf(URDF, "panda_link0", "panda_tool0")
    with pytest.raises(ValueError, match="not found"):
        ArmKinematics.from_urdf("/nonexistent/robot.urdf", "a", "b")
    with pytest.raises(ValueError, match="robot_description"):
        ArmKinematics.from_urdf("<robot name='x'><link name='a'/><joint", "a", "b")
    with pytest.raises(ValueError, match="velocity_limits"):
        ArmKinematics.from_urdf(URDF, "panda_link0", "panda_hand", ARM, velocity_limits=[1.0] * 6 + [-1.0])
    with pytest.raises(ValueError, match="moves with"):
        ArmKinematics.from_urdf(URDF, "panda_link3", "panda_hand", ARM)
    with pytest.raises(ValueError, match="workspace"):
        WorkspaceBox((0.5, 0, 0), (0.4, 1, 1))
    with pytest.raises(ValueError, match="singularity_hard_stop"):
        ArmKinematics.from_urdf(URDF, "panda_link0", "panda_hand", ARM, singularity_lower=20, singularity_hard_stop=10)


def test_panda_yaml_builds_the_same_kinematics(kin):
    with open(PANDA_YAML) as f:
        params = yaml.safe_load(f)["/**/ik_node"]["ros__parameters"]
    from_yaml = kinematics_from_params(params["urdf_path"] or URDF, params)
    assert from_yaml.joint_names == tuple(ARM)
    assert from_yaml.workspace == BOX
    np.testing.assert_allclose(from_yaml.rest_posture, READY)
    res_a = from_yaml.step(READY, [0.1, 0, -0.05, 0, 0, 0.2], 0.01)
    res_b = kin.step(READY, [0.1, 0, -0.05, 0, 0, 0.2], 0.01)
    np.testing.assert_allclose(res_a.q_next, res_b.q_next, atol=1e-12)
    with pytest.raises(ValueError, match="workspace_min"):
        kinematics_from_params(URDF, {**params, "workspace_max": []})
