"""Arm kinematics on a URDF (pinocchio) and the differential IK step that turns twists into joint targets.

The IK node (and the simulated closed loop) calls `ArmKinematics.step(q, twist, dt)` once per control
period: damped least squares on the tip-frame Jacobian, a nullspace pull towards a rest posture,
and the safety layer MoveIt Servo users expect (singularity deceleration/halt on the Jacobian's
condition number, joint position/velocity limits, an end-effector workspace box). Limits never bend
the joint-space step: the whole step is scaled. Only the workspace box changes the commanded
direction, by projecting the commanded tip target onto the box (a wall stops the outward component).

No ROS imports: the node only maps parameters and messages onto this module.
"""
from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pinocchio as pin

TWIST_FRAME_BASE = "base"
TWIST_FRAME_TOOL = "tool"
TWIST_FRAMES = (TWIST_FRAME_BASE, TWIST_FRAME_TOOL)

# Condition number of the full 6 x n tip Jacobian (as MoveIt Servo, whose Panda example uses
# 17/30). On panda_grasptarget, 50 scripted tabletop reaches ran at 8-12 and the hand-down arm
# reaches 30 only near its full stretch (x ~ 0.69 m at z 0.48 m), so deceleration starts there.
DEFAULT_SINGULARITY_LOWER = 30.0
DEFAULT_SINGULARITY_HARD_STOP = 60.0
# Damping is only switched on when the smallest singular value drops below this (Nakamura-style
# adaptive damping), so away from singularities the step is the exact pseudo-inverse.
# Slowest fraction of the command kept while decelerating, so the hard stop is reached (and the
# arm halts) in finite time instead of creeping towards it.
SINGULARITY_MIN_SCALE = 0.1
DEFAULT_DAMPING_SIGMA = 0.05
DEFAULT_MAX_DAMPING = 0.05
DEFAULT_NULLSPACE_GAIN = 1.0  # 1/s towards the rest posture
DEFAULT_NULLSPACE_MAX_SPEED = 0.5  # rad/s (norm) so the pull never dominates the task
DEFAULT_POSITION_MARGIN = 0.01  # rad (or m) kept clear of the URDF position limits
# The tip may end a step this far beyond a workspace wall: the step is bisected until the
# non-linear FK lands inside the box within this tolerance.
WORKSPACE_TOLERANCE_M = 1e-6
_MAX_BISECTIONS = 30


class IkStatus(enum.IntEnum):
    """Outcome of one IK step; values follow the spirit of MoveIt Servo's StatusCode."""

    OK = 0
    DECELERATE_FOR_SINGULARITY = 1
    HALT_FOR_SINGULARITY = 2
    JOINT_LIMIT = 3  # a joint would cross its position limit: the step stops at the limit
    VELOCITY_LIMIT = 4  # a joint would exceed its velocity limit: the step was slowed down
    WORKSPACE_LIMIT = 5  # the tip target was cut at the workspace box

    @property
    def halts(self) -> bool:
        return self is IkStatus.HALT_FOR_SINGULARITY


@dataclass(frozen=True)
class WorkspaceBox:
    """Axis-aligned box (metres, base frame) that the tip frame origin must stay in."""

    lower: tuple[float, float, float]
    upper: tuple[float, float, float]

    def __post_init__(self):
        lo = _finite_vector("workspace lower", self.lower, 3)
        hi = _finite_vector("workspace upper", self.upper, 3)
        if np.any(lo >= hi):
            raise ValueError(f"workspace lower {lo.tolist()} must be below upper {hi.tolist()} on every axis")
        object.__setattr__(self, "lower", tuple(float(x) for x in lo))
        object.__setattr__(self, "upper", tuple(float(x) for x in hi))

    def contains(self, p: np.ndarray, tol: float = 0.0) -> bool:
        p = np.asarray(p, dtype=float)
        return bool(np.all(p >= np.asarray(self.lower) - tol) and np.all(p <= np.asarray(self.upper) + tol))


@dataclass(frozen=True)
class TipPose:
    """Tip frame in the base frame."""

    position: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3)

    def as_matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.position
        return m


@dataclass(frozen=True)
class IkResult:
    """Next joint targets and why the commanded step was (or was not) shortened."""

    q_next: np.ndarray  # joint targets, in `ArmKinematics.joint_names` order
    status: IkStatus  # the most important limit that acted (OK when none)
    scale: float  # fraction of the (workspace-cut) step executed, 0..1
    condition_number: float  # of the tip Jacobian at q
    manipulability: float  # sqrt(det(J J^T)) at q
    active: frozenset = field(default_factory=frozenset)  # every IkStatus that acted

    @property
    def halted(self) -> bool:
        return self.scale == 0.0


def _finite_vector(name: str, value: Any, size: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {value!r}") from exc
    if arr.ndim != 1 or (size is not None and arr.shape[0] != size):
        want = f"({size},)" if size is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got shape {arr.shape}: {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _is_xml(source: str) -> bool:
    return source.lstrip().startswith("<")


def load_urdf_model(source: str) -> pin.Model:
    """Kinematic model (no geometry, so mesh paths never matter) from a URDF path or XML string."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"URDF source must be a file path or an XML string, got {source!r}")
    if _is_xml(source):
        try:
            return pin.buildModelFromXML(source)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"robot_description is not a valid URDF: {exc}") from exc
    if not os.path.isfile(source):
        raise ValueError(f"URDF file not found: {source!r}")
    try:
        return pin.buildModelFromUrdf(source)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"URDF file {source!r} could not be parsed: {exc}") from exc


class ArmKinematics:
    """Forward kinematics and differential IK of the chain base_frame -> tip_frame of a URDF.

    Joint vectors (q, limits, rest posture, results) are always in the order of `joint_names`,
    which is the order the arm's controller expects. Joints of the URDF that are not controlled
    (e.g. gripper fingers) are locked at `locked_positions` (default 0, clipped to their limits).
    """

    def __init__(
        self,
        model: pin.Model,
        base_frame: str,
        tip_frame: str,
        joint_names: Sequence[str] | None = None,
        *,
        position_lower: Sequence[float] | None = None,
        position_upper: Sequence[float] | None = None,
        velocity_limits: Sequence[float] | None = None,
        position_margin: float = DEFAULT_POSITION_MARGIN,
        rest_posture: Sequence[float] | None = None,
        workspace: WorkspaceBox | None = None,
        singularity_lower: float = DEFAULT_SINGULARITY_LOWER,
        singularity_hard_stop: float = DEFAULT_SINGULARITY_HARD_STOP,
        damping_sigma: float = DEFAULT_DAMPING_SIGMA,
        max_damping: float = DEFAULT_MAX_DAMPING,
        nullspace_gain: float = DEFAULT_NULLSPACE_GAIN,
        nullspace_max_speed: float = DEFAULT_NULLSPACE_MAX_SPEED,
        twist_frame: str = TWIST_FRAME_BASE,
        locked_positions: Mapping[str, float] | None = None,
    ):
        for name in (base_frame, tip_frame):
            if not isinstance(name, str) or not model.existFrame(name):
                known = [f.name for f in model.frames]
                raise ValueError(f"frame {name!r} is not in the URDF; frames: {known}")
        if twist_frame not in TWIST_FRAMES:
            raise ValueError(f"twist_frame must be one of {TWIST_FRAMES}, got {twist_frame!r}")
        if joint_names is None:
            joint_names = self._chain_joints(model, base_frame, tip_frame)
        joint_names = [str(j) for j in joint_names]
        if not joint_names:
            raise ValueError(f"no movable joints between {base_frame!r} and {tip_frame!r}")
        if len(set(joint_names)) != len(joint_names):
            raise ValueError(f"joint_names has duplicates: {joint_names}")
        for j in joint_names:
            if not model.existJointName(j):
                movable = list(model.names)[1:]
                raise ValueError(f"joint {j!r} is not a movable joint of the URDF; movable: {movable}")
            jm = model.joints[model.getJointId(j)]
            if jm.nq != 1 or jm.nv != 1:
                raise ValueError(f"joint {j!r} has nq={jm.nq}, nv={jm.nv}; only revolute/prismatic joints are supported")

        locked_positions = dict(locked_positions or {})
        unknown = set(locked_positions) - set(model.names)
        if unknown:
            raise ValueError(f"locked_positions names unknown joints {sorted(unknown)}")
        q_lock = pin.neutral(model)
        locked_ids = []
        for jid in range(1, model.njoints):
            name = model.names[jid]
            if name in joint_names:
                continue
            locked_ids.append(jid)
            idx = model.joints[jid].idx_q
            for k in range(model.joints[jid].nq):
                lo, hi = model.lowerPositionLimit[idx + k], model.upperPositionLimit[idx + k]
                v = float(locked_positions.get(name, q_lock[idx + k]))
                if np.isfinite(lo) and np.isfinite(hi) and lo <= hi:
                    v = min(max(v, lo), hi)
                q_lock[idx + k] = v
        self._model = pin.buildReducedModel(model, locked_ids, q_lock) if locked_ids else model.copy()
        self._data = self._model.createData()
        m = self._model

        self._joint_names = tuple(joint_names)
        # model_index[i]: index in the pinocchio q of controlled joint i (user order).
        self._model_index = np.array([m.joints[m.getJointId(j)].idx_q for j in joint_names], dtype=int)
        self._n = len(joint_names)
        if m.nq != self._n:
            raise ValueError(f"reduced model has nq={m.nq} for {self._n} joints {joint_names}")
        self._base_id = m.getFrameId(base_frame)
        self._tip_id = m.getFrameId(tip_frame)
        if m.frames[self._base_id].parentJoint != 0:
            moving = m.names[m.frames[self._base_id].parentJoint]
            raise ValueError(f"base frame {base_frame!r} moves with controlled joint {moving!r}")
        self._base_frame, self._tip_frame = base_frame, tip_frame

        urdf_lo = m.lowerPositionLimit[self._model_index]
        urdf_hi = m.upperPositionLimit[self._model_index]
        urdf_vel = m.velocityLimit[self._model_index]
        lo = urdf_lo if position_lower is None else _finite_vector("position_lower", position_lower, self._n)
        hi = urdf_hi if position_upper is None else _finite_vector("position_upper", position_upper, self._n)
        vel = urdf_vel if velocity_limits is None else _finite_vector("velocity_limits", velocity_limits, self._n)
        if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)) or np.any(lo >= hi):
            raise ValueError(f"position limits must be finite with lower < upper, got {lo.tolist()} / {hi.tolist()}")
        if not np.all(np.isfinite(vel)) or np.any(vel <= 0):
            raise ValueError(f"velocity_limits must be positive and finite, got {vel.tolist()}")
        margin = float(position_margin)
        if not math.isfinite(margin) or margin < 0 or np.any(hi - lo <= 2 * margin):
            raise ValueError(f"position_margin {position_margin!r} must be >= 0 and leave room inside the limits")
        self._lower, self._upper, self._velocity = lo.copy(), hi.copy(), vel.copy()
        self._margin = margin

        if rest_posture is None:
            rest = 0.5 * (lo + hi)
        else:
            rest = _finite_vector("rest_posture", rest_posture, self._n)
        self._rest = np.clip(rest, lo + margin, hi - margin)

        if workspace is not None and not isinstance(workspace, WorkspaceBox):
            raise ValueError(f"workspace must be a WorkspaceBox or None, got {workspace!r}")
        self._workspace = workspace
        self._sing_lower = _positive("singularity_lower", singularity_lower)
        self._sing_hard = _positive("singularity_hard_stop", singularity_hard_stop)
        if self._sing_hard <= self._sing_lower:
            raise ValueError(f"singularity_hard_stop {singularity_hard_stop} must exceed singularity_lower {singularity_lower}")
        self._damping_sigma = _positive("damping_sigma", damping_sigma)
        self._max_damping = _positive("max_damping", max_damping)
        if not (math.isfinite(float(nullspace_gain)) and float(nullspace_gain) >= 0):
            raise ValueError(f"nullspace_gain must be >= 0, got {nullspace_gain!r}")
        self._null_gain = float(nullspace_gain)
        self._null_max = _positive("nullspace_max_speed", nullspace_max_speed)
        self._twist_frame = twist_frame

        pin.framesForwardKinematics(m, self._data, pin.neutral(m))
        base = self._data.oMf[self._base_id]
        self._R_ob = base.rotation.copy()  # base axes in the model's world frame
        self._t_ob = base.translation.copy()

    # ---- construction helpers -------------------------------------------------------------
    @classmethod
    def from_urdf(cls, source: str, base_frame: str, tip_frame: str, joint_names: Sequence[str] | None = None, **kw) -> "ArmKinematics":
        """`source` is a URDF file path or the XML itself (a `robot_description` string)."""
        return cls(load_urdf_model(source), base_frame, tip_frame, joint_names, **kw)

    @staticmethod
    def _chain_joints(model: pin.Model, base_frame: str, tip_frame: str) -> list[str]:
        tip_joint = model.frames[model.getFrameId(tip_frame)].parentJoint
        base_joint = model.frames[model.getFrameId(base_frame)].parentJoint
        base_support = set(model.supports[base_joint])
        return [model.names[j] for j in model.supports[tip_joint] if j != 0 and j not in base_support]

    # ---- properties -----------------------------------------------------------------------
    @property
    def joint_names(self) -> tuple[str, ...]:
        return self._joint_names

    @property
    def n_joints(self) -> int:
        return self._n

    @property
    def base_frame(self) -> str:
        return self._base_frame

    @property
    def tip_frame(self) -> str:
        return self._tip_frame

    @property
    def position_lower(self) -> np.ndarray:
        return self._lower.copy()

    @property
    def position_upper(self) -> np.ndarray:
        return self._upper.copy()

    @property
    def velocity_limits(self) -> np.ndarray:
        return self._velocity.copy()

    @property
    def position_margin(self) -> float:
        return self._margin

    @property
    def rest_posture(self) -> np.ndarray:
        return self._rest.copy()

    @property
    def workspace(self) -> WorkspaceBox | None:
        return self._workspace

    @property
    def singularity_thresholds(self) -> tuple[float, float]:
        return self._sing_lower, self._sing_hard

    @property
    def twist_frame(self) -> str:
        """Axes of the twists `step` expects by default: "base" (base_frame) or "tool" (tip_frame)."""
        return self._twist_frame

    # ---- kinematics ----------------------------------------------------------------------
    def validate_q(self, q: Any) -> np.ndarray:
        return _finite_vector("joint positions q", q, self._n)

    def _to_model(self, q: np.ndarray) -> np.ndarray:
        qm = np.empty(self._n)
        qm[self._model_index] = q
        return qm

    def _tip_world(self, q: np.ndarray) -> pin.SE3:
        pin.framesForwardKinematics(self._model, self._data, self._to_model(q))
        return self._data.oMf[self._tip_id]

    def _world_to_base(self, oMt: pin.SE3) -> TipPose:
        return TipPose(self._R_ob.T @ (oMt.translation - self._t_ob), self._R_ob.T @ oMt.rotation)

    def tip_pose(self, q: Any) -> TipPose:
        """Forward kinematics of the tip frame, expressed in the base frame."""
        return self._world_to_base(self._tip_world(self.validate_q(q)))

    def _jacobian_world(self, q: np.ndarray) -> tuple[np.ndarray, pin.SE3]:
        m, d = self._model, self._data
        pin.computeJointJacobians(m, d, self._to_model(q))
        pin.updateFramePlacements(m, d)
        J = pin.getFrameJacobian(m, d, self._tip_id, pin.LOCAL_WORLD_ALIGNED)
        return J[:, self._model_index], d.oMf[self._tip_id]

    def jacobian(self, q: Any) -> np.ndarray:
        """6 x n Jacobian of the tip: rows [v; w] of the tip origin, in base-frame axes."""
        J, _ = self._jacobian_world(self.validate_q(q))
        R = self._R_ob.T
        return np.vstack([R @ J[:3], R @ J[3:]])

    def condition_number(self, q: Any) -> float:
        J, _ = self._jacobian_world(self.validate_q(q))
        return self._cond(np.linalg.svd(J, compute_uv=False))

    @staticmethod
    def _cond(s: np.ndarray) -> float:
        return float(s[0] / s[-1]) if s[-1] > 0 else math.inf

    def _cond_at(self, q: np.ndarray) -> float:
        J, _ = self._jacobian_world(q)
        return self._cond(np.linalg.svd(J, compute_uv=False))

    def within_limits(self, q: Any, tol: float = 1e-9) -> bool:
        q = self.validate_q(q)
        return bool(np.all(q >= self._lower - tol) and np.all(q <= self._upper + tol))

    # ---- differential IK -----------------------------------------------------------------
    def step(self, q: Any, twist: Any, dt: float, twist_frame: str | None = None) -> IkResult:
        """Joint targets one period `dt` ahead for a tip twist held over that period.

        `twist` = [vx, vy, vz, wx, wy, wz] (m/s, rad/s) of the tip frame origin, in the base frame's
        axes (`twist_frame="base"`) or the tip frame's own axes (`"tool"`). A zero twist returns q
        unchanged (the nullspace pull only acts while the arm is commanded to move).
        """
        q = self.validate_q(q)
        twist = _finite_vector("twist", twist, 6)
        dt = _positive("dt", dt)
        frame = self._twist_frame if twist_frame is None else twist_frame
        if frame not in TWIST_FRAMES:
            raise ValueError(f"twist_frame must be one of {TWIST_FRAMES}, got {frame!r}")

        J, oMt = self._jacobian_world(q)
        U, S, Vt = np.linalg.svd(J, full_matrices=True)
        cond = self._cond(S)
        manip = float(np.prod(S))
        if not np.any(twist):
            return IkResult(q.copy(), IkStatus.OK, 1.0, cond, manip, frozenset())

        # Twist -> world axes at the tip origin (what LOCAL_WORLD_ALIGNED Jacobians expect).
        R_in = self._R_ob if frame == TWIST_FRAME_BASE else oMt.rotation
        disp = np.concatenate([R_in @ twist[:3], R_in @ twist[3:]]) * dt
        active: set[IkStatus] = set()

        p_base = self._R_ob.T @ (oMt.translation - self._t_ob)
        if self._workspace is not None:
            target = p_base + self._R_ob.T @ disp[:3]
            lo, hi = np.asarray(self._workspace.lower), np.asarray(self._workspace.upper)
            # Outside the box already (e.g. at start-up), motion back inwards stays allowed.
            cut = np.clip(target, np.minimum(lo, p_base), np.maximum(hi, p_base))
            if np.any(cut != target):
                active.add(IkStatus.WORKSPACE_LIMIT)
                disp[:3] = self._R_ob @ (cut - p_base)

        # Damped least squares, damping only near singularities (smallest singular value).
        m_task = S.shape[0]
        s_min = S[-1]
        lam2 = 0.0
        if s_min < self._damping_sigma:
            lam2 = (1.0 - (s_min / self._damping_sigma) ** 2) * self._max_damping ** 2
        inv = S / (S * S + lam2) if lam2 > 0 else np.where(S > 0, 1.0 / np.where(S > 0, S, 1.0), 0.0)
        V = Vt.T
        dq_task = V[:, :m_task] @ (inv * (U.T @ disp))
        dq = dq_task
        if self._null_gain > 0 and self._n > m_task:
            N = V[:, m_task:]
            dq_null = N @ (N.T @ (self._null_gain * (self._rest - q)))
            speed = np.linalg.norm(dq_null)
            if speed > self._null_max:
                dq_null *= self._null_max / speed
            dq = dq_task + dq_null * dt
        if not np.any(dq):
            # Nothing of the command is feasible: cut away by the box, or only along a direction
            # the Jacobian has lost (exact singularity).
            if IkStatus.WORKSPACE_LIMIT not in active:
                active.add(IkStatus.HALT_FOR_SINGULARITY)
            status = self._pick_status(active, {}, 0.0)
            return IkResult(q.copy(), status, 0.0, cond, manip, frozenset(active))

        scales: dict[IkStatus, float] = {}
        # Singularity: decelerate/halt only when the commanded motion makes conditioning worse
        # (as MoveIt Servo). Judged on the task part alone so the nullspace pull cannot mask it.
        if cond > self._sing_lower and self._cond_at(q + dq_task) > cond:
            if cond >= self._sing_hard:
                scales[IkStatus.HALT_FOR_SINGULARITY] = 0.0
            else:
                ramp = 1.0 - (cond - self._sing_lower) / (self._sing_hard - self._sing_lower)
                scales[IkStatus.DECELERATE_FOR_SINGULARITY] = max(SINGULARITY_MIN_SCALE, ramp)

        vel_ratio = np.max(np.abs(dq) / (self._velocity * dt))
        if vel_ratio > 1.0:
            scales[IkStatus.VELOCITY_LIMIT] = 1.0 / vel_ratio

        lo, hi = self._lower + self._margin, self._upper - self._margin
        q_full = q + dq
        bound = np.where(dq > 0, hi, lo)
        crossing = np.where(dq > 0, q_full > hi, q_full < lo) & (dq != 0)
        s_pos = 1.0
        if np.any(crossing):
            # Already beyond a limit and moving further out gives 0: the arm only moves back in.
            s_pos = float(max(0.0, np.min((bound[crossing] - q[crossing]) / dq[crossing])))
        if s_pos < 1.0:
            scales[IkStatus.JOINT_LIMIT] = s_pos

        scale = min([1.0, *scales.values()])
        active.update(k for k, v in scales.items() if v < 1.0 or k is IkStatus.HALT_FOR_SINGULARITY)

        # The checks above are linear; the non-linear FK may still overshoot a wall slightly, so
        # shorten the step until it does not.
        if scale > 0 and self._workspace is not None:
            scale = self._bisect_workspace(q, dq, scale, p_base, active)
        # A step that would end beyond the hard stop halts instead (the deceleration floor makes
        # this happen in finite time rather than creeping towards the threshold forever).
        # Below half the lower threshold one step cannot reach the hard stop: skip the extra SVD.
        if scale > 0 and cond >= 0.5 * self._sing_lower:
            cond_next = self._cond_at(q + scale * dq)
            if cond_next >= self._sing_hard and cond_next > cond:
                scale = 0.0
                active.add(IkStatus.HALT_FOR_SINGULARITY)

        q_next = q + scale * dq
        status = self._pick_status(active, scales, scale)
        return IkResult(q_next, status, float(scale), cond, manip, frozenset(active))

    def _bisect_workspace(self, q, dq, scale, p_base, active) -> float:
        ws = self._workspace
        # Tolerance is added to the walls, not to a start already outside them: otherwise every
        # step could creep one tolerance further out.
        lo = np.minimum(np.asarray(ws.lower) - WORKSPACE_TOLERANCE_M, p_base)
        hi = np.maximum(np.asarray(ws.upper) + WORKSPACE_TOLERANCE_M, p_base)
        for _ in range(_MAX_BISECTIONS):
            p = self._R_ob.T @ (self._tip_world(q + scale * dq).translation - self._t_ob)
            if np.all(p >= lo) and np.all(p <= hi):
                return scale
            active.add(IkStatus.WORKSPACE_LIMIT)
            scale *= 0.5
        return 0.0

    @staticmethod
    def _pick_status(active: set, scales: dict, scale: float) -> IkStatus:
        if IkStatus.HALT_FOR_SINGULARITY in active:
            return IkStatus.HALT_FOR_SINGULARITY
        if scales:
            binding = min(scales, key=lambda k: (scales[k], -_SEVERITY[k]))
            if scales[binding] < 1.0:
                return binding
        for st in (IkStatus.WORKSPACE_LIMIT, IkStatus.DECELERATE_FOR_SINGULARITY):
            if st in active:
                return st
        return IkStatus.OK


_SEVERITY = {
    IkStatus.OK: 0,
    IkStatus.VELOCITY_LIMIT: 1,
    IkStatus.DECELERATE_FOR_SINGULARITY: 2,
    IkStatus.WORKSPACE_LIMIT: 3,
    IkStatus.JOINT_LIMIT: 4,
    IkStatus.HALT_FOR_SINGULARITY: 5,
}


# ---- parameters (the names ik_node declares; config/robots/*.yaml uses them) ---------------
PARAM_DEFAULTS: dict[str, Any] = {
    "base_frame": "",
    "tip_frame": "",
    "joint_names": [],
    "position_lower": [],  # empty: from the URDF
    "position_upper": [],
    "velocity_limits": [],
    "position_margin": DEFAULT_POSITION_MARGIN,
    "rest_posture": [],  # empty: middle of the limits
    "workspace_min": [],  # empty: no box
    "workspace_max": [],
    "singularity_lower_threshold": DEFAULT_SINGULARITY_LOWER,
    "singularity_hard_stop_threshold": DEFAULT_SINGULARITY_HARD_STOP,
    "damping_sigma": DEFAULT_DAMPING_SIGMA,
    "max_damping": DEFAULT_MAX_DAMPING,
    "nullspace_gain": DEFAULT_NULLSPACE_GAIN,
    "nullspace_max_speed": DEFAULT_NULLSPACE_MAX_SPEED,
    "twist_frame": TWIST_FRAME_BASE,
}


def kinematics_from_params(urdf: str, params: Mapping[str, Any]) -> ArmKinematics:
    """Build `ArmKinematics` from a URDF (path or XML) and a flat parameter mapping (ROS params).

    Empty lists mean "not set". Unknown keys are ignored so the node can pass its whole
    parameter set.
    """
    p = {**PARAM_DEFAULTS, **{k: v for k, v in params.items() if k in PARAM_DEFAULTS}}

    def opt(key):
        v = p[key]
        return None if v is None or len(v) == 0 else list(v)

    if not p["base_frame"] or not p["tip_frame"]:
        raise ValueError(f"base_frame and tip_frame must be set, got {p['base_frame']!r} and {p['tip_frame']!r}")
    ws_min, ws_max = opt("workspace_min"), opt("workspace_max")
    if (ws_min is None) != (ws_max is None):
        raise ValueError(f"workspace_min {ws_min} and workspace_max {ws_max} must be set together")
    workspace = WorkspaceBox(tuple(ws_min), tuple(ws_max)) if ws_min is not None else None
    return ArmKinematics.from_urdf(
        urdf,
        p["base_frame"],
        p["tip_frame"],
        opt("joint_names"),
        position_lower=opt("position_lower"),
        position_upper=opt("position_upper"),
        velocity_limits=opt("velocity_limits"),
        position_margin=p["position_margin"],
        rest_posture=opt("rest_posture"),
        workspace=workspace,
        singularity_lower=p["singularity_lower_threshold"],
        singularity_hard_stop=p["singularity_hard_stop_threshold"],
        damping_sigma=p["damping_sigma"],
        max_damping=p["max_damping"],
        nullspace_gain=p["nullspace_gain"],
        nullspace_max_speed=p["nullspace_max_speed"],
        twist_frame=p["twist_frame"],
    )
