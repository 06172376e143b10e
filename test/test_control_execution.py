"""Chunk execution at the model's real latency (openvla_ros.control.chunk_buffer: timeline / arrival / auto).

The released OpenVLA answers one action (a delta over dt = 0.2 s) 0.17-0.8 s after its frame. These
tests drive the buffer as a back-to-back inference loop would (observe, answer `latency` later,
observe again at once) on an injected clock, sample it at 100 Hz like vla_node's control loop and
integrate the twists like ik_node.
"""
import math

import numpy as np
import pytest

from openvla_ros.control.chunk_buffer import (
    EXECUTION_ARRIVAL, EXECUTION_AUTO, EXECUTION_TIMELINE, STATE_OK, STATE_UNDERRUN, ChunkBuffer, integrate_commands,
)
from openvla_ros.control.rotations import rpy_to_matrix
from openvla_ros.engines.base import ActionChunk

NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
PERIOD = 0.01  # 100 Hz control loop


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def chunk_of(vx_per_action, stamp, dt=0.2, gripper=1.0):
    """One action per entry of ``vx_per_action`` (m/s along x; the delta is vx * dt)."""
    actions = [[vx * dt, 0, 0, 0, 0, 0, gripper] for vx in vx_per_action]
    return ActionChunk(actions=np.asarray(actions, dtype=float), dim_names=NAMES, dt=dt, stamp=stamp)


def run_back_to_back(buffer, clock, latency, answer, seconds=4.0):
    """Observe at t, push the answer at t + latency, observe again at once; sample every PERIOD.

    ``answer(index, stamp)`` builds the chunk of the index-th observation. Returns the commands
    sampled from the first arrival on, and the arrival times.
    """
    commands, arrivals = [], []
    obs_stamp, index = 0.0, 0
    n_ticks = int(round(seconds / PERIOD))
    for tick in range(n_ticks):
        t = tick * PERIOD
        clock.t = t
        while obs_stamp + latency <= t + 1e-9:  # the answer to the pending observation has arrived
            clock.t = obs_stamp + latency
            buffer.push(answer(index, obs_stamp), buffer.epoch)
            arrivals.append(clock.t)
            obs_stamp, index = clock.t, index + 1
        clock.t = t
        command = buffer.sample(t, period=PERIOD)
        if arrivals:
            commands.append(command)
    return commands, arrivals


def mean_vx(commands):
    position, _ = integrate_commands(commands)
    return position[0] / sum(c.duration for c in commands)


@pytest.mark.parametrize("latency", [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.8])
def test_a_one_action_model_moves_at_its_intended_velocity_at_any_latency_with_auto(latency):
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_AUTO, arrival_hold_s=1.0, clock=clock)
    commands, arrivals = run_back_to_back(buffer, clock, latency, lambda i, stamp: chunk_of([0.05], stamp))
    assert len(arrivals) >= 4
    assert mean_vx(commands) == pytest.approx(0.05, rel=0.02)
    moving = sum(not c.is_zero for c in commands) / len(commands)
    assert moving > 0.98


@pytest.mark.parametrize("latency", [0.2, 0.25, 0.5])
def test_the_latency_compensated_timeline_alone_drops_a_one_action_chunk_that_arrives_after_its_period(latency):
    # The failure auto exists for: with timeline execution the one action is already in the past.
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_TIMELINE, clock=clock)
    commands, _ = run_back_to_back(buffer, clock, latency, lambda i, stamp: chunk_of([0.05], stamp))
    assert mean_vx(commands) == 0.0
    assert buffer.status()["rejected_by_reason"].get("expired", 0) >= 3


def test_auto_keeps_the_latency_compensated_timeline_for_chunks_that_outlast_the_next_answer():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_AUTO, clock=clock)
    # K = 8 actions of 0.1 s (0.8 s) at 0.1 s latency: each chunk must cover ~0.2 s.
    commands, _ = run_back_to_back(buffer, clock, 0.1, lambda i, stamp: chunk_of([0.05] * 8, stamp, dt=0.1))
    status = buffer.status()
    assert status["execution"] == EXECUTION_TIMELINE and status["execution_setting"] == EXECUTION_AUTO
    # Back to back, a chunk covers from its frame until the next answer lands: two latencies.
    assert status["needed_s_p95"] == pytest.approx(0.2, abs=1e-6)
    assert status["held_ticks"] == 0
    assert mean_vx(commands) == pytest.approx(0.05, rel=1e-6)


def test_auto_switches_to_arrival_execution_when_chunks_expire_before_the_next_answer():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_AUTO, clock=clock)
    run_back_to_back(buffer, clock, 0.3, lambda i, stamp: chunk_of([0.05], stamp), seconds=2.0)
    status = buffer.status()
    assert status["execution"] == EXECUTION_ARRIVAL
    assert status["needed_s_p95"] == pytest.approx(0.6, abs=1e-6)
    assert status["held_ticks"] > 0  # 0.1 s of every 0.3 s continues the last action


def test_arrival_execution_plays_each_chunk_from_its_arrival_and_never_replays_a_delta():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_ARRIVAL, arrival_hold_s=0.0, clock=clock)
    clock.t = 0.5
    result = buffer.push(chunk_of([0.1, 0.2, 0.3], stamp=0.2, dt=0.1), buffer.epoch)  # 0.3 s late
    assert result.accepted and result.execution == EXECUTION_ARRIVAL and result.trimmed_s == 0.0
    commands = [buffer.sample(0.5 + i * PERIOD, period=PERIOD) for i in range(40)]
    position, _ = integrate_commands(commands)
    # All three deltas exactly once (0.01 + 0.02 + 0.03), then nothing (no hold).
    assert position[0] == pytest.approx(0.06, abs=1e-12)
    assert [round(c.linear[0], 9) for c in commands[:30:10]] == [0.1, 0.2, 0.3]
    assert commands[-1].state == STATE_UNDERRUN and commands[-1].is_zero


def test_a_newer_chunk_replaces_the_rest_of_an_arrival_chunk_and_the_hold_of_its_last_action():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_ARRIVAL, arrival_hold_s=1.0, clock=clock)
    clock.t = 0.3
    buffer.push(chunk_of([0.1], stamp=0.0), buffer.epoch)  # plays [0.3, 0.5), holds after
    clock.t = 0.6
    buffer.push(chunk_of([-0.1], stamp=0.3), buffer.epoch)  # plays [0.6, 0.8)
    commands = [buffer.sample(0.3 + i * PERIOD, period=PERIOD) for i in range(50)]
    position, _ = integrate_commands(commands)
    # +0.1 m/s over [0.3, 0.6) (0.2 s played + 0.1 s held), then -0.1 m/s over [0.6, 0.8).
    assert position[0] == pytest.approx(0.1 * 0.3 - 0.1 * 0.2, abs=1e-12)
    assert buffer.status()["held_ticks"] == 10 + 0  # the second chunk's hold lies beyond the samples


def test_the_hold_of_the_last_action_is_bounded_and_the_arm_then_stops():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_ARRIVAL, arrival_hold_s=0.25, clock=clock)
    clock.t = 0.4
    buffer.push(chunk_of([0.05], stamp=0.0), buffer.epoch)  # plays [0.4, 0.6), holds until 0.85
    commands = [buffer.sample(0.4 + i * PERIOD, period=PERIOD) for i in range(100)]
    moving = [not c.is_zero for c in commands]
    assert sum(moving) == 45 and all(moving[:45]) and not any(moving[45:])
    assert commands[-1].state == STATE_UNDERRUN
    assert commands[44].state == STATE_OK


def test_nothing_plays_after_max_chunk_age_whatever_the_execution():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_ARRIVAL, arrival_hold_s=5.0, max_chunk_age_s=1.0, clock=clock)
    clock.t = 0.5
    buffer.push(chunk_of([0.05], stamp=0.0), buffer.epoch)
    assert not buffer.sample(0.95, period=PERIOD).is_zero
    assert buffer.sample(1.0, period=PERIOD).is_zero


def test_switches_between_answers_jump_no_more_than_the_models_own_change():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_AUTO, clock=clock)
    speeds = [0.05, 0.06, 0.045, 0.055]
    commands, _ = run_back_to_back(buffer, clock, 0.25, lambda i, stamp: chunk_of([speeds[i % 4]], stamp))
    jumps = np.abs(np.diff([c.linear[0] for c in commands]))
    assert jumps.max() <= max(np.abs(np.diff(speeds + speeds[:1]))) + 1e-12


def test_a_flush_forgets_the_previous_stamp_but_not_the_measured_coverage():
    clock = Clock()
    buffer = ChunkBuffer(execution=EXECUTION_AUTO, clock=clock)
    run_back_to_back(buffer, clock, 0.3, lambda i, stamp: chunk_of([0.05], stamp), seconds=1.0)
    before = buffer.status()["needed_s_p95"]
    buffer.reset()
    clock.t = 10.3
    result = buffer.push(chunk_of([0.05], stamp=10.0), buffer.epoch)
    assert result.execution == EXECUTION_ARRIVAL
    assert buffer.status()["needed_s_p95"] == before  # no bogus 9 s sample across the flush


def test_auto_with_no_history_judges_the_first_chunk_by_twice_its_latency():
    clock = Clock(0.1)
    long_chunk = ChunkBuffer(execution=EXECUTION_AUTO, clock=clock)
    assert long_chunk.push(chunk_of([0.05] * 4, stamp=0.0), 0).execution == EXECUTION_TIMELINE  # 0.8 >= 1.2*0.2
    short_chunk = ChunkBuffer(execution=EXECUTION_AUTO, clock=clock)
    assert short_chunk.push(chunk_of([0.05], stamp=0.0), 0).execution == EXECUTION_ARRIVAL  # 0.2 < 1.2*0.2


def test_unknown_execution_and_negative_hold_are_refused_by_name():
    with pytest.raises(ValueError, match="execution must be one of .*'sometimes'"):
        ChunkBuffer(execution="sometimes")
    with pytest.raises(ValueError, match="arrival_hold_s must be a finite number >= 0.0, got -1"):
        ChunkBuffer(arrival_hold_s=-1)


# ------------------------------------------------------------------------ committed actions
def test_planned_actions_on_the_chunks_own_grid_are_the_chunks_actions():
    clock = Clock(0.05)
    buffer = ChunkBuffer(clock=clock)
    actions = np.array([[0.01, -0.02, 0.005, 0.02, -0.01, 0.03, 1.0],
                        [0.012, -0.01, 0.0, 0.0, 0.01, -0.02, 0.0],
                        [0.0, 0.0, 0.01, -0.03, 0.0, 0.01, 0.0]])
    buffer.push(ActionChunk(actions=actions, dim_names=NAMES, dt=0.2, stamp=0.0), 0)
    planned = buffer.planned_actions(0.2, 2, 0.2, NAMES)
    np.testing.assert_allclose(planned, actions[1:3], atol=1e-12)


def test_planned_actions_off_the_grid_compose_the_pieces_they_span():
    clock = Clock(0.0)
    buffer = ChunkBuffer(clock=clock)
    a0 = [0.02, 0.0, 0.0, 0.0, 0.0, 0.2, 1.0]
    a1 = [0.0, 0.04, 0.0, 0.1, 0.0, 0.0, 0.0]
    buffer.push(ActionChunk(actions=np.array([a0, a1]), dim_names=NAMES, dt=0.2, stamp=0.0), 0)
    planned = buffer.planned_actions(0.1, 1, 0.2, NAMES)[0]
    np.testing.assert_allclose(planned[:3], [0.01, 0.02, 0.0], atol=1e-12)  # half of each delta
    # Rotation: half of a0's yaw, then half of a1's roll, composed in the base frame.
    expected = rpy_to_matrix([0.05, 0, 0]) @ rpy_to_matrix([0, 0, 0.1])
    np.testing.assert_allclose(rpy_to_matrix(planned[3:6]), expected, atol=1e-12)
    assert planned[6] == 0.0  # the gripper target at the end of the period


def test_planned_actions_where_nothing_plays_are_no_motion_with_the_held_gripper():
    clock = Clock(0.0)
    buffer = ChunkBuffer(clock=clock, initial_gripper=0.7)
    planned = buffer.planned_actions(3.0, 2, 0.2, NAMES)
    np.testing.assert_array_equal(planned[:, :6], 0.0)
    np.testing.assert_array_equal(planned[:, 6], 0.7)
    status_before = buffer.status()
    buffer.planned_actions(0.0, 3, 0.2, NAMES)
    assert buffer.status() == status_before  # reading the plan changes no counter


def test_planned_actions_refuse_bad_arguments_by_value():
    buffer = ChunkBuffer()
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got -1"):
        buffer.planned_actions(0.0, -1, 0.2, NAMES)
    with pytest.raises(ValueError, match="dt must be a positive number of seconds, got 0"):
        buffer.planned_actions(0.0, 1, 0, NAMES)
    with pytest.raises(ValueError, match=r"lack the mapped dims \['dyaw'\]"):
        buffer.planned_actions(0.0, 1, 0.2, NAMES[:5] + ["gripper"])
    assert math.isfinite(buffer.planned_actions(0.0, 0, 0.2, NAMES).sum())


def test_committed_steps_cover_the_latency_and_leave_one_action_free():
    from openvla_ros.control.vla_controller import buffer_execution, committed_steps

    assert committed_steps(None, 4, 0.2) == 0  # nothing measured yet: plain decoding
    assert committed_steps(0.05, 4, 0.2) == 1
    assert committed_steps(0.2, 4, 0.2) == 1  # exactly one period
    assert committed_steps(0.21, 4, 0.2) == 2
    assert committed_steps(2.0, 4, 0.2) == 3  # capped: at least one action is decoded
    assert committed_steps(0.3, 1, 0.2) == 0  # a one-action model has nothing to force
    assert buffer_execution("prefix") == EXECUTION_TIMELINE and buffer_execution("auto") == EXECUTION_AUTO
    with pytest.raises(ValueError, match="execution must be one of .*'later'"):
        buffer_execution("later")


@pytest.mark.parametrize("policy", ["replace", "crossfade", "ensemble"])
def test_status_while_the_last_action_is_held_reports_no_plan_left(policy):
    clock = Clock()
    buffer = ChunkBuffer(policy=policy, execution=EXECUTION_ARRIVAL, arrival_hold_s=1.0, clock=clock)
    clock.t = 0.3
    buffer.push(chunk_of([0.05], stamp=0.0), buffer.epoch)  # plays [0.3, 0.5), holds after
    clock.t = 0.7
    assert not buffer.sample(0.7, period=PERIOD).is_zero  # held
    status = buffer.status(0.7)
    assert status["depth_s"] == 0.0 and status["state"] == STATE_OK and status["held_ticks"] == 1
    assert buffer.depth_s(0.7) == 0.0
