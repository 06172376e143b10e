"""IkController (ik_node's logic without ROS) on the pybullet_data Panda, time driven by a manual clock.

The arm is emulated as perfect (the measured joints are the commanded ones) unless a test says
otherwise; expected tip motion comes from pinocchio FK of the returned joint targets.
"""
import math

import numpy as np
import pytest
from conftest import ManualClock

from openvla_ros.control.ik_controller import (
    STATE_BAD_COMMAND,
    STATE_COMMAND_TIMEOUT,
    STATE_IK_HALTED,
    STATE_NO_COMMAND,
    STATE_OK,
    STATE_STALE_JOINT_STATES,
    STATE_WAITING_FOR_JOINT_STATES,
    IkController,
    order_joint_positions,
    resolve_urdf_source,
)
from openvla_ros.control.kinematics import ArmKinematics, IkStatus
from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS, PANDA_REST_POSTURE, panda_urdf_path

READY = np.array(PANDA_REST_POSTURE)
RATE = 100.0
PERIOD = 1.0 / RATE
# First-order integration error of 0.1 s of motion at 0.1 m/s (kinematics tests: ~0.3 mm per second).
POS_TOL_M = 1e-4


@pytest.fixture(scope="module")
def kin():
    return panda_kinematics()


def make(kin, clock, **kw):
    return IkController(kin, rate_hz=RATE, clock=clock, **kw)


def feed(ctrl, q, names=PANDA_ARM_JOINTS):
    ctrl.on_joint_state(list(names), list(q))


def run(ctrl, clock, kin, ticks, twist=None, frame="panda_link0", dt=PERIOD, perfect_arm=True):
    """Advance `ticks` periods: (optionally) a twist each tick, joint states echoing the targets."""
    outs = []
    for _ in range(ticks):
        clock.advance(dt)
        if twist is not None:
            ctrl.on_twist(frame, twist)
        out = ctrl.tick()
        outs.append(out)
        if perfect_arm and out.q_target is not None:
            feed(ctrl, out.q_target)
    return outs


def test_twist_moves_the_tip_by_twist_times_elapsed_time(kin):
    clock = ManualClock(10.0)
    ctrl = make(kin, clock)
    feed(ctrl, READY)
    p0 = kin.tip_pose(READY).position
    twist = np.array([0.1, -0.05, 0.02, 0, 0, 0])
    outs = run(ctrl, clock, kin, 10, twist)
    assert [o.state for o in outs] == [STATE_OK] * 10
    elapsed = sum(o.dt for o in outs)
    assert elapsed == pytest.approx(10 * PERIOD)  # first tick: one nominal period
    moved = kin.tip_pose(outs[-1].q_target).position - p0
    np.testing.assert_allclose(moved, twist[:3] * elapsed, atol=POS_TOL_M)
    # Orientation held (zero angular twist) within the same first-order error.
    r0, r1 = kin.tip_pose(READY).rotation, kin.tip_pose(outs[-1].q_target).rotation
    assert np.arccos(np.clip((np.trace(r0.T @ r1) - 1) / 2, -1, 1)) < 1e-3


def test_irregular_ticks_integrate_the_measured_time_capped_after_a_stall(kin):
    clock = ManualClock()
    ctrl = make(kin, clock)
    feed(ctrl, READY)
    twist = np.array([0.0, 0.1, 0.0, 0, 0, 0])
    ctrl.on_twist("panda_link0", twist)
    ctrl.tick()
    for dt in (0.004, 0.016, 0.009):
        clock.advance(dt)
        ctrl.on_twist("panda_link0", twist)
        out = ctrl.tick()
        assert out.dt == pytest.approx(dt)
    total = PERIOD + 0.004 + 0.016 + 0.009
    moved = kin.tip_pose(out.q_target).position - kin.tip_pose(READY).position
    np.testing.assert_allclose(moved, twist[:3] * total, atol=POS_TOL_M)
    # A 0.05 s stall (twist still fresh) integrates at most two periods: no jump.
    ctrl.command_timeout = 1.0
    clock.advance(0.05)
    feed(ctrl, out.q_target)
    ctrl.on_twist("panda_link0", twist)
    late = ctrl.tick()
    assert late.dt == pytest.approx(2 * PERIOD)


def test_nothing_is_commanded_before_the_first_joint_state_and_holds_without_twists(kin):
    clock = ManualClock()
    ctrl = make(kin, clock)
    ctrl.on_twist("panda_link0", [0.1, 0, 0, 0, 0, 0])
    out = ctrl.tick()
    assert out.q_target is None and out.state == STATE_WAITING_FOR_JOINT_STATES
    ctrl2 = make(kin, clock)
    feed(ctrl2, READY)
    out = ctrl2.tick()
    assert out.state == STATE_NO_COMMAND
    np.testing.assert_array_equal(out.q_target, READY)


def test_command_timeout_holds_the_last_commanded_position(kin):
    clock = ManualClock()
    ctrl = make(kin, clock, command_timeout=0.1)
    feed(ctrl, READY)
    moving = run(ctrl, clock, kin, 5, [0.1, 0, 0, 0, 0, 0])
    last = moving[-1].q_target
    assert not np.allclose(last, READY)
    # Twists stop. Within the timeout the last twist is still followed, after it the arm holds.
    outs = run(ctrl, clock, kin, 20)
    states = [o.state for o in outs]
    first_hold = states.index(STATE_COMMAND_TIMEOUT)
    assert first_hold * PERIOD <= 0.1 + 1e-9 < (first_hold + 1) * PERIOD + 1e-9
    assert set(states[first_hold:]) == {STATE_COMMAND_TIMEOUT}
    held = outs[first_hold].q_target
    for o in outs[first_hold:]:
        np.testing.assert_array_equal(o.q_target, held)
    assert ctrl.status()["state"] == STATE_COMMAND_TIMEOUT
    # A fresh twist resumes from the held position.
    resumed = run(ctrl, clock, kin, 1, [0.1, 0, 0, 0, 0, 0])[0]
    assert resumed.state == STATE_OK and not np.allclose(resumed.q_target, held)


def test_stale_joint_states_hold_and_fresh_ones_resume(kin):
    clock = ManualClock()
    ctrl = make(kin, clock, joint_state_timeout=0.05, command_timeout=1.0)
    feed(ctrl, READY)
    run(ctrl, clock, kin, 3, [0.1, 0, 0, 0, 0, 0])
    outs = run(ctrl, clock, kin, 10, [0.1, 0, 0, 0, 0, 0], perfect_arm=False)  # joint states stop
    states = [o.state for o in outs]
    assert states[:5] == [STATE_OK] * 5 and set(states[6:]) == {STATE_STALE_JOINT_STATES}
    held = outs[6].q_target
    for o in outs[6:]:
        np.testing.assert_array_equal(o.q_target, held)
    feed(ctrl, held)
    assert run(ctrl, clock, kin, 1, [0.1, 0, 0, 0, 0, 0])[0].state == STATE_OK


def test_twist_in_the_wrong_frame_is_refused_with_a_clear_error_and_the_arm_holds(kin):
    clock = ManualClock()
    ctrl = make(kin, clock)
    feed(ctrl, READY)
    moving = run(ctrl, clock, kin, 3, [0.1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"frame_id 'base_link' is not the base frame 'panda_link0'"):
        ctrl.on_twist("base_link", [0.1, 0, 0, 0, 0, 0])
    out = run(ctrl, clock, kin, 1)[0]
    assert out.state == STATE_BAD_COMMAND
    np.testing.assert_array_equal(out.q_target, moving[-1].q_target)
    with pytest.raises(ValueError, match="frame_id ''"):
        ctrl.on_twist("", [0.1, 0, 0, 0, 0, 0])
    assert ctrl.status()["counters"]["bad_twists"] == 2
    assert "base_link" not in ctrl.status()["last_error"]  # the newest error is reported
    assert run(ctrl, clock, kin, 1, [0.1, 0, 0, 0, 0, 0])[0].state == STATE_OK


def test_tool_frame_twists_must_name_the_tip_frame_and_move_along_the_tool_axes():
    kin = panda_kinematics(twist_frame="tool")
    clock = ManualClock()
    ctrl = make(kin, clock)
    feed(ctrl, READY)
    with pytest.raises(ValueError, match="tool frame 'panda_grasptarget'"):
        ctrl.on_twist("panda_link0", [0, 0, 0.1, 0, 0, 0])
    outs = run(ctrl, clock, kin, 10, [0, 0, 0.1, 0, 0, 0], frame="panda_grasptarget")
    moved = kin.tip_pose(outs[-1].q_target).position - kin.tip_pose(READY).position
    tool_z = kin.tip_pose(READY).rotation[:, 2]  # the hand points down at READY: tool z is -base z
    assert tool_z[2] < -0.99
    np.testing.assert_allclose(moved, tool_z * 0.1 * 10 * PERIOD, atol=POS_TOL_M)


@pytest.mark.parametrize("bad", [[math.nan, 0, 0, 0, 0, 0], [0, 0, math.inf, 0, 0, 0], [0.1, 0, 0]])
def test_nan_inf_or_short_twists_hold_with_an_error(kin, bad):
    clock = ManualClock()
    ctrl = make(kin, clock)
    feed(ctrl, READY)
    moving = run(ctrl, clock, kin, 2, [0.1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="twist"):
        ctrl.on_twist("panda_link0", bad)
    out = run(ctrl, clock, kin, 1)[0]
    assert out.state == STATE_BAD_COMMAND
    np.testing.assert_array_equal(out.q_target, moving[-1].q_target)
    assert np.all(np.isfinite(out.q_target))


def test_measured_state_far_from_the_command_reseeds_it(kin):
    clock = ManualClock()
    ctrl = make(kin, clock, reseed_threshold=0.05, command_timeout=1.0)
    feed(ctrl, READY)
    run(ctrl, clock, kin, 2, [0.1, 0, 0, 0, 0, 0])
    # A small tracking lag keeps the commanded positions (integration continues from them) ...
    cmd = np.array(ctrl.status()["q_command"])
    feed(ctrl, cmd - 0.01)
    out = run(ctrl, clock, kin, 1, [0.0] * 6, perfect_arm=False)[0]
    np.testing.assert_allclose(out.q_target, cmd, atol=1e-6)
    # ... a jump (reset, arm pushed by hand) that persists restarts from the measured state: the
    # command slews there at the velocity limit, never jumping.
    moved = READY + np.array([0.3, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="implausible joint state: panda_joint1 jumped"):
        feed(ctrl, moved)  # the first reading of the jump is refused ...
    clock.advance(PERIOD)
    feed(ctrl, moved)  # ... the second, agreeing with it, is the arm's new state
    reach = kin.velocity_limits * PERIOD
    previous, outs = cmd, []
    for i in range(int(0.35 / reach[0]) + 2):
        out = run(ctrl, clock, kin, 1, [0.0] * 6, perfect_arm=False)[0]
        periods = 2 if i == 0 else 1  # the first tick integrates the period of the refused reading too
        assert np.all(np.abs(out.q_target - previous) <= periods * reach + 1e-12)
        previous = out.q_target
        outs.append(out)
        feed(ctrl, moved)
    assert outs[0].state == "reseeding"
    np.testing.assert_allclose(outs[-1].q_target, moved, atol=1e-9)
    assert outs[-1].state == STATE_OK
    assert ctrl.status()["counters"]["reseeds"] == 1


def test_ik_halt_at_the_stretched_singularity_holds():
    free = ArmKinematics.from_urdf(panda_urdf_path(), "panda_link0", "panda_grasptarget", list(PANDA_ARM_JOINTS),
                                   rest_posture=READY)
    clock = ManualClock()
    ctrl = make(free, clock)
    feed(ctrl, READY)
    outs = run(ctrl, clock, free, 400, [0.2, 0, 0, 0, 0, 0])  # straight out for 4 s
    states = [o.state for o in outs]
    assert STATE_IK_HALTED in states
    first = states.index(STATE_IK_HALTED)
    assert outs[first].ik_status is IkStatus.HALT_FOR_SINGULARITY
    np.testing.assert_array_equal(outs[first].q_target, outs[first - 1].q_target)
    assert ctrl.status()["counters"]["ik_halt_for_singularity"] >= 1


def test_joint_states_in_any_order_with_extra_joints_and_bad_ones_rejected(kin):
    clock = ManualClock()
    ctrl = make(kin, clock)
    names = list(PANDA_FINGER_JOINTS) + list(reversed(PANDA_ARM_JOINTS))
    ctrl.on_joint_state(names, [0.04, 0.04] + list(READY[::-1]))
    out = ctrl.tick()
    np.testing.assert_array_equal(out.q_target, READY)
    with pytest.raises(ValueError, match=r"joints \['panda_joint7'\] missing"):
        ctrl.on_joint_state(PANDA_ARM_JOINTS[:6], READY[:6])
    with pytest.raises(ValueError, match="finite"):
        ctrl.on_joint_state(PANDA_ARM_JOINTS, [math.nan] + list(READY[1:]))
    with pytest.raises(ValueError, match="no joint names"):
        ctrl.on_joint_state([], READY)
    assert ctrl.status()["counters"]["bad_joint_states"] == 3


def test_order_joint_positions():
    wanted = ("a", "b", "c")
    np.testing.assert_array_equal(order_joint_positions(["c", "x", "a", "b"], [3, 9, 1, 2], wanted), [1, 2, 3])
    np.testing.assert_array_equal(order_joint_positions([], [1, 2, 3], wanted), [1, 2, 3])
    with pytest.raises(ValueError, match="expected 3 joint positions"):
        order_joint_positions([], [1, 2], wanted)
    with pytest.raises(ValueError, match="2 joint names but 3 positions"):
        order_joint_positions(["a", "b"], [1, 2, 3], wanted)
    with pytest.raises(ValueError, match="must be numbers"):
        order_joint_positions([], ["x", 2, 3], wanted)


def test_gripper_commands_must_be_finite(kin):
    ctrl = make(kin, ManualClock())
    assert ctrl.on_gripper(0.25) == 0.25
    for bad in (math.nan, math.inf, "open"):
        with pytest.raises(ValueError, match="gripper command"):
            ctrl.on_gripper(bad)
    assert ctrl.status()["counters"]["bad_gripper_commands"] == 3


def test_settings_are_validated(kin):
    with pytest.raises(ValueError, match="rate_hz"):
        IkController(kin, rate_hz=0.0, clock=ManualClock())
    ctrl = make(kin, ManualClock())
    with pytest.raises(ValueError, match="command_timeout must be a positive number, got -1"):
        ctrl.command_timeout = -1
    with pytest.raises(ValueError, match="joint_state_timeout"):
        ctrl.joint_state_timeout = math.nan


def test_urdf_source_precedence_never_guesses_the_sim_model():
    assert resolve_urdf_source("/robots/arm.urdf", "<robot/>", True) == "/robots/arm.urdf"
    assert resolve_urdf_source("", "<robot name='x'/>", True) == "<robot name='x'/>"
    assert resolve_urdf_source("", "  ", False) is None
    assert resolve_urdf_source("", "", True) == panda_urdf_path()


def test_loop_rate_is_measured_on_the_clock(kin):
    clock = ManualClock()
    ctrl = make(kin, clock)
    for _ in range(11):
        ctrl.tick()
        clock.advance(0.02)
    assert ctrl.loop_rate_hz() == pytest.approx(50.0)
