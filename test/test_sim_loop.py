"""SimLoop (sim_node's physics thread without ROS) and the render process, on the real pybullet scene."""
import math
import threading

import numpy as np
import pytest
from conftest import ManualClock

from openvla_ros.sim.render_process import RenderProcess
from openvla_ros.sim.scene import PANDA_REST_POSTURE, PandaScene, instruction_for, target_for_seed
from openvla_ros.sim.sim_loop import EPISODE_START_GRACE_S, SimLoop

DT = 1.0 / 240.0


@pytest.fixture
def scene():
    s = PandaScene(seed=3)
    yield s
    s.close()


def test_unpaced_loop_publishes_joint_states_and_frames_on_the_simulated_schedule(scene):
    states, frames = [], []
    loop = SimLoop(scene, real_time=False, speed=0.0, joint_state_rate_hz=100.0, camera_rate_hz=10.0,
                   on_joint_state=states.append, on_image=lambda t, rgb, age: frames.append((t, rgb)))
    for _ in range(239):  # up to just before t = 1 s: sample slots 0, 0.01, ..., 0.99
        assert loop.run_once() == 0.0  # never waits when unpaced
    assert loop.sim_time == pytest.approx(239 * DT)
    assert len(states) == 100  # 100 Hz in simulated time, whatever the physics step (240 Hz)
    assert len(frames) == 10
    # Each sample is taken at the first physics step at or after its slot.
    for k, (t, rgb) in enumerate(frames):
        assert k * 0.1 - 1e-9 <= t <= k * 0.1 + DT + 1e-9
        assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8
    snap = states[-1]
    assert snap.names[:7] == scene.joint_names and len(snap.names) == 9
    np.testing.assert_allclose(snap.positions[:7], PANDA_REST_POSTURE, atol=0.02)  # held by position control
    assert snap.target == target_for_seed(3)
    assert snap.distance_to_target == pytest.approx(scene.distance_to(snap.target))


def test_real_time_pacing_follows_the_clock_and_rebases_when_far_behind(scene):
    clock = ManualClock(100.0)
    loop = SimLoop(scene, real_time=True, clock=clock, max_lag_s=0.25)

    def run_until_wait():
        steps = 0
        while True:
            wait = loop.run_once()
            if wait > 0:
                return steps, wait
            steps += 1

    steps, wait = run_until_wait()  # the state at sim time DT is computed when the wall clock gets there
    assert steps == 0 and wait == pytest.approx(DT)
    clock.advance(0.1 + DT / 2)
    steps, wait = run_until_wait()
    assert steps == 24 and loop.sim_time == pytest.approx(24 * DT)
    assert wait == pytest.approx(DT / 2)
    clock.advance(1.0)  # a stall far beyond max_lag_s: slow down instead of a 1 s burst
    steps, _ = run_until_wait()
    assert steps == 1 and loop.counters["lag_rebases"] == 1
    clock.advance(0.05 + DT / 2)
    steps, _ = run_until_wait()
    assert steps == 11
    for _ in range(150):  # steady pacing (the window forgets the stall): sim time follows the wall clock
        clock.advance(0.01)
        run_until_wait()
    assert loop.real_time_factor() == pytest.approx(1.0, abs=0.05)


def test_commands_are_applied_by_the_loop_and_bad_ones_ignored(scene):
    errors = []
    loop = SimLoop(scene, real_time=False, on_error=errors.append, max_command_jump_rad=0.0)
    target = np.array(PANDA_REST_POSTURE) + np.array([0.3, 0, 0, 0, 0, 0, 0])
    loop.command_joints([math.nan] * 7)
    loop.run_once()
    loop.command_joints(target[:6])
    loop.run_once()
    loop.command_joints(target + np.array([0, 0, 0, 5.0, 0, 0, 0]))  # joint 4 beyond its limit
    loop.run_once()
    loop.command_gripper(1.5)
    loop.run_once()
    assert len(errors) == 4 and loop.counters["errors"] == 4
    assert "outside the limits" in errors[2] and "gripper" in errors[3]
    np.testing.assert_allclose(scene.joint_targets, PANDA_REST_POSTURE)
    loop.command_joints(target)
    loop.command_gripper(0.0)
    for _ in range(480):
        loop.run_once()
    np.testing.assert_allclose(scene.get_joint_positions(), target, atol=0.02)
    assert scene.gripper_opening() < 0.1


def test_commands_far_from_the_arm_are_refused_so_a_reset_is_not_undone(scene):
    """Commands integrated from the posture before a reset would drag the arm back there: refused."""
    errors = []
    loop = SimLoop(scene, real_time=False, on_error=errors.append)
    assert loop.max_command_jump_rad == pytest.approx(0.2)
    rest = np.array(PANDA_REST_POSTURE)
    far = rest + np.array([0.0, 0.5, 0.0, -0.4, 0.0, 0.3, 0.0])
    while scene.time <= EPISODE_START_GRACE_S:  # past the start of the episode (see below)
        loop.run_once()
    loop.command_joints(far)
    loop.run_once()
    assert loop.counters["jump_refusals"] == 1 and "panda_joint2" in errors[-1] and "0.500 rad" in errors[-1]
    np.testing.assert_allclose(scene.joint_targets, rest)
    # A tracking controller's small steps towards the same posture are followed all the way.
    q = rest.copy()
    for _ in range(600):
        q = q + np.clip(far - q, -0.005, 0.005)
        loop.command_joints(q)
        loop.run_once()
    np.testing.assert_allclose(scene.get_joint_positions(), far, atol=0.02)
    assert loop.counters["jump_refusals"] == 1
    # After a reset the arm is back at rest; the old episode's command is refused, not obeyed. Right
    # after an episode starts that is expected (the controller has not seen the new posture): counted,
    # not logged as an error.
    scene.reset(4)
    errors.clear()
    loop.command_joints(far)
    for _ in range(120):
        loop.run_once()
    np.testing.assert_allclose(scene.get_joint_positions(), rest, atol=1e-2)
    assert loop.counters["jump_refusals"] == 2 and loop.counters["stale_commands_after_reset"] == 1
    assert errors == []
    # Later in the episode the same jump is an error again.
    while scene.time <= EPISODE_START_GRACE_S:
        loop.run_once()
    loop.command_joints(far)
    loop.run_once()
    assert loop.counters["jump_refusals"] == 3 and loop.counters["stale_commands_after_reset"] == 1
    assert len(errors) == 1 and "max_command_jump_rad" in errors[0]
    np.testing.assert_allclose(scene.joint_targets, rest)
    with pytest.raises(ValueError, match="max_command_jump_rad"):
        SimLoop(scene, real_time=False, max_command_jump_rad=-1.0)


def test_reset_from_another_thread_starts_the_next_seeded_episode(scene):
    episodes = []
    loop = SimLoop(scene, real_time=False, on_episode=episodes.append)
    assert loop.episode.seed == 3 and loop.episode.instruction == instruction_for(target_for_seed(3))
    stop = threading.Event()

    def run():
        while not stop.is_set():
            loop.run_once()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        t_before = loop.sim_time
        episode = loop.request_reset()
        assert episode.seed == 4 and episode.target == target_for_seed(4)
        chosen = loop.request_reset(seed=11, target="blue")
        with pytest.raises(ValueError, match="unknown cube colour 'green'"):
            loop.request_reset(seed=12, target="green")
    finally:
        stop.set()
        thread.join()
    assert chosen.instruction == "reach the blue cube" and loop.episode is chosen
    assert [e.seed for e in episodes] == [3, 4, 11]  # the first episode is announced too
    expected = PandaScene(seed=11)
    try:
        for colour, pos in chosen.cube_positions.items():
            np.testing.assert_allclose(pos, expected.cube_position(colour), atol=1e-9)
    finally:
        expected.close()
    assert loop.sim_time > t_before  # the clock keeps running across resets
    assert scene.time < loop.sim_time


def test_render_process_draws_exactly_what_the_scene_draws(scene):
    scene.set_joint_targets(np.array(PANDA_REST_POSTURE) + np.array([0.4, 0.2, 0, 0.3, 0, 0, 0]))
    scene.step(120)
    state = scene.pose_state()
    with RenderProcess(dict(camera=scene.camera, cube_size=scene.cube_size, urdf_path=scene.urdf_path)) as renderer:
        remote = renderer.render(state)
        renderer.submit(state)
        assert renderer.in_flight == 1
        again = renderer.result()
        with pytest.raises(ValueError, match="pose state needs 9 joint positions"):
            renderer.render({"joints": [0.0], "cubes": {}})
    local = scene.render()
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_array_equal(again, local)


def test_loop_with_the_render_process_waits_for_frames_in_simulated_time(scene):
    frames = []
    with RenderProcess(dict(camera=scene.camera, cube_size=scene.cube_size, urdf_path=scene.urdf_path)) as renderer:
        loop = SimLoop(scene, real_time=False, camera_rate_hz=20.0, renderer=renderer,
                       on_image=lambda t, rgb, age: frames.append((t, rgb, scene.render())))
        for _ in range(119):  # to just before 0.5 s: slots 0, 0.05, ..., 0.45
            loop.run_once()
    assert len(frames) == 10
    for t, remote, local in frames:
        np.testing.assert_array_equal(remote, local)  # the frame shows the state it was taken at
