"""The pybullet Panda scene: determinism, cubes, camera, arm and gripper control, task helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import (
    CUBE_COLOURS,
    DEFAULT_CUBE_REGION,
    DEFAULT_MIN_CUBE_SEPARATION_M,
    PANDA_REST_POSTURE,
    CameraConfig,
    PandaScene,
    instruction_for,
    target_for_seed,
    target_from_instruction,
)


@pytest.fixture(scope="module")
def scene():
    with PandaScene(0) as s:
        yield s


def _drive(scene, n_periods=10):
    """A fixed joint-target sequence; returns the joint positions after each period."""
    out = []
    q0 = np.asarray(PANDA_REST_POSTURE)
    for k in range(n_periods):
        scene.set_joint_targets(q0 + 0.03 * k * np.array([1, 0.5, -1, 0.5, 1, -0.5, 1]))
        scene.step(12)
        out.append(scene.get_joint_positions())
    return np.array(out)


def test_same_seed_same_scene_and_trajectory():
    with PandaScene(5) as a, PandaScene(5) as b:
        for c in CUBE_COLOURS:
            np.testing.assert_array_equal(a.cube_position(c), b.cube_position(c))
        np.testing.assert_array_equal(_drive(a), _drive(b))
        # reset(seed) after an episode equals a fresh scene with that seed.
        a.reset(9)
        with PandaScene(9) as fresh:
            np.testing.assert_array_equal(a.cube_position("red"), fresh.cube_position("red"))
            np.testing.assert_array_equal(a.get_joint_positions(), fresh.get_joint_positions())
            np.testing.assert_array_equal(_drive(a), _drive(fresh))


def test_seeds_place_both_cubes_apart_on_the_table(scene):
    (x0, y0), (x1, y1) = DEFAULT_CUBE_REGION
    reds = []
    for seed in range(30):
        cubes = scene.reset(seed)
        assert set(cubes) == {"red", "blue"}
        for c, p in cubes.items():
            assert x0 <= p[0] <= x1 and y0 <= p[1] <= y1
            assert p[2] == pytest.approx(scene.cube_size / 2, abs=1e-9)
        assert np.linalg.norm(cubes["red"][:2] - cubes["blue"][:2]) >= DEFAULT_MIN_CUBE_SEPARATION_M
        reds.append(cubes["red"])
    assert len({tuple(np.round(r, 6)) for r in reds}) == 30  # seeds really vary the layout
    assert {target_for_seed(s) for s in range(30)} == {"red", "blue"}


def _project(cam: CameraConfig, point):
    """Pixel (u, v) of a world point through an ideal pinhole built from the config alone."""
    eye, target, up = (np.asarray(v, float) for v in (cam.eye, cam.target, cam.up))
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right)
    true_up = np.cross(right, fwd)
    d = np.asarray(point, float) - eye
    f = 0.5 * cam.height / math.tan(math.radians(cam.fov_deg) / 2)
    z = d @ fwd
    return cam.width / 2 + f * (d @ right) / z, cam.height / 2 - f * (d @ true_up) / z


def _mask(img, colour):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    if colour == "red":
        return (r > 90) & (r > 2 * g) & (r > 2 * b)
    return (b > 90) & (b > 2 * r) & (b > g + 40)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_camera_sees_each_cube_where_the_pinhole_model_puts_it(scene, seed):
    scene.reset(seed)
    img = scene.render()
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    for colour in CUBE_COLOURS:
        mask = _mask(img, colour)
        assert mask.sum() >= 20, colour
        vs, us = np.nonzero(mask)
        u, v = _project(scene.camera, scene.cube_position(colour))
        assert abs(us.mean() - u) < 4 and abs(vs.mean() - v) < 4, (colour, us.mean(), vs.mean(), u, v)


def test_camera_size_and_pose_are_configurable():
    cam = CameraConfig(width=96, height=64, eye=(0.5, -0.9, 0.6), target=(0.5, 0.0, 0.05), fov_deg=60)
    with PandaScene(2, camera=cam) as s:
        img = s.render()
        assert img.shape == (64, 96, 3) and img.dtype == np.uint8
        fx, fy, cx, cy = cam.intrinsics()
        assert (cx, cy) == (48, 32) and fx == fy == pytest.approx(32 / math.tan(math.radians(30)))
        vs, us = np.nonzero(_mask(img, "red"))
        u, v = _project(cam, s.cube_position("red"))
        assert abs(us.mean() - u) < 3 and abs(vs.mean() - v) < 3
    with pytest.raises(ValueError, match="width"):
        CameraConfig(width=0)
    with pytest.raises(ValueError, match="fov_deg"):
        CameraConfig(fov_deg=180)


def test_time_is_simulated_and_steps_are_fixed(scene):
    scene.reset(0)
    assert scene.time == 0.0
    scene.step(240)
    assert scene.time == pytest.approx(1.0)
    scene.step(0)
    assert scene.time == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step count"):
        scene.step(-1)


def test_joint_targets_are_tracked_and_tip_pose_matches_the_ik_model(scene):
    scene.reset(0)
    target = np.asarray(PANDA_REST_POSTURE) + np.array([0.3, 0.2, -0.2, 0.3, 0.2, -0.3, 0.4])
    scene.set_joint_targets(target)
    scene.step(240)
    np.testing.assert_allclose(scene.get_joint_positions(), target, atol=2e-3)
    assert np.max(np.abs(scene.get_joint_velocities())) < 0.05
    kin = panda_kinematics()
    np.testing.assert_allclose(scene.tip_position(), kin.tip_pose(scene.get_joint_positions()).position, atol=1e-6)


def test_bad_joint_targets_are_rejected_and_do_not_move_the_arm(scene):
    scene.reset(0)
    before = scene.joint_targets
    for bad in ([np.nan] * 7, [0.0] * 6, list(PANDA_REST_POSTURE[:6]) + [10.0]):
        with pytest.raises(ValueError, match="joint targets"):
            scene.set_joint_targets(bad)
    np.testing.assert_array_equal(scene.joint_targets, before)
    scene.step(60)
    np.testing.assert_allclose(scene.get_joint_positions(), PANDA_REST_POSTURE, atol=1e-3)


def test_gripper_closes_and_opens(scene):
    scene.reset(0)
    assert scene.gripper_opening() == pytest.approx(1.0, abs=1e-6)
    scene.set_gripper(0.0)
    scene.step(120)
    assert scene.gripper_opening() < 0.05
    scene.set_gripper(1.0)
    scene.step(120)
    assert scene.gripper_opening() > 0.95
    names, pos, vel = scene.joint_state()
    assert names[-2:] == ["panda_finger_joint1", "panda_finger_joint2"] and len(pos) == len(vel) == 9
    for bad in (1.5, -0.1, float("nan"), "open"):
        with pytest.raises(ValueError, match="gripper"):
            scene.set_gripper(bad)


def test_instructions_and_success_check(scene):
    assert instruction_for("red") == "reach the red cube"
    assert target_from_instruction("Reach the BLUE cube.") == "blue"
    for bad in ("reach the cube", "reach the red or blue cube"):
        with pytest.raises(ValueError, match="exactly one"):
            target_from_instruction(bad)
    with pytest.raises(ValueError, match="green"):
        instruction_for("green")
    scene.reset(0)
    assert not scene.is_success("red")  # the rest posture is far above the table
    assert scene.distance_to("red") == pytest.approx(np.linalg.norm(scene.tip_position() - scene.cube_position("red")))


def test_bad_scene_parameters_raise():
    with pytest.raises(ValueError, match="physics_dt"):
        PandaScene(0, physics_dt=0.0)
    with pytest.raises(ValueError, match="cube_region"):
        PandaScene(0, cube_region=((0.5, 0.0), (0.4, 0.1)))


def test_a_start_posture_is_reached_by_the_ik_and_held_by_the_scene(scene):
    from openvla_ros.sim.rollout import posture_reaching

    kin = panda_kinematics()
    scene.reset(0)
    rest_rotation = kin.tip_pose(np.asarray(PANDA_REST_POSTURE)).rotation
    goal = np.array([0.55, -0.2, 0.1])
    q = posture_reaching(kin, goal, scene.get_joint_positions())
    np.testing.assert_allclose(kin.tip_pose(q).position, goal, atol=1e-3)
    # The hand keeps pointing down (the orientation the episode's actions hold).
    np.testing.assert_allclose(kin.tip_pose(q).rotation, rest_rotation, atol=0.05)
    scene.set_arm_posture(q)
    np.testing.assert_allclose(scene.tip_position(), goal, atol=1e-3)
    scene.step(120)  # held there, not falling back to rest
    np.testing.assert_allclose(scene.tip_position(), goal, atol=3e-3)
    np.testing.assert_allclose(scene.joint_targets, q)
    with pytest.raises(ValueError, match="not reached"):
        posture_reaching(kin, [1.5, 0.0, 0.3], PANDA_REST_POSTURE)  # beyond the workspace box
    with pytest.raises(ValueError, match="tip_goal"):
        posture_reaching(kin, [0.5, np.nan, 0.3], PANDA_REST_POSTURE)
    with pytest.raises(ValueError, match="joint targets"):
        scene.set_arm_posture([0.0] * 6)
