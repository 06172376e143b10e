"""Runs a `PandaScene` for sim_node: physics pacing, command hand-over and output schedule, without ROS.

One thread owns the scene (pybullet clients are not thread-safe) and calls `SimLoop.run_once()`
repeatedly; other threads (ROS callbacks) only hand over the newest joint targets, gripper command
or a reset request, which the owning thread applies before its next physics step.

Time: the physics advances in fixed steps of `scene.physics_dt`. `sim_time` counts every step since
the loop started and, unlike `scene.time`, keeps running across episode resets, so it can drive a
`/clock`. With `real_time` the loop sleeps so that simulated time follows the wall clock; falling
further behind than `max_lag_s` (a slow CPU) re-bases the pacing instead of racing to catch up,
and is counted. Without it the loop runs `speed` times faster than real time (0 = as fast as the
CPU allows). Joint states and camera frames are produced on a schedule in simulated time.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scene import PandaScene, instruction_for, target_for_seed

DEFAULT_JOINT_STATE_RATE_HZ = 100.0
DEFAULT_CAMERA_RATE_HZ = 10.0
DEFAULT_MAX_LAG_S = 0.25
# A joint command this far (rad, any joint) from where the arm is, is refused, as a driver refuses a
# position jump: a controller integrating from a posture the arm is no longer in (commands sent
# before a reset, or a controller that lost track) would otherwise yank the arm there. A tracking
# controller's commands stay within a few hundredths of a radian of the measured posture.
DEFAULT_MAX_COMMAND_JUMP_RAD = 0.2
# Simulated seconds after an episode starts during which a refused jump is expected, not an error:
# a controller's commands still integrate from the previous episode's posture until it has seen the
# new joint states (ik_node re-seeds within a few joint-state periods). Such refusals are counted
# (stale_commands_after_reset) but not logged, so a demo does not print an ERROR at every reset.
EPISODE_START_GRACE_S = 0.5
_RATE_WINDOW = 100  # samples for the measured real-time factor and camera rate


class CommandJumpError(ValueError):
    """A joint command farther from the arm's posture than max_command_jump_rad."""


@dataclass(frozen=True)
class Episode:
    """The task of the current episode."""

    seed: int
    target: str
    instruction: str
    cube_positions: dict  # colour -> (3,) base-frame centre at the start


@dataclass(frozen=True)
class SimSnapshot:
    """The simulated state at the last joint-state sample (for tests, the demo and status)."""

    sim_time: float  # s since the loop started (the /clock time)
    episode_time: float  # s since the episode's reset
    names: tuple
    positions: np.ndarray
    velocities: np.ndarray
    tip_position: np.ndarray
    tip_quaternion: np.ndarray  # xyzw
    cube_positions: dict
    target: str
    distance_to_target: float
    success: bool


class _Pending:
    """Newest-wins hand-over slot between ROS callback threads and the loop thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.joints = None
        self.gripper = None
        self.reset = None  # (seed, target, done Event, result holder)


class SimLoop:
    def __init__(
        self,
        scene: PandaScene,
        *,
        target: str | None = None,
        real_time: bool = True,
        speed: float = 0.0,
        joint_state_rate_hz: float = DEFAULT_JOINT_STATE_RATE_HZ,
        camera_rate_hz: float = DEFAULT_CAMERA_RATE_HZ,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        max_command_jump_rad: float = DEFAULT_MAX_COMMAND_JUMP_RAD,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[float], None] | None = None,
        on_joint_state: Callable[[SimSnapshot], None] | None = None,
        on_image: Callable[[float, np.ndarray, float], None] | None = None,
        renderer=None,
        on_episode: Callable[[Episode], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        for name, value in (("joint_state_rate_hz", joint_state_rate_hz), ("camera_rate_hz", camera_rate_hz),
                            ("max_lag_s", max_lag_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(max_command_jump_rad, (int, float)) and math.isfinite(max_command_jump_rad)
                and max_command_jump_rad >= 0):
            raise ValueError(f"max_command_jump_rad must be >= 0 (0: no check), got {max_command_jump_rad!r}")
        self.max_command_jump_rad = float(max_command_jump_rad)
        if not (isinstance(speed, (int, float)) and math.isfinite(speed) and speed >= 0):
            raise ValueError(f"speed must be >= 0 (0: as fast as possible), got {speed!r}")
        self.scene = scene
        self.real_time = bool(real_time)
        # Simulated seconds per wall second; 0 = unpaced.
        self.speed = 1.0 if self.real_time else float(speed)
        self.joint_state_period = 1.0 / joint_state_rate_hz
        self.camera_period = 1.0 / camera_rate_hz
        self.max_lag_s = float(max_lag_s)
        self._clock = clock
        # None: render in this thread. A RenderProcess: render in a child process; collected
        # asynchronously in real time, waited for in simulated time (frames never lag the clock).
        self._renderer = renderer
        self._frame_request: tuple[float, float] | None = None  # (sim time, wall time) of the frame in flight
        self._frame_overdue = False  # a slot passed while a frame was rendering
        self._callbacks = dict(step=on_step, joint_state=on_joint_state, image=on_image, episode=on_episode,
                               error=on_error)
        self._pending = _Pending()
        self._steps = 0  # physics steps since the loop started
        self._next_joint_state = 0.0
        self._next_camera = 0.0
        self._wall_ref: float | None = None
        self._sim_ref = 0.0
        self._snapshot_lock = threading.Lock()
        self._snapshot: SimSnapshot | None = None
        self._rtf_samples: collections.deque = collections.deque(maxlen=_RATE_WINDOW)
        self._frame_times: collections.deque = collections.deque(maxlen=_RATE_WINDOW)
        self._frame_latency_ms: collections.deque = collections.deque(maxlen=_RATE_WINDOW)
        self.counters = collections.Counter()
        self.last_error = ""
        self.episode = self._start_episode(scene.seed, target)

    # ---- hand-over from other threads ----------------------------------------------------------
    def command_joints(self, q) -> None:
        """Newest arm joint targets (validated by the scene when applied)."""
        with self._pending.lock:
            self._pending.joints = q

    def command_gripper(self, opening) -> None:
        with self._pending.lock:
            self._pending.gripper = opening

    def request_reset(self, seed: int | None = None, target: str | None = None, timeout: float = 10.0) -> Episode:
        """Start a new episode (next seed by default) from the loop thread; blocks until it happened."""
        done, result = threading.Event(), {}
        with self._pending.lock:
            self._pending.reset = (seed, target, done, result)
        if not done.wait(timeout):
            raise TimeoutError(f"the simulation loop did not reset within {timeout} s (is it running?)")
        if "error" in result:
            raise ValueError(result["error"])
        return result["episode"]

    # ---- loop thread -----------------------------------------------------------------------------
    @property
    def sim_time(self) -> float:
        return self._steps * self.scene.physics_dt

    def run_once(self) -> float:
        """Apply hand-overs, advance one physics step when it is due; returns seconds to wait."""
        self._apply_pending()
        if self._renderer is not None and self._renderer.ready():
            self._collect_frame()
            if self._frame_overdue:
                self._frame_overdue = False
                self._capture(self.sim_time)
        dt = self.scene.physics_dt
        if self.speed > 0:
            now = self._clock()
            if self._wall_ref is None:
                self._wall_ref, self._sim_ref = now, self.sim_time
            target = self._sim_ref + (now - self._wall_ref) * self.speed
            ahead = self.sim_time + dt - target
            if ahead > 0:
                return ahead / self.speed
            if -ahead > self.max_lag_s:  # cannot keep up: slow down instead of bursting
                self._wall_ref, self._sim_ref = now, self.sim_time
                self.counters["lag_rebases"] += 1
        self.scene.step(1)
        self._steps += 1
        t = self.sim_time
        self._emit("step", t)
        if t + 1e-9 >= self._next_joint_state:
            self._next_joint_state = _next_slot(self._next_joint_state, self.joint_state_period, t)
            snapshot = self._take_snapshot(t)
            self._rtf_samples.append((self._clock(), t))
            self._emit("joint_state", snapshot)
        if t + 1e-9 >= self._next_camera:
            self._next_camera = _next_slot(self._next_camera, self.camera_period, t)
            if self._callbacks["image"] is not None:
                self._capture(t)
        return 0.0

    def _capture(self, t: float) -> None:
        if self._renderer is None:
            start = self._clock()
            rgb = self.scene.render()
            self._frame_latency_ms.append((self._clock() - start) * 1e3)
            self._frame_times.append(self._clock())
            self._emit("image", t, rgb, self._clock() - start)
            return
        if self._frame_request is not None:  # still rendering: take this frame as soon as it is done
            self.counters["frames_late"] += 1
            self._frame_overdue = True
            return
        self._renderer.submit(self.scene.pose_state())
        self._frame_request = (t, self._clock())
        if not self.real_time:
            self._collect_frame()

    def _collect_frame(self) -> None:
        t, requested = self._frame_request
        self._frame_request = None
        try:
            rgb = self._renderer.result()
        except (ValueError, EOFError, OSError) as exc:
            self._error(f"camera frame failed: {exc}")
            return
        now = self._clock()
        self._frame_latency_ms.append((now - requested) * 1e3)
        self._frame_times.append(now)
        self._emit("image", t, rgb, now - requested)

    def _apply_pending(self) -> None:
        p = self._pending
        with p.lock:
            joints, gripper, reset = p.joints, p.gripper, p.reset
            p.joints = p.gripper = p.reset = None
        if reset is not None:
            seed, target, done, result = reset
            try:
                result["episode"] = self._start_episode(self.scene.seed + 1 if seed is None else seed, target, reset=True)
                joints = gripper = None  # commands meant for the old episode
            except ValueError as exc:
                result["error"] = str(exc)
                self._error(f"reset refused: {exc}")
            finally:
                done.set()
        if joints is not None:
            try:
                q = self.scene.validated_joint_targets(joints)
                self._check_jump(q)
                self.scene.set_joint_targets(q)
                self.counters["joint_commands"] += 1
            except ValueError as exc:
                if isinstance(exc, CommandJumpError) and self.scene.time <= EPISODE_START_GRACE_S:
                    self.counters["stale_commands_after_reset"] += 1
                else:
                    self._error(f"ignoring joint command: {exc}")
        if gripper is not None:
            try:
                self.scene.set_gripper(gripper)
                self.counters["gripper_commands"] += 1
            except ValueError as exc:
                self._error(f"ignoring gripper command: {exc}")

    def _check_jump(self, q: np.ndarray) -> None:
        """CommandJumpError when validated targets `q` are farther than max_command_jump_rad from the arm."""
        if not self.max_command_jump_rad:
            return
        measured = self.scene.get_joint_positions()
        jump = np.abs(q - measured)
        worst = int(np.argmax(jump))
        if jump[worst] > self.max_command_jump_rad:
            self.counters["jump_refusals"] += 1
            raise CommandJumpError(f"{self.scene.joint_names[worst]} target {q[worst]:.3f} rad is {jump[worst]:.3f} rad "
                                   f"from its position {measured[worst]:.3f} (max_command_jump_rad "
                                   f"{self.max_command_jump_rad})")

    def _start_episode(self, seed: int, target: str | None, reset: bool = False) -> Episode:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"episode seed must be a non-negative integer, got {seed!r}")
        target = target or target_for_seed(int(seed))
        instruction = instruction_for(target)  # validates the colour
        if reset or int(seed) != self.scene.seed:
            cubes = self.scene.reset(int(seed))
        else:  # the scene was just built with this seed
            cubes = self.scene.cube_positions()
        self.episode = Episode(int(seed), target, instruction, {c: p.copy() for c, p in cubes.items()})
        self.counters["episodes"] += 1
        self._take_snapshot(self.sim_time)
        self._emit("episode", self.episode)
        return self.episode

    def _take_snapshot(self, t: float) -> SimSnapshot:
        names, positions, velocities = self.scene.joint_state()
        tip, quat = self.scene.tip_pose()
        cubes = self.scene.cube_positions()
        target = self.episode.target
        snap = SimSnapshot(t, self.scene.time, tuple(names), positions, velocities, tip, quat, cubes,
                           target, self.scene.distance_to(target), self.scene.is_success(target))
        with self._snapshot_lock:
            self._snapshot = snap
        return snap

    def _emit(self, kind: str, *args) -> None:
        callback = self._callbacks[kind]
        if callback is not None:
            callback(*args)

    def _error(self, message: str) -> None:
        self.counters["errors"] += 1
        self.last_error = message
        self._emit("error", message)

    # ---- any thread --------------------------------------------------------------------------------
    def snapshot(self) -> SimSnapshot | None:
        with self._snapshot_lock:
            return self._snapshot

    def real_time_factor(self) -> float:
        """Simulated seconds per wall second over the recent joint-state samples (0: not enough yet)."""
        samples = list(self._rtf_samples)
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    def camera_rate_hz(self) -> float:
        """Frames per wall second over the recent frames."""
        times = list(self._frame_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def status(self) -> dict:
        snap = self.snapshot()
        latency = sorted(self._frame_latency_ms)
        status = {
            "state": "ok",
            "sim_time_s": self.sim_time,
            "real_time": self.real_time,
            "real_time_factor": self.real_time_factor(),
            "camera_hz": self.camera_rate_hz(),
            "frame_latency_ms_median": latency[len(latency) // 2] if latency else 0.0,
            "seed": self.episode.seed,
            "target": self.episode.target,
            "instruction": self.episode.instruction,
            "last_error": self.last_error,
            "counters": dict(self.counters),
        }
        if snap is not None:
            status.update(episode_time_s=snap.episode_time, distance_to_target_m=snap.distance_to_target,
                          success=snap.success, tip_position=[round(float(v), 5) for v in snap.tip_position])
        return status


def _next_slot(scheduled: float, period: float, now: float) -> float:
    """The next publication time after `now` on the grid scheduled, scheduled + period, ..."""
    nxt = scheduled + period
    if nxt <= now + 1e-9:  # fell behind (e.g. after a long render): skip ahead, do not burst
        nxt = now + period
    return nxt
