"""Speed of the control-side pieces: one IK step on the Panda and one simulated camera frame.

`bench_ik_and_camera()` backs `openvla-ros bench ik [--json]`; the figures go in the issue notes.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import PANDA_REST_POSTURE, PandaScene


def bench_ik_and_camera(
    n_ik_steps: int = 5000,
    n_frames: int = 20,
    *,
    ik_rate_hz: float = 100.0,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Median/p99 microseconds per `ArmKinematics.step` and median ms per 224x224 camera frame.

    The IK steps follow a random piecewise-constant twist from the rest posture, so the timing
    includes steps that hit the workspace box and joint limits, not only the easy case.
    """
    if n_ik_steps < 1 or n_frames < 1:
        raise ValueError(f"n_ik_steps and n_frames must be >= 1, got {n_ik_steps}, {n_frames}")
    kin = panda_kinematics()
    rng = np.random.default_rng(seed)
    q = np.asarray(PANDA_REST_POSTURE, dtype=float)
    dt = 1.0 / ik_rate_hz
    ik_us = np.empty(n_ik_steps)
    twist = np.zeros(6)
    for i in range(n_ik_steps):
        if i % 50 == 0:
            twist = np.concatenate([rng.uniform(-0.3, 0.3, 3), rng.uniform(-1.0, 1.0, 3)])
        t0 = clock()
        q = kin.step(q, twist, dt).q_next
        ik_us[i] = (clock() - t0) * 1e6

    with PandaScene(seed) as scene:
        scene.render()  # first frame pays one-off renderer set-up
        frame_ms = np.empty(n_frames)
        for i in range(n_frames):
            t0 = clock()
            scene.render()
            frame_ms[i] = (clock() - t0) * 1e3
        width, height = scene.camera.width, scene.camera.height

    return {
        "ik_step_us_median": float(np.median(ik_us)),
        "ik_step_us_p99": float(np.percentile(ik_us, 99)),
        "ik_steps": int(n_ik_steps),
        "camera_frame_ms_median": float(np.median(frame_ms)),
        "camera_frames": int(n_frames),
        "camera_size": [int(width), int(height)],
    }
