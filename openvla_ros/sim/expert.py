"""Scripted demonstrator for "reach the <colour> cube": the end-effector deltas a teleoperator would give.

Each call returns one OpenVLA-style action [dx, dy, dz, droll, dpitch, dyaw, gripper] covering one
control period (default 0.2 s, the Bridge/OpenVLA rate): a proportional step towards a point
just above the cube, capped in speed, descending as the hand closes in horizontally so it comes
down onto the cube from above rather than sweeping low across the table. Rotation deltas are
zero (the IK then holds the hand's orientation) and the gripper stays open (1.0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openvla_ros.vla.constants import DEFAULT_CONTROL_PERIOD_S

GRIPPER_OPEN = 1.0


@dataclass(frozen=True)
class ReachExpert:
    control_period_s: float = DEFAULT_CONTROL_PERIOD_S
    max_speed_m_s: float = 0.2  # 4 cm per 0.2 s action
    gain: float = 0.6  # fraction of the remaining error closed per period (below 1: no overshoot with arm lag)
    hover_height_m: float = 0.03  # aim this far above the cube centre (5 mm above the default 5 cm cube)
    approach_slope: float = 1.0  # extra aim height per metre of horizontal distance still to go
    max_approach_height_m: float = 0.15

    def __post_init__(self):
        for name in ("control_period_s", "max_speed_m_s", "gain"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.gain > 1:
            raise ValueError(f"gain must be in (0, 1], got {self.gain!r}")
        for name in ("hover_height_m", "approach_slope", "max_approach_height_m"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")

    def aim_point(self, tip_position, cube_position) -> np.ndarray:
        """Where the next step heads: above the cube, higher while still far away horizontally."""
        tip = _vec3("tip_position", tip_position)
        cube = _vec3("cube_position", cube_position)
        goal = cube + np.array([0.0, 0.0, self.hover_height_m])
        horizontal = float(np.linalg.norm(goal[:2] - tip[:2]))
        goal[2] += min(self.max_approach_height_m, self.approach_slope * horizontal)
        return goal

    def action(self, tip_position, cube_position) -> np.ndarray:
        """One 7-D delta action for the current tip and cube positions (base frame, metres)."""
        tip = _vec3("tip_position", tip_position)
        step = self.gain * (self.aim_point(tip, cube_position) - tip)
        max_step = self.max_speed_m_s * self.control_period_s
        norm = float(np.linalg.norm(step))
        if norm > max_step:
            step *= max_step / norm
        return np.array([*step, 0.0, 0.0, 0.0, GRIPPER_OPEN])

    def act(self, scene, target: str) -> np.ndarray:
        """The action for a `PandaScene` and target colour (reads the simulator's true state)."""
        return self.action(scene.tip_position(), scene.cube_position(target))


def _vec3(name: str, value) -> np.ndarray:
    v = np.asarray(value, dtype=float)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return v
