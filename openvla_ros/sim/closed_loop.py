"""Closed-loop episodes of a chunk policy in simulated time: source -> ChunkBuffer -> diff-IK -> scene.

The same chain vla_node and ik_node run on a robot, in one process and on a simulated clock, so the
model's inference latency is a parameter rather than an accident of the machine: a chunk asked for
at a frame reaches the buffer ``latency`` later (the measured wall time of the call, a fixed value,
or draws from measured latencies), and the arm keeps executing the timeline meanwhile.

How chunks are executed (`closed_loop_episode` keywords, the strategies of the latency sweep):

* ``blend_policy`` and ``execution`` are the chunk buffer's (replace | crossfade | ensemble;
  timeline | arrival | auto), ``arrival_hold_s`` its hold of the last action.
* ``sync``: the arm waits while the model thinks, then executes the whole chunk, then the next
  frame is taken (what a deploy.py client does).
* ``forced_prefix``: each frame is decoded with the actions the arm executes before its chunk can
  arrive (the buffer's plan over `committed_steps` of the p95 latency so far) forced as the
  chunk's first tokens (real-time chunking for token models; the source's engine must support it).

Each episode reports success as `run_episode` does, plus what the smoothness of the motion is
judged by: the commanded tip's path length and jerk (RMS of the third difference of the tip of
the commanded joint positions, every control tick), the largest step of the commanded linear
velocity when the chunk being played changes, and the share of ticks with a moving command.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from openvla_ros.control.chunk_buffer import (
    EXECUTION_ARRIVAL, EXECUTION_TIMELINE, POLICY_REPLACE, STATE_UNDERRUN, ChunkBuffer,
)
from openvla_ros.control.vla_controller import committed_steps
from openvla_ros.engines.base import ActionChunk, supports_forced_prefix
from openvla_ros.sim.scene import DEFAULT_PHYSICS_HZ, SUCCESS_RADIUS_M, PandaScene, target_from_instruction
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES, DEFAULT_CONTROL_PERIOD_S


@dataclass
class ClosedLoopEpisode:
    policy: str
    seed: int
    target: str  # the cube the instruction names
    instruction: str
    success: bool
    reached_other: bool  # the tip came within the success radius of the other cube
    time_to_success_s: float | None
    min_distance_m: float
    final_distance_m: float
    calls: int  # policy (model) calls
    latencies_ms: list[float]
    ticks: int
    underrun_ticks: int  # ticks with nothing to play
    steady_underrun_ticks: int  # ... after the first chunk arrived
    ik_statuses: dict
    tip_path: list  # (x, y, z) at each control period boundary
    path_length_m: float = 0.0  # commanded tip, summed over control ticks
    jerk_rms: float = 0.0  # m/s^3, RMS third derivative of the commanded tip
    max_switch_jump: float = 0.0  # m/s, largest linear-velocity step where the playing chunk changes
    moving_fraction: float = 0.0  # ticks with a non-zero command, from the first arrival on

    def brief(self) -> dict:
        out = asdict(self)
        out.pop("latencies_ms")
        return out


class ChunkSource:
    """A policy for the closed loop: (scene, image or None, instruction, stamp) -> ActionChunk."""

    needs_image = False
    timed = False  # whether its wall time is the chunk's latency (model calls)
    supports_forced_prefix = False

    def __call__(self, scene, image, instruction: str, stamp: float, forced_prefix=None) -> ActionChunk:
        raise NotImplementedError


class EngineSource(ChunkSource):
    """The trained model; `blank_image` feeds it a constant grey frame instead (image-blind baseline).

    `first_action_only` keeps the first action of each chunk: a one-action model (as the released
    OpenVLA) made of the same network, for comparing chunk geometries on one set of weights.
    """

    timed = True

    def __init__(self, engine, blank_image: bool = False, first_action_only: bool = False):
        self.engine = engine
        self.blank_image = blank_image
        self.first_action_only = first_action_only
        self.needs_image = not blank_image
        self.supports_forced_prefix = supports_forced_prefix(engine) and not first_action_only
        self._blank = np.full((224, 224, 3), 128, dtype=np.uint8)

    @property
    def chunk_len(self) -> int:
        return 1 if self.first_action_only else int(self.engine.chunk_len)

    def __call__(self, scene, image, instruction, stamp, forced_prefix=None):
        extra = {} if forced_prefix is None or len(forced_prefix) == 0 else {"forced_prefix": forced_prefix}
        chunk = self.engine.predict(self._blank if self.blank_image else image, instruction, stamp=stamp, **extra)
        if self.first_action_only:
            chunk = ActionChunk(actions=chunk.actions[:1], dim_names=chunk.dim_names, dt=chunk.dt, stamp=chunk.stamp,
                                timings_ms=chunk.timings_ms, unnorm_key=chunk.unnorm_key)
        return chunk


class ExpertSource(ChunkSource):
    """The scripted expert (true simulator state) or, with `aim`, a reach towards a fixed point."""

    def __init__(self, aim: np.ndarray | None = None):
        from openvla_ros.sim.expert import ReachExpert

        self.expert = ReachExpert()
        self.aim = None if aim is None else np.asarray(aim, dtype=float)

    def __call__(self, scene, image, instruction, stamp, forced_prefix=None):
        goal = self.aim if self.aim is not None else scene.cube_position(target_from_instruction(instruction))
        action = self.expert.action(scene.tip_position(), goal)
        return ActionChunk(actions=action[None, :], dim_names=list(DEFAULT_ACTION_DIM_NAMES),
                           dt=self.expert.control_period_s, stamp=stamp)


def mean_cube_position(scene) -> np.ndarray:
    (x0, y0), (x1, y1) = scene.cube_region
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, scene.cube_size / 2])


def closed_loop_scene(seed: int, control_rate_hz: float) -> PandaScene:
    """A scene whose physics step divides the control period (about the scene's default 240 Hz)."""
    per_tick = max(1, math.ceil(DEFAULT_PHYSICS_HZ / control_rate_hz))
    return PandaScene(seed, physics_dt=1.0 / (control_rate_hz * per_tick))


def _jerk_rms(tips: list, period: float) -> float:
    if len(tips) < 4:
        return 0.0
    third = np.diff(np.asarray(tips), n=3, axis=0) / period ** 3
    return float(np.sqrt(np.mean(np.sum(third ** 2, axis=1))))


def closed_loop_episode(scene, kinematics, source: ChunkSource, target: str, instruction: str, *,
                        policy: str = "", seed: int = 0, max_seconds: float = 8.0, control_rate_hz: float = 100.0,
                        replan_period_s: float = DEFAULT_CONTROL_PERIOD_S, sim_latency_s: float | None = None,
                        latency_sampler: Callable[[], float] | None = None,
                        check_period_s: float = DEFAULT_CONTROL_PERIOD_S, blend_policy: str = POLICY_REPLACE,
                        execution: str = EXECUTION_TIMELINE, arrival_hold_s: float = 1.0, sync: bool = False,
                        forced_prefix: bool = False, clock: Callable[[], float] = time.perf_counter,
                        on_check_period: Callable[[object, np.ndarray], None] | None = None) -> ClosedLoopEpisode:
    """Run `source` from the scene's current state in simulated time (see the module docstring).

    Every tick of 1/control_rate_hz: deliver a chunk whose latency has elapsed to the buffer, ask
    the source for a new chunk when a replan is due and none is in flight (``replan_period_s = 0``:
    back to back), sample the buffer over the tick, integrate the twist with the IK and step the
    physics. The latency of a model call is ``latency_sampler()`` when given, else ``sim_latency_s``,
    else the call's measured wall time. Success (as in `run_episode`) is checked at every
    `check_period_s` boundary. `on_check_period(scene, frame)` is called at the start of every
    check period with the frame rendered there (which a replan due on the same tick reuses).
    """
    if forced_prefix and not source.supports_forced_prefix:
        raise ValueError(f"forced_prefix needs a source whose engine decodes with a forced prefix, got {source!r}")
    period = 1.0 / control_rate_hz
    physics_per_tick = round(period / scene.physics_dt)
    if physics_per_tick < 1 or not math.isclose(physics_per_tick * scene.physics_dt, period, rel_tol=1e-6):
        raise ValueError(f"control period {period} s is not a whole multiple of the physics step {scene.physics_dt} s")
    check_every = round(check_period_s / period)
    if check_every < 1 or not math.isclose(check_every * period, check_period_s, rel_tol=1e-6):
        raise ValueError(f"check_period_s {check_period_s} is not a whole multiple of the control period {period}")
    now = [0.0]
    if sync:  # the whole chunk plays from its arrival, and nothing moves while the next is computed
        execution, arrival_hold_s = EXECUTION_ARRIVAL, 0.0
    buffer = ChunkBuffer(policy=blend_policy, clock=lambda: now[0], control_period_s=period, initial_gripper=1.0,
                         execution=execution, arrival_hold_s=arrival_hold_s)
    epoch = buffer.epoch
    other = next(c for c in scene.cube_colours if c != target)
    q_cmd = scene.get_joint_positions()
    pending = None  # (arrival time, chunk)
    next_request = 0.0
    statuses: Counter = Counter()
    latencies: list[float] = []
    sim_latencies: list[float] = []  # what the loop waited for each chunk (the forced prefix's estimate)
    calls = underruns = steady_underruns = moving_ticks = 0
    first_arrival = None
    min_dist = scene.distance_to(target)
    reached_other = scene.distance_to(other) <= SUCCESS_RADIUS_M
    success, time_to_success = False, None
    path = [scene.tip_position().tolist()]
    tips = [kinematics.tip_pose(q_cmd).position]
    path_length = max_jump = 0.0
    last_linear, last_stamp = None, None
    n_ticks = int(math.floor(max_seconds / period + 1e-9))
    tick = 0
    for tick in range(1, n_ticks + 1):
        t = now[0] = (tick - 1) * period
        frame = None
        if on_check_period is not None and (tick - 1) % check_every == 0:
            frame = scene.render()
            on_check_period(scene, frame)
        if pending is not None and pending[0] <= t + 1e-9:
            buffer.push(pending[1], epoch)
            first_arrival = t if first_arrival is None else first_arrival
            pending = None
        due = pending is None and t >= next_request - 1e-9
        if sync:
            due = due and buffer.depth_s(t) <= 1e-9
        if due:
            image = (scene.render() if frame is None else frame) if source.needs_image else None
            prefix = None
            if forced_prefix:
                p95 = float(np.percentile(sim_latencies, 95)) if sim_latencies else None
                steps = committed_steps(p95, source.chunk_len, source.engine.dt)
                prefix = buffer.planned_actions(t, steps, source.engine.dt, source.engine.dim_names) if steps else None
            start = clock()
            chunk = source(scene, image, instruction, t, forced_prefix=prefix)
            elapsed = clock() - start
            calls += 1
            if source.timed:
                latencies.append(elapsed * 1e3)
                if latency_sampler is not None:
                    latency = float(latency_sampler())
                else:
                    latency = elapsed if sim_latency_s is None else sim_latency_s
                sim_latencies.append(latency)
            else:
                latency = 0.0
            next_request = t + replan_period_s
            if latency <= 0:
                buffer.push(chunk, epoch)
                first_arrival = t if first_arrival is None else first_arrival
            else:
                pending = (t + latency, chunk)
        command = buffer.sample(t, period=period)
        if command.state == STATE_UNDERRUN:
            underruns += 1
            if first_arrival is not None:
                steady_underruns += 1
        if first_arrival is not None and not command.is_zero:
            moving_ticks += 1
        if last_stamp is not None and command.chunk_stamp is not None and command.chunk_stamp != last_stamp:
            max_jump = max(max_jump, float(np.linalg.norm(command.linear - last_linear)))
        last_linear = command.linear
        last_stamp = command.chunk_stamp if command.chunk_stamp is not None else last_stamp
        twist = np.concatenate([command.linear, command.angular])
        if command.gripper is not None and math.isfinite(command.gripper):
            scene.set_gripper(float(np.clip(command.gripper, 0.0, 1.0)))
        result = kinematics.step(q_cmd, twist, period)
        statuses[result.status.name] += 1
        q_cmd = result.q_next
        tip = kinematics.tip_pose(q_cmd).position
        path_length += float(np.linalg.norm(tip - tips[-1]))
        tips.append(tip)
        scene.set_joint_targets(q_cmd)
        scene.step(physics_per_tick)
        if tick % check_every == 0:
            path.append(scene.tip_position().tolist())
            dist = scene.distance_to(target)
            min_dist = min(min_dist, dist)
            reached_other = reached_other or scene.distance_to(other) <= SUCCESS_RADIUS_M
            if dist <= SUCCESS_RADIUS_M:
                success, time_to_success = True, tick * period
                break
    steady_ticks = tick - (0 if first_arrival is None else int(round(first_arrival / period)))
    return ClosedLoopEpisode(
        policy=policy, seed=seed, target=target, instruction=instruction, success=success,
        reached_other=bool(reached_other), time_to_success_s=time_to_success, min_distance_m=float(min_dist),
        final_distance_m=float(scene.distance_to(target)), calls=calls, latencies_ms=latencies, ticks=tick,
        underrun_ticks=underruns, steady_underrun_ticks=steady_underruns, ik_statuses=dict(statuses), tip_path=path,
        path_length_m=path_length, jerk_rms=_jerk_rms(tips, period), max_switch_jump=max_jump,
        moving_fraction=moving_ticks / max(steady_ticks, 1))
