"""The scripted reach expert, executed through ArmKinematics diff-IK on the pybullet Panda."""
from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.sim.expert import ReachExpert
from openvla_ros.sim.rollout import panda_kinematics, run_episode
from openvla_ros.sim.scene import SUCCESS_RADIUS_M, PandaScene, target_for_seed
from openvla_ros.vla.constants import DEFAULT_CONTROL_PERIOD_S

N_EPISODES = 20
MIN_SUCCESS_RATE = 0.95


@pytest.fixture(scope="module")
def scene():
    with PandaScene(0) as s:
        yield s


@pytest.fixture(scope="module")
def kin():
    return panda_kinematics()


def test_far_target_gives_a_capped_step_towards_the_aim_point():
    ex = ReachExpert()
    tip, cube = np.array([0.3, 0.0, 0.5]), np.array([0.6, 0.2, 0.02])
    a = ex.action(tip, cube)
    assert a.shape == (7,)
    assert np.linalg.norm(a[:3]) == pytest.approx(ex.max_speed_m_s * DEFAULT_CONTROL_PERIOD_S)
    aim = ex.aim_point(tip, cube)
    cos = a[:3] @ (aim - tip) / (np.linalg.norm(a[:3]) * np.linalg.norm(aim - tip))
    assert cos == pytest.approx(1.0)
    # Far away horizontally the aim is higher than the hover point: come down from above.
    assert aim[2] == pytest.approx(0.02 + ex.hover_height_m + ex.max_approach_height_m)
    np.testing.assert_array_equal(a[3:6], 0.0)
    assert a[6] == 1.0


def test_near_target_step_is_proportional():
    ex = ReachExpert()
    cube = np.array([0.5, 0.0, 0.02])
    tip = cube + np.array([0.0, 0.0, ex.hover_height_m + 0.01])  # 1 cm above the hover point
    a = ex.action(tip, cube)
    np.testing.assert_allclose(a[:3], [0.0, 0.0, -ex.gain * 0.01], atol=1e-12)


def test_bad_inputs_raise():
    ex = ReachExpert()
    with pytest.raises(ValueError, match="tip_position"):
        ex.action([np.nan, 0, 0], [0.5, 0, 0.02])
    with pytest.raises(ValueError, match="cube_position"):
        ex.action([0.3, 0, 0.5], [0.5, 0])
    with pytest.raises(ValueError, match="gain"):
        ReachExpert(gain=0.0)


def test_expert_through_diff_ik_reaches_the_named_cube(scene, kin):
    results = []
    for seed in range(N_EPISODES):
        scene.reset(seed)
        target = target_for_seed(seed)
        res = run_episode(scene, kin, lambda s, t=target: ReachExpert().act(s, t), target)
        results.append(res)
        # The motion went through the IK (every period ran its IK steps) ...
        assert sum(res.ik_status_counts.values()) == res.periods * 12
        # ... and ended near the named cube, not the other one.
        other = "blue" if target == "red" else "red"
        if res.success:
            assert scene.distance_to(target) <= SUCCESS_RADIUS_M
            assert scene.distance_to(other) > SUCCESS_RADIUS_M
    rate = np.mean([r.success for r in results])
    print(f"\nexpert success rate {rate:.2f} over {N_EPISODES} seeds; "
          f"mean {np.mean([r.sim_time_s for r in results]):.2f} s simulated per episode")
    assert {r.target for r in results} == {"red", "blue"}
    assert rate >= MIN_SUCCESS_RATE


def test_expert_settles_above_the_cube_without_pushing_it(scene, kin):
    cubes = scene.reset(42)
    target = target_for_seed(42)
    res = run_episode(scene, kin, lambda s: ReachExpert().act(s, target), target, max_seconds=5.0, stop_on_success=False)
    assert res.success
    hover = cubes[target] + [0, 0, ReachExpert().hover_height_m]
    assert np.linalg.norm(scene.tip_position() - hover) < 0.005
    for c, p in cubes.items():
        np.testing.assert_allclose(scene.cube_position(c), p, atol=1e-3)
    # The last actions are small: the expert has converged rather than oscillating.
    assert np.linalg.norm(res.actions[-1][:3]) < 0.002


def test_episode_goes_on_the_asked_periods_after_success_then_stops(scene, kin):
    seed = 3
    target = target_for_seed(seed)
    scene.reset(seed)
    first = run_episode(scene, kin, lambda s: ReachExpert().act(s, target), target)
    scene.reset(seed)
    longer = run_episode(scene, kin, lambda s: ReachExpert().act(s, target), target, periods_after_success=4)
    assert first.success and longer.success
    assert longer.periods == first.periods + 4
    # Same episode up to the first success (seeded), then the expert closes in on its hover point.
    np.testing.assert_allclose(longer.actions[:first.periods], first.actions)
    assert longer.final_distance_m < first.final_distance_m
    assert np.linalg.norm(longer.actions[-1][:3]) < np.linalg.norm(first.actions[-1][:3])
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="periods_after_success"):
            run_episode(scene, kin, lambda s: np.zeros(7), target, periods_after_success=bad)


def test_bad_policy_action_is_rejected_before_moving(scene, kin):
    scene.reset(1)
    q0 = scene.get_joint_positions()
    with pytest.raises(ValueError, match="policy action"):
        run_episode(scene, kin, lambda s: np.full(7, np.nan), "red")
    np.testing.assert_array_equal(scene.get_joint_positions(), q0)
    with pytest.raises(ValueError, match="whole multiple"):
        run_episode(scene, kin, lambda s: np.zeros(7), "red", ik_rate_hz=70.0)
