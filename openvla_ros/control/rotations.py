"""Rotation conversions for end-effector deltas: roll/pitch/yaw <-> matrix <-> rotation vector.

Frame convention (used across openvla_ros.control):

* Roll/pitch/yaw are the released OpenVLA (Bridge) rotation deltas: extrinsic rotations about the
  fixed X, then Y, then Z axes, i.e. ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (the same matrix as the
  intrinsic Z-Y'-X'' sequence). A delta rotation ``R_delta`` acts in the robot base frame:
  ``R_next = R_delta @ R_current``.
* A rotation vector is ``axis * angle`` (radians, angle in [0, pi]) in the same frame as the matrix,
  so ``rotvec_to_matrix(v) = expm(skew(v))``. An angular velocity ``omega`` held for ``tau`` seconds
  in the base frame turns ``R`` into ``rotvec_to_matrix(omega * tau) @ R``.

All functions take and return float64 numpy arrays and are robust near angle 0 (series expansions)
and near pi (axis recovered from the symmetric part of the matrix).
"""
from __future__ import annotations

import math

import numpy as np

# Below this angle the Rodrigues coefficients use their Taylor series: the closed forms lose
# precision to cancellation (1 - cos) and 0/0.
_SMALL_ANGLE = 1e-4


def _as_vec3(value, name: str) -> np.ndarray:
    vec = np.asarray(value, dtype=np.float64)
    if vec.shape != (3,):
        raise ValueError(f"{name} must have shape (3,), got {vec.shape}")
    return vec


def _as_mat3(value, name: str) -> np.ndarray:
    mat = np.asarray(value, dtype=np.float64)
    if mat.shape != (3, 3):
        raise ValueError(f"{name} must have shape (3, 3), got {mat.shape}")
    return mat


def skew(vector) -> np.ndarray:
    """The cross-product matrix ``[v]x`` with ``skew(v) @ u == cross(v, u)``."""
    x, y, z = _as_vec3(vector, "vector")
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def rpy_to_matrix(rpy) -> np.ndarray:
    """Roll/pitch/yaw (radians, extrinsic XYZ) -> ``Rz(yaw) @ Ry(pitch) @ Rx(roll)``."""
    roll, pitch, yaw = _as_vec3(rpy, "rpy")
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(yaw), math.sin(yaw)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def matrix_to_rpy(matrix) -> np.ndarray:
    """Inverse of `rpy_to_matrix`: pitch in [-pi/2, pi/2], roll and yaw in (-pi, pi].

    At gimbal lock (|pitch| = pi/2) only roll -/+ yaw is defined; roll is then reported as 0.
    """
    r = _as_mat3(matrix, "matrix")
    cos_pitch = math.hypot(r[0, 0], r[1, 0])
    pitch = math.atan2(-r[2, 0], cos_pitch)
    if cos_pitch > 1e-9:
        roll = math.atan2(r[2, 1], r[2, 2])
        yaw = math.atan2(r[1, 0], r[0, 0])
    else:
        roll = 0.0
        yaw = math.atan2(-r[0, 1], r[1, 1])
    return np.array([roll, pitch, yaw])


def rotvec_to_matrix(rotvec) -> np.ndarray:
    """Rotation vector (axis * angle) -> matrix, by Rodrigues' formula."""
    v = _as_vec3(rotvec, "rotvec")
    theta2 = float(v @ v)
    theta = math.sqrt(theta2)
    if theta < _SMALL_ANGLE:
        a = 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0  # sin(t)/t
        b = 0.5 - theta2 / 24.0 + theta2 * theta2 / 720.0  # (1 - cos(t))/t^2
    else:
        a = math.sin(theta) / theta
        b = (1.0 - math.cos(theta)) / theta2
    k = skew(v)
    return np.eye(3) + a * k + b * (k @ k)


def matrix_to_rotvec(matrix) -> np.ndarray:
    """Matrix -> rotation vector with angle in [0, pi] (the principal logarithm).

    The angle comes from ``atan2(sin, cos)`` so it stays accurate at both ends. For angles above
    pi/2 the axis is read from the symmetric part ``(R + R^T)/2 = cos I + (1 - cos) a a^T``, which
    stays well conditioned up to pi, where the antisymmetric part vanishes.
    """
    r = _as_mat3(matrix, "matrix")
    vee = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])  # 2 sin(t) a
    sin_theta = 0.5 * float(np.linalg.norm(vee))
    cos_theta = 0.5 * (float(np.trace(r)) - 1.0)
    theta = math.atan2(sin_theta, cos_theta)
    if cos_theta > 0.0:
        if theta < _SMALL_ANGLE:
            t2 = theta * theta
            scale = 0.5 * (1.0 + t2 / 6.0 + 7.0 * t2 * t2 / 360.0)  # t / (2 sin t)
        else:
            scale = 0.5 * theta / sin_theta
        return scale * vee
    outer = (0.5 * (r + r.T) - cos_theta * np.eye(3)) / (1.0 - cos_theta)  # a a^T
    col = int(np.argmax(np.diag(outer)))
    axis = outer[:, col] / math.sqrt(max(outer[col, col], 1e-300))
    if float(axis @ vee) < 0.0:  # the sign is free only at exactly pi, where vee is 0
        axis = -axis
    return theta * axis / np.linalg.norm(axis)


def rpy_to_rotvec(rpy) -> np.ndarray:
    """Roll/pitch/yaw delta -> the rotation vector of the same rotation."""
    return matrix_to_rotvec(rpy_to_matrix(rpy))


def rotvec_to_rpy(rotvec) -> np.ndarray:
    """Rotation vector -> roll/pitch/yaw of the same rotation."""
    return matrix_to_rpy(rotvec_to_matrix(rotvec))


def rotation_angle(matrix) -> float:
    """Angle (radians, [0, pi]) of a rotation matrix; handy to compare two rotations."""
    return float(np.linalg.norm(matrix_to_rotvec(matrix)))
