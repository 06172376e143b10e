"""Closed-loop episodes in the simulated scene without ROS: policy deltas -> twist -> diff-IK -> joint targets.

This is the same chain ik_node runs (twist = delta / control period, integrated by
`ArmKinematics.step` at the IK rate from the last commanded joint positions), done in one
process so tests, benchmarks and demonstration recording can run it quickly and deterministically.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from openvla_ros.control.kinematics import ArmKinematics, WorkspaceBox
from openvla_ros.sim.scene import (
    PANDA_ARM_JOINTS,
    PANDA_BASE_FRAME,
    PANDA_REST_POSTURE,
    PANDA_TIP_FRAME,
    SUCCESS_RADIUS_M,
    PandaScene,
    panda_urdf_path,
)
from openvla_ros.vla.constants import DEFAULT_CONTROL_PERIOD_S

# Workspace box of the tabletop cell (base frame, m): fingertips stay 1.5 cm above the table.
PANDA_WORKSPACE = WorkspaceBox((0.2, -0.45, 0.015), (0.8, 0.45, 0.7))
DEFAULT_IK_RATE_HZ = 60.0
DEFAULT_EPISODE_SECONDS = 8.0

Policy = Callable[[PandaScene], np.ndarray]


def panda_kinematics(**overrides) -> ArmKinematics:
    """ArmKinematics of the pybullet Panda with the cell's rest posture and workspace box."""
    kw = dict(rest_posture=PANDA_REST_POSTURE, workspace=PANDA_WORKSPACE)
    kw.update(overrides)
    return ArmKinematics.from_urdf(panda_urdf_path(), PANDA_BASE_FRAME, PANDA_TIP_FRAME, list(PANDA_ARM_JOINTS), **kw)


def posture_reaching(kinematics: ArmKinematics, tip_goal, q_start, *, tolerance_m: float = 1e-3,
                     max_iterations: int = 400, step_s: float = 0.05, max_speed_m_s: float = 0.5) -> np.ndarray:
    """Joint positions with the tip at `tip_goal` (base frame), reached from `q_start` by the diff-IK.

    The same IK the arm is driven with, integrated without dynamics: the hand keeps `q_start`'s
    orientation and the posture stays on the IK's nullspace-regularised branch (what a teleoperator
    driving the arm there would leave it in). Raises ValueError when the goal is not reached
    within `tolerance_m` (outside the workspace box or out of reach).
    """
    goal = np.asarray(tip_goal, dtype=float)
    if goal.shape != (3,) or not np.all(np.isfinite(goal)):
        raise ValueError(f"tip_goal must be 3 finite numbers, got {tip_goal!r}")
    q = kinematics.validate_q(q_start)
    for _ in range(max_iterations):
        error = goal - kinematics.tip_pose(q).position
        distance = float(np.linalg.norm(error))
        if distance <= tolerance_m:
            return q
        velocity = error / step_s
        speed = float(np.linalg.norm(velocity))
        if speed > max_speed_m_s:
            velocity *= max_speed_m_s / speed
        q = kinematics.step(q, np.concatenate([velocity, np.zeros(3)]), step_s).q_next
    raise ValueError(f"tip_goal {goal.tolist()} not reached within {tolerance_m} m (still {distance:.4f} m away)")


@dataclass
class EpisodeResult:
    target: str
    success: bool
    periods: int  # control periods executed (actions applied)
    sim_time_s: float
    final_distance_m: float
    min_distance_m: float
    actions: np.ndarray  # (periods, 7) actions as applied
    ik_status_counts: Counter = field(default_factory=Counter)


def _steps_per(outer: float, inner: float, what: str) -> int:
    n = round(outer / inner)
    if n < 1 or not math.isclose(n * inner, outer, rel_tol=1e-6):
        raise ValueError(f"{what}: {outer} s is not a whole multiple of {inner} s")
    return int(n)


def run_episode(
    scene: PandaScene,
    kinematics: ArmKinematics,
    policy: Policy,
    target: str,
    *,
    max_seconds: float = DEFAULT_EPISODE_SECONDS,
    control_period_s: float = DEFAULT_CONTROL_PERIOD_S,
    ik_rate_hz: float = DEFAULT_IK_RATE_HZ,
    stop_on_success: bool = True,
    periods_after_success: int = 0,
    on_period: Callable[[PandaScene, np.ndarray], None] | None = None,
) -> EpisodeResult:
    """Run `policy` (scene -> 7-D delta action per control period) from the scene's current state.

    Success is the tip coming within the scene's success radius of the target cube at the end of
    any control period. With `stop_on_success` the episode ends `periods_after_success` control
    periods after that (0: at once). `on_period(scene, action)` is called before each action is
    applied (e.g. to record the observation with the action).
    """
    if tuple(kinematics.joint_names) != tuple(scene.joint_names):
        raise ValueError(f"kinematics joints {kinematics.joint_names} differ from the scene's {scene.joint_names}")
    if not (math.isfinite(ik_rate_hz) and ik_rate_hz > 0):
        raise ValueError(f"ik_rate_hz must be positive, got {ik_rate_hz!r}")
    if isinstance(periods_after_success, bool) or not isinstance(periods_after_success, (int, np.integer)) \
            or periods_after_success < 0:
        raise ValueError(f"periods_after_success must be an integer >= 0, got {periods_after_success!r}")
    ik_dt = 1.0 / ik_rate_hz
    physics_per_ik = _steps_per(ik_dt, scene.physics_dt, "IK period vs physics step")
    ik_per_period = _steps_per(control_period_s, ik_dt, "control period vs IK period")
    q_cmd = scene.get_joint_positions()
    statuses: Counter = Counter()
    actions = []
    min_dist = scene.distance_to(target)
    success = False
    periods_left = None  # counts down once the target is reached (with stop_on_success)
    n_periods = int(math.floor(max_seconds / control_period_s + 1e-9))
    for _ in range(n_periods):
        action = np.asarray(policy(scene), dtype=float)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            raise ValueError(f"policy action must be 7 finite numbers, got {action!r}")
        if on_period is not None:
            on_period(scene, action)
        actions.append(action)
        twist = action[:6] / control_period_s
        scene.set_gripper(float(np.clip(action[6], 0.0, 1.0)))
        for _ in range(ik_per_period):
            res = kinematics.step(q_cmd, twist, ik_dt)
            statuses[res.status.name] += 1
            q_cmd = res.q_next
            scene.set_joint_targets(q_cmd)
            scene.step(physics_per_ik)
        dist = scene.distance_to(target)
        min_dist = min(min_dist, dist)
        if periods_left is not None:
            periods_left -= 1
        elif dist <= SUCCESS_RADIUS_M:
            success = True
            if stop_on_success:
                periods_left = int(periods_after_success)
        if periods_left == 0:
            break
    return EpisodeResult(
        target=target,
        success=success,
        periods=len(actions),
        sim_time_s=scene.time,
        final_distance_m=scene.distance_to(target),
        min_distance_m=min_dist,
        actions=np.array(actions).reshape(-1, 7),
        ik_status_counts=statuses,
    )
