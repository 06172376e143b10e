"""Rotation helpers and the action-chunk timeline (openvla_ros.control.rotations / chunk_buffer)."""
import math

import numpy as np
import pytest
import torch

from openvla_ros.control.chunk_buffer import (
    ActionMapping, ChunkBuffer, integrate_commands, STATE_OK, STATE_STOPPED, STATE_UNDERRUN,
)
from openvla_ros.control.rotations import (
    matrix_to_rotvec, matrix_to_rpy, rotvec_to_matrix, rotvec_to_rpy, rpy_to_matrix, rpy_to_rotvec,
)
from openvla_ros.engines.base import ActionChunk

NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def expm_skew(v):
    """Independent reference: the matrix exponential of [v]x computed by torch."""
    x, y, z = (float(c) for c in v)
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_exp(k).numpy()


def chunk(actions, stamp, dt=0.2, names=NAMES):
    return ActionChunk(actions=np.asarray(actions, dtype=np.float64), dim_names=list(names), dt=dt, stamp=stamp)


def const_chunk(vx, stamp, k=4, dt=0.2, gripper=1.0):
    """K actions moving vx m/s along x (delta = vx * dt)."""
    return chunk([[vx * dt, 0, 0, 0, 0, 0, gripper]] * k, stamp, dt)


# ---------------------------------------------------------------------------------- rotations
def test_rpy_is_extrinsic_xyz_against_independent_exponentials():
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-3.0, 3.0, size=(20, 3)):
        expected = expm_skew([0, 0, rpy[2]]) @ expm_skew([0, rpy[1], 0]) @ expm_skew([rpy[0], 0, 0])
        np.testing.assert_allclose(rpy_to_matrix(rpy), expected, atol=1e-13)


def test_hand_computed_rpy_rotation_is_the_120_degree_turn_about_111():
    # Rx(90) then Rz(90) (both about fixed axes): x->y, y->z, z->x.
    r = rpy_to_matrix([math.pi / 2, 0.0, math.pi / 2])
    np.testing.assert_allclose(r, [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-15)
    np.testing.assert_allclose(matrix_to_rotvec(r), 2 * math.pi / 3 * np.ones(3) / math.sqrt(3), atol=1e-14)
    np.testing.assert_allclose(rpy_to_rotvec([0.0, 0.0, 0.3]), [0.0, 0.0, 0.3], atol=1e-15)


@pytest.mark.parametrize("angle", [0.0, 1e-12, 1e-7, 1e-4, 0.3, 1.5, 2.9, math.pi - 1e-6, math.pi - 1e-10])
def test_rotvec_round_trip_and_matrix_exp_at_all_angles(angle):
    rng = np.random.default_rng(int(angle * 1e6) % 1000)
    for _ in range(10):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        v = angle * axis
        r = rotvec_to_matrix(v)
        np.testing.assert_allclose(r, expm_skew(v), atol=1e-14)
        np.testing.assert_allclose(matrix_to_rotvec(r), v, atol=1e-9 if angle > 3 else 1e-13)


def test_rotvec_at_exactly_pi_returns_a_valid_logarithm():
    for r in (np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, -1.0, 1.0]), rotvec_to_matrix([0, math.pi, 0])):
        v = matrix_to_rotvec(r)
        assert abs(np.linalg.norm(v) - math.pi) < 1e-12
        np.testing.assert_allclose(rotvec_to_matrix(v), r, atol=1e-12)


def test_rpy_round_trip_including_gimbal_lock():
    rng = np.random.default_rng(1)
    for rpy in rng.uniform([-3, -1.5, -3], [3, 1.5, 3], size=(20, 3)):
        np.testing.assert_allclose(matrix_to_rpy(rpy_to_matrix(rpy)), rpy, atol=1e-12)
        np.testing.assert_allclose(rotvec_to_rpy(rpy_to_rotvec(rpy)), rpy, atol=1e-12)
    locked = rpy_to_matrix([0.4, math.pi / 2, -0.2])
    np.testing.assert_allclose(rpy_to_matrix(matrix_to_rpy(locked)), locked, atol=1e-12)


def test_rotation_inputs_are_validated():
    with pytest.raises(ValueError, match="shape"):
        rpy_to_matrix([1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        matrix_to_rotvec(np.eye(4))


# ---------------------------------------------------------------------------------- exact integration
DELTAS = np.array([
    [0.010, -0.004, 0.002, 0.10, -0.05, 0.20, 1.0],
    [-0.006, 0.012, 0.000, -0.30, 0.25, 0.05, 1.0],
    [0.003, 0.003, -0.009, 0.02, 0.40, -0.35, 0.0],
    [0.000, -0.011, 0.005, 0.25, 0.00, 0.00, 0.0],
])


def ticks(t_start, t_end, rate):
    n = int(round((t_end - t_start) * rate))
    return [t_start + k / rate for k in range(n)]


@pytest.mark.parametrize("rate", [10, 50, 100, 500])
def test_integrating_one_dt_of_ticks_reproduces_each_delta(rate):
    clock = FakeClock(0.0)
    buf = ChunkBuffer(clock=clock)
    assert buf.push(chunk(DELTAS, stamp=0.0), buf.epoch)
    for i, delta in enumerate(DELTAS):
        cmds = [buf.sample(t, period=1.0 / rate) for t in ticks(0.2 * i, 0.2 * (i + 1), rate)]
        assert all(c.state == STATE_OK and c.action_index == i for c in cmds)
        p, r = integrate_commands(cmds)
        np.testing.assert_allclose(p, delta[:3], atol=1e-12)
        np.testing.assert_allclose(r, rpy_to_matrix(delta[3:6]), atol=1e-12)
        assert cmds[-1].gripper == delta[6]


@pytest.mark.parametrize("rate", [30, 50, 100, 500])
def test_ticks_straddling_action_boundaries_integrate_exactly(rate):
    """Stamp 0.013 puts every action boundary inside a tick; the total still composes exactly."""
    clock = FakeClock(0.013)
    buf = ChunkBuffer(clock=clock)
    assert buf.push(chunk(DELTAS, stamp=0.013), buf.epoch)
    cmds = [buf.sample(t, period=1.0 / rate) for t in ticks(0.0, 1.2, rate)]  # runs past the end
    p, r = integrate_commands(cmds)
    np.testing.assert_allclose(p, DELTAS[:, :3].sum(axis=0), atol=1e-12)  # no delta paid twice
    expected = np.eye(3)
    for delta in DELTAS:
        expected = rpy_to_matrix(delta[3:6]) @ expected
    np.testing.assert_allclose(r, expected, atol=1e-12)
    assert cmds[0].state == STATE_UNDERRUN or cmds[0].coverage < 1.0
    assert cmds[-1].state == STATE_UNDERRUN and cmds[-1].is_zero


def test_straddling_ticks_follow_the_piecewise_timeline_at_every_tick():
    """Rotation-vector actions: the ideal pose at any time is computable with torch expm alone."""
    rng = np.random.default_rng(2)
    acts = np.concatenate([rng.uniform(-0.01, 0.01, (5, 3)), rng.uniform(-0.3, 0.3, (5, 3)), np.ones((5, 1))], 1)
    stamp, dt, rate = 0.0071, 0.2, 70.0
    buf = ChunkBuffer(clock=FakeClock(stamp), mapping=ActionMapping(rotation_format="rotvec"))
    assert buf.push(chunk(acts, stamp=stamp, dt=dt), buf.epoch)

    def ideal(t):
        p, r = np.zeros(3), np.eye(3)
        for i, a in enumerate(acts):
            frac = min(1.0, max(0.0, (t - stamp - i * dt) / dt))
            p = p + frac * a[:3]
            r = expm_skew(frac * a[3:6]) @ r
        return p, r

    p, r = np.zeros(3), np.eye(3)
    for t in ticks(0.0, 1.1, rate):
        p, r = integrate_commands([buf.sample(t, period=1.0 / rate)], p, r)
        p_ref, r_ref = ideal(t + 1.0 / rate)
        np.testing.assert_allclose(p, p_ref, atol=1e-12)
        np.testing.assert_allclose(r, r_ref, atol=1e-12)


def test_instant_sample_is_delta_over_dt():
    buf = ChunkBuffer(clock=FakeClock(0.0))
    buf.push(chunk(DELTAS, stamp=0.0), buf.epoch)
    cmd = buf.sample(0.25)
    assert cmd.t_start == cmd.t_end == 0.25 and cmd.action_index == 1
    np.testing.assert_allclose(cmd.linear, DELTAS[1, :3] / 0.2, atol=1e-15)
    np.testing.assert_allclose(cmd.angular, rpy_to_rotvec(DELTAS[1, 3:6]) / 0.2, atol=1e-14)
    p, r = integrate_commands([cmd], duration=0.2)
    np.testing.assert_allclose(r, rpy_to_matrix(DELTAS[1, 3:6]), atol=1e-12)


# ---------------------------------------------------------------------------------- latency
def test_late_chunk_loses_the_part_already_past():
    clock = FakeClock(0.25)
    buf = ChunkBuffer(clock=clock)
    result = buf.push(chunk(DELTAS[:3], stamp=0.0), buf.epoch)
    assert result.accepted and result.trimmed_s == pytest.approx(0.25)
    assert buf.sample(0.24).state == STATE_UNDERRUN  # before arrival nothing plays
    cmds = [buf.sample(t, period=0.01) for t in ticks(0.25, 0.8, 100)]
    assert cmds[0].action_index == 1
    p, _ = integrate_commands(cmds)
    np.testing.assert_allclose(p, 0.75 * DELTAS[1, :3] + DELTAS[2, :3], atol=1e-12)
    assert buf.status(now=0.25)["last_latency_s"] == pytest.approx(0.25)

    clock.t = 0.9
    expired = buf.push(chunk(DELTAS[:1], stamp=0.5), buf.epoch)
    assert not expired and expired.reason == "expired"


# ---------------------------------------------------------------------------------- policies
def two_chunks(policy, window=0.1, second_k=4):
    clock = FakeClock(0.0)
    buf = ChunkBuffer(policy=policy, crossfade_window_s=window, clock=clock)
    assert buf.push(const_chunk(0.1, stamp=0.0, gripper=1.0), buf.epoch)
    clock.t = 0.35
    assert buf.push(const_chunk(0.2, stamp=0.3, k=second_k, gripper=0.0), buf.epoch)
    return buf


def test_replace_switches_at_arrival_and_never_falls_back():
    buf = two_chunks("replace", second_k=1)  # second covers [0.35, 0.5)
    assert buf.sample(0.34).linear[0] == pytest.approx(0.1)
    assert buf.sample(0.36).linear[0] == pytest.approx(0.2) and buf.sample(0.36).gripper == 0.0
    assert buf.sample(0.3, period=0.1).linear[0] == pytest.approx((0.05 * 0.1 + 0.05 * 0.2) / 0.1)
    late = buf.sample(0.6)  # the first chunk would cover 0.6, but its future was replaced
    assert late.state == STATE_UNDERRUN and late.is_zero and late.gripper == 0.0


def test_crossfade_blends_velocities_linearly_over_the_window():
    buf = two_chunks("crossfade", window=0.1)
    assert buf.sample(0.34).linear[0] == pytest.approx(0.1)
    assert buf.sample(0.375).linear[0] == pytest.approx(0.75 * 0.1 + 0.25 * 0.2)
    assert buf.sample(0.375).gripper == pytest.approx(0.75)
    assert buf.sample(0.46).linear[0] == pytest.approx(0.2)
    # The ramp's mean over the whole window, and over its first half (integral of a linear ramp).
    assert buf.sample_interval(0.35, 0.45).linear[0] == pytest.approx(0.15, abs=1e-15)
    assert buf.sample_interval(0.35, 0.40).linear[0] == pytest.approx(0.1 + 0.1 * 0.25, abs=1e-15)


def test_crossfade_blends_angular_velocity_vectors():
    clock = FakeClock(0.0)
    buf = ChunkBuffer(policy="crossfade", crossfade_window_s=0.2, clock=clock)
    buf.push(chunk([[0, 0, 0, 0, 0, 0.04, 1]] * 4, stamp=0.0), buf.epoch)  # 0.2 rad/s about z
    clock.t = 0.2
    buf.push(chunk([[0, 0, 0, 0.08, 0, 0, 1]] * 4, stamp=0.2), buf.epoch)  # 0.4 rad/s about x
    np.testing.assert_allclose(buf.sample(0.3).angular, [0.2, 0.0, 0.1], atol=1e-14)


def test_ensemble_weights_oldest_prediction_most():
    clock = FakeClock(0.0)
    m = 0.5
    buf = ChunkBuffer(policy="ensemble", ensemble_decay=m, clock=clock)
    ramp = lambda base, grip: [[base * (i + 1), 0, 0, 0, 0, 0, grip] for i in range(4)]  # noqa: E731
    assert buf.push(chunk(ramp(0.01, 1.0), stamp=0.0), buf.epoch)  # covers [0, 0.8)
    clock.t = 0.25
    assert buf.push(chunk(ramp(0.02, 0.0), stamp=0.2), buf.epoch)  # [0.25, 1.0)
    clock.t = 0.45
    assert buf.push(chunk(ramp(0.04, 0.0), stamp=0.4), buf.epoch)  # [0.45, 1.2)
    w = np.exp(-m * np.arange(3))
    # t = 0.5: A index 2, B index 1, C index 0 (velocities = delta / 0.2).
    v = np.array([0.03, 0.04, 0.04]) / 0.2
    cmd = buf.sample(0.5)
    assert cmd.sources == 3 and cmd.linear[0] == pytest.approx((w @ v) / w.sum())
    assert cmd.gripper == pytest.approx(w[0] / w.sum())
    # t = 0.9: A has ended; B (index 3) is now the oldest, C (index 2) the second.
    cmd = buf.sample(0.9)
    v2 = np.array([0.08, 0.12]) / 0.2
    assert cmd.sources == 2 and cmd.linear[0] == pytest.approx((w[:2] @ v2) / w[:2].sum())
    # The interval average over [0.45, 0.5) equals the instant value (constant piece).
    assert buf.sample_interval(0.45, 0.5).linear[0] == pytest.approx((w @ v) / w.sum())


# ---------------------------------------------------------------------------------- safety
def test_underrun_gives_zero_twist_holds_gripper_and_is_counted():
    clock = FakeClock(0.0)
    buf = ChunkBuffer(clock=clock)
    first = buf.sample(0.0, period=0.01)
    assert first.state == STATE_UNDERRUN and first.gripper is None and first.is_zero
    buf.push(chunk([[0.01, 0, 0, 0, 0, 0.1, 0.7]], stamp=0.0), buf.epoch)
    assert buf.sample(0.1, period=0.01).state == STATE_OK
    for t in (0.2, 0.21, 0.22):
        cmd = buf.sample(t, period=0.01)
        assert cmd.state == STATE_UNDERRUN and cmd.is_zero and cmd.gripper == 0.7
    status = buf.status(now=0.3)
    assert status["state"] == STATE_UNDERRUN and status["underruns"] == 1 and status["underrun_ticks"] == 4
    assert status["depth_s"] == 0.0


def test_partial_interval_at_the_end_pays_only_the_covered_part():
    buf = ChunkBuffer(clock=FakeClock(0.0))
    buf.push(const_chunk(0.1, stamp=0.0, k=1), buf.epoch)
    cmd = buf.sample_interval(0.15, 0.25)
    assert cmd.coverage == pytest.approx(0.5) and cmd.linear[0] == pytest.approx(0.05)


def test_reset_discards_chunks_of_the_old_epoch():
    clock = FakeClock(0.0)
    buf = ChunkBuffer(clock=clock)
    old = buf.epoch
    buf.push(const_chunk(0.1, stamp=0.0), old)
    new = buf.reset()
    assert new == old + 1 and buf.sample(0.1).is_zero and buf.sample(0.1).state == STATE_UNDERRUN
    clock.t = 0.1
    late = buf.push(const_chunk(0.1, stamp=0.05), old)  # computed before the reset
    assert not late and late.reason == "stale_epoch"
    assert buf.sample(0.15).is_zero
    assert buf.push(const_chunk(0.3, stamp=0.06), new)
    assert buf.sample(0.15).linear[0] == pytest.approx(0.3)
    assert buf.status()["rejected_by_reason"] == {"stale_epoch": 1}


def test_stop_refuses_chunks_until_resume():
    clock = FakeClock(0.0)
    buf = ChunkBuffer(clock=clock)
    buf.push(const_chunk(0.1, stamp=0.0), buf.epoch)
    assert buf.sample(0.05).gripper == 1.0
    epoch = buf.stop()
    cmd = buf.sample(0.1, period=0.01)
    assert cmd.state == STATE_STOPPED and cmd.is_zero and cmd.gripper == 1.0
    assert buf.push(const_chunk(0.1, stamp=0.05), epoch).reason == "stopped"
    buf.resume()
    assert buf.push(const_chunk(0.1, stamp=0.05), epoch)
    assert buf.sample(0.1).state == STATE_OK


def test_non_finite_chunks_are_rejected_and_counted():
    clock = FakeClock(0.0)
    buf = ChunkBuffer(clock=clock)
    buf.push(const_chunk(0.1, stamp=0.0), buf.epoch)
    clock.t = 0.1
    for bad in (np.nan, np.inf, -np.inf):
        acts = [[0.02, 0, 0, 0, 0, 0, 1.0]] * 4
        acts[2][4] = bad
        result = buf.push(chunk(acts, stamp=0.1), buf.epoch)
        assert not result and result.reason == "non_finite"
    assert buf.sample(0.15).linear[0] == pytest.approx(0.1)  # the good timeline is untouched
    status = buf.status()
    assert status["non_finite"] == 3 and status["rejected"] == 3 and status["accepted"] == 1


def test_max_age_rejects_old_observations_and_cuts_long_chunks():
    clock = FakeClock(0.6)
    buf = ChunkBuffer(max_chunk_age_s=0.5, clock=clock)
    assert buf.push(const_chunk(0.1, stamp=0.0), buf.epoch).reason == "too_old"
    clock.t = 1.1
    assert buf.push(const_chunk(0.1, stamp=1.0, k=10, dt=0.1), buf.epoch)
    assert buf.sample(1.45).state == STATE_OK
    assert buf.sample(1.55).state == STATE_UNDERRUN  # actions 5..9 are from a too-old observation
    assert buf.status(now=1.2)["depth_s"] == pytest.approx(0.3)


def test_out_of_order_and_future_stamps_are_rejected():
    clock = FakeClock(1.0)
    buf = ChunkBuffer(max_future_s=0.2, clock=clock)
    assert buf.push(const_chunk(0.1, stamp=0.9), buf.epoch)
    assert buf.push(const_chunk(0.1, stamp=0.8), buf.epoch).reason == "out_of_order"
    assert buf.push(const_chunk(0.1, stamp=1.5), buf.epoch).reason == "future_stamp"


def test_status_reports_depth_in_seconds_and_actions():
    buf = ChunkBuffer(clock=FakeClock(0.0))
    buf.push(const_chunk(0.1, stamp=0.0, k=4), buf.epoch)
    status = buf.status(now=0.3)
    assert status["depth_s"] == pytest.approx(0.5) and status["depth_actions"] == 3
    assert buf.depth_s(0.79) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------- dims
def test_dims_are_mapped_by_name_and_extra_dims_reported():
    names = ["gripper", "dz", "extra_a", "dyaw", "dx", "dpitch", "dy", "droll", "extra_b"]
    acts = np.array([[0.5, 0.03, 7.0, 0.0, 0.01, 0.0, 0.02, 0.2, -1.0]])
    buf = ChunkBuffer(clock=FakeClock(0.0))
    assert buf.push(chunk(acts, stamp=0.0, names=names), buf.epoch)
    cmd = buf.sample(0.1)
    np.testing.assert_allclose(cmd.linear, [0.05, 0.1, 0.15], atol=1e-15)
    np.testing.assert_allclose(cmd.angular, [1.0, 0.0, 0.0], atol=1e-15)
    assert cmd.gripper == 0.5 and cmd.extras == {"extra_a": 7.0, "extra_b": -1.0}


def test_custom_mapping_without_gripper_and_missing_dims():
    mapping = ActionMapping(position=("x", "y", "z"), rotation=("rx", "ry", "rz"), gripper=None,
                            rotation_format="rotvec")
    buf = ChunkBuffer(mapping=mapping, clock=FakeClock(0.0))
    assert buf.push(chunk([[0.0, 0.0, 0.0]], stamp=0.0, names=["x", "y", "z"]), buf.epoch).reason == "missing_dims"
    assert buf.push(chunk([[0.02, 0, 0, 0, 0, 0.1]], stamp=0.0, names=["x", "y", "z", "rx", "ry", "rz"]), buf.epoch)
    cmd = buf.sample(0.1)
    assert cmd.gripper is None and cmd.angular[2] == pytest.approx(0.5)


def test_invalid_configuration_raises_value_error_naming_the_value():
    with pytest.raises(ValueError, match="blend"):
        ChunkBuffer(policy="blend")
    with pytest.raises(ValueError, match="max_chunk_age_s"):
        ChunkBuffer(max_chunk_age_s=float("nan"))
    with pytest.raises(ValueError, match="rotation_format"):
        ActionMapping(rotation_format="quat")
    with pytest.raises(ValueError, match="t_end > t_start"):
        ChunkBuffer().sample_interval(1.0, 1.0)
