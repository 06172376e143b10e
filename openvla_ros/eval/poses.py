"""Rigid-transform helpers for turning recorded end-effector poses into action deltas.

Convention (the one the ground truth of `bags.py` uses):

- Roll/pitch/yaw as in `openvla_ros.control.rotations`: extrinsic X-Y-Z angles,
  ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)``.
- Quaternions are ROS-ordered ``(x, y, z, w)``.
- The delta between two poses ``T_prev`` and ``T_next`` (both base <- end-effector) is expressed in
  the **base frame**: translation ``p_next - p_prev`` and rotation ``R_next @ R_prev.T`` written as
  roll/pitch/yaw, giving ``[dx, dy, dz, droll, dpitch, dyaw]``. Applying the delta to ``T_prev``
  (``p_prev + dp``, ``R_delta @ R_prev``) reproduces ``T_next``.
"""
from __future__ import annotations

import numpy as np

from openvla_ros.control.rotations import matrix_to_rotvec, matrix_to_rpy, rotvec_to_matrix


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} must be finite, got {values.tolist()}")
    return values


def quat_to_matrix(quat_xyzw) -> np.ndarray:
    """3x3 rotation matrix of a (x, y, z, w) quaternion (normalised first)."""
    q = _finite(np.asarray(quat_xyzw, dtype=np.float64).reshape(-1), "quaternion")
    if q.shape != (4,):
        raise ValueError(f"quaternion must have 4 values (x, y, z, w), got {q.shape[0]}")
    norm = float(np.linalg.norm(q))
    if norm < 1e-9:
        raise ValueError(f"quaternion {q.tolist()} has zero length")
    x, y, z, w = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def pose_matrix(position, quat_xyzw) -> np.ndarray:
    """4x4 homogeneous transform from a position and an (x, y, z, w) quaternion."""
    p = _finite(np.asarray(position, dtype=np.float64).reshape(-1), "position")
    if p.shape != (3,):
        raise ValueError(f"position must have 3 values, got {p.shape[0]}")
    transform = np.eye(4)
    transform[:3, :3] = quat_to_matrix(quat_xyzw)
    transform[:3, 3] = p
    return transform


def check_transform(transform, what: str = "transform") -> np.ndarray:
    """`transform` as a finite 4x4 float array whose rotation part is orthonormal."""
    t = np.asarray(transform, dtype=np.float64)
    if t.shape != (4, 4):
        raise ValueError(f"{what} must be a 4x4 matrix, got shape {t.shape}")
    _finite(t, what)
    rotation = t[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6):
        raise ValueError(f"{what} has a rotation part that is not orthonormal: {rotation.tolist()}")
    return t


def pose_delta(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """[dx, dy, dz, droll, dpitch, dyaw] taking `prev` to `nxt`, in the base frame (see module doc)."""
    dp = nxt[:3, 3] - prev[:3, 3]
    return np.concatenate([dp, matrix_to_rpy(nxt[:3, :3] @ prev[:3, :3].T)])


def interpolate_pose(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """Pose a fraction of the way from `a` to `b`: linear in position, constant angular rate in rotation."""
    step = matrix_to_rotvec(b[:3, :3] @ a[:3, :3].T)
    out = np.eye(4)
    out[:3, :3] = rotvec_to_matrix(fraction * step) @ a[:3, :3]
    out[:3, 3] = a[:3, 3] + fraction * (b[:3, 3] - a[:3, 3])
    return out
