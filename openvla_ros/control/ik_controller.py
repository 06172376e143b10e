"""The decisions of ik_node without ROS: a stream of tip twists in, joint targets at a fixed rate out.

`IkController` integrates the newest twist with `ArmKinematics.step` once per control tick, from
the last *commanded* joint positions (integrating from the measured ones would feed the
controller's tracking lag back into every step and slow the arm down). The commanded positions are
seeded from the first joint state and re-seeded when the measured state drifts further than
`reseed_threshold` from them (the arm was moved by hand, blocked, or the simulation was reset).
The threshold is never below `RESEED_LAG_PERIODS` periods of motion at a joint's velocity limit:
a position-controlled arm lags its commands by a few periods at full speed, and that lag must not
re-seed (it would step the command backwards).

Whatever the measurements say, every joint target stays within the position limits and moves at
most `velocity limit x elapsed time` from the previous one: a re-seed slews the command towards
the measured joints at the velocity limit (state `reseeding`, the twist is not followed meanwhile)
instead of jumping there. Joint states are checked for plausibility before use: positions beyond
a limit by more than `JOINT_LIMIT_TOLERANCE_RAD`, or a jump from the previous reading faster than
the velocity limit allows (`PLAUSIBLE_SPEED_FACTOR` x the limit, plus `PLAUSIBLE_JUMP_SLACK_RAD`
for readings delivered in a burst), are refused: a single wrong reading is never used; a
persistent change (a reset) is accepted from its second reading on.

The arm holds (the tick returns the last commanded positions, a zero-velocity target) when:

* no twist arrived for `command_timeout` (as MoveIt Servo does), or none ever did;
* the joint states are older than `joint_state_timeout` (the arm's state is unknown; the state is
  `bad_joint_states` when readings arrive but are refused as implausible);
* the last twist was refused: NaN/inf values or a `frame_id` that is not the expected frame;
* the IK halts (singularity hard stop, or every limit cut the step to nothing).

Before the first joint state nothing is commanded at all (`IkTick.q_target is None`). Times come
from the injected `clock` (the node passes its ROS clock, so `use_sim_time` works).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .kinematics import TWIST_FRAME_BASE, ArmKinematics, IkStatus

STATE_OK = "ok"
STATE_WAITING_FOR_JOINT_STATES = "waiting_for_joint_states"
STATE_STALE_JOINT_STATES = "stale_joint_states"
STATE_NO_COMMAND = "no_command"
STATE_COMMAND_TIMEOUT = "command_timeout"
STATE_BAD_COMMAND = "bad_command"
STATE_IK_HALTED = "ik_halted"
STATE_BAD_JOINT_STATES = "bad_joint_states"
STATE_RESEEDING = "reseeding"
HOLD_STATES = (STATE_STALE_JOINT_STATES, STATE_NO_COMMAND, STATE_COMMAND_TIMEOUT, STATE_BAD_COMMAND, STATE_IK_HALTED,
               STATE_BAD_JOINT_STATES, STATE_RESEEDING)

DEFAULT_COMMAND_TIMEOUT_S = 0.1
DEFAULT_JOINT_STATE_TIMEOUT_S = 0.1
# Larger than the tracking lag of a position-controlled arm at the IK's speeds (the simulated
# Panda lags ~0.01 rad at 0.2 m/s), far smaller than anything a hand or a reset moves.
DEFAULT_RESEED_THRESHOLD_RAD = 0.05
# The re-seed threshold of a joint is at least this many periods of motion at its velocity limit
# (0.13 rad for the Panda at 100 Hz): the tracking lag of an arm at full speed stays below it.
RESEED_LAG_PERIODS = 5.0
# Measured positions beyond a position limit by more than this are implausible (refused).
JOINT_LIMIT_TOLERANCE_RAD = 0.05
# A reading may differ from the previous one by PLAUSIBLE_SPEED_FACTOR x velocity limit x elapsed
# time plus PLAUSIBLE_JUMP_SLACK_RAD (readings queued and delivered together arrive ~0 s apart).
PLAUSIBLE_SPEED_FACTOR = 2.0
PLAUSIBLE_JUMP_SLACK_RAD = 0.1
# A late tick integrates at most this many periods: after a stall the arm does not jump.
MAX_TICK_PERIODS = 2.0
_RATE_WINDOW = 200  # ticks used for the measured loop rate


@dataclass(frozen=True)
class IkTick:
    """What one control tick commands."""

    q_target: np.ndarray | None  # joint targets in `joint_names` order; None: publish nothing
    state: str
    ik_status: IkStatus | None  # of the IK step taken this tick (None: no step)
    dt: float  # seconds integrated this tick (0 when holding)
    time: float | None = None  # clock time of the tick: the instant the targets are for

    @property
    def holding(self) -> bool:
        return self.state != STATE_OK


class IkController:
    """Twist stream -> joint targets for one arm; thread-safe, clock injected."""

    def __init__(
        self,
        kinematics: ArmKinematics,
        *,
        rate_hz: float,
        clock: Callable[[], float],
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
        joint_state_timeout: float = DEFAULT_JOINT_STATE_TIMEOUT_S,
        reseed_threshold: float = DEFAULT_RESEED_THRESHOLD_RAD,
    ):
        if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
            raise ValueError(f"rate_hz must be a positive number, got {rate_hz!r}")
        self.kinematics = kinematics
        self.period = 1.0 / float(rate_hz)
        self._clock = clock
        self._lock = threading.Lock()
        self.command_timeout = command_timeout
        self.joint_state_timeout = joint_state_timeout
        self.reseed_threshold = reseed_threshold
        self.twist_frame = kinematics.twist_frame
        self.expected_frame = kinematics.base_frame if self.twist_frame == TWIST_FRAME_BASE else kinematics.tip_frame
        self._index = {name: i for i, name in enumerate(kinematics.joint_names)}

        self._lower = np.asarray(kinematics.position_lower, dtype=float)
        self._upper = np.asarray(kinematics.position_upper, dtype=float)
        self._velocity = np.asarray(kinematics.velocity_limits, dtype=float)
        self._q_measured: np.ndarray | None = None
        self._joint_state_time: float | None = None
        self._q_received: np.ndarray | None = None  # newest reading, plausible or not
        self._received_time: float | None = None
        self._joint_state_refused: str | None = None  # why the newest reading was refused
        self._reseeding = False
        self._q_command: np.ndarray | None = None
        self._twist: np.ndarray | None = None
        self._twist_time: float | None = None
        self._refused: str | None = None  # reason the newest twist was refused (holding until a good one)
        self._last_tick: float | None = None
        self._tick_times: collections.deque = collections.deque(maxlen=_RATE_WINDOW)
        self._last: IkTick | None = None
        self._last_result = None
        self.last_error = ""
        self.counters = collections.Counter()

    # ---- settings (validated: runtime-settable parameters land here) -----------------------
    @property
    def command_timeout(self) -> float:
        return self._command_timeout

    @command_timeout.setter
    def command_timeout(self, value: float) -> None:
        self._command_timeout = _positive("command_timeout", value)

    @property
    def joint_state_timeout(self) -> float:
        return self._joint_state_timeout

    @joint_state_timeout.setter
    def joint_state_timeout(self, value: float) -> None:
        self._joint_state_timeout = _positive("joint_state_timeout", value)

    @property
    def reseed_threshold(self) -> float:
        return self._reseed_threshold

    @reseed_threshold.setter
    def reseed_threshold(self, value: float) -> None:
        self._reseed_threshold = _positive("reseed_threshold", value)

    @property
    def reseed_thresholds(self) -> np.ndarray:
        """Per joint: the configured threshold, raised to RESEED_LAG_PERIODS periods at the velocity limit."""
        return np.maximum(self._reseed_threshold, RESEED_LAG_PERIODS * self._velocity * self.period)

    @property
    def joint_names(self) -> tuple[str, ...]:
        return self.kinematics.joint_names

    # ---- inputs -----------------------------------------------------------------------------
    def on_joint_state(self, names: Sequence[str], positions: Sequence[float]) -> None:
        """A measured joint state (any order, extra joints allowed). Raises ValueError when unusable
        or implausible (see the module docstring); the reading is not used then."""
        try:
            q = self._arm_positions(names, positions)
        except ValueError as exc:
            with self._lock:
                self.counters["bad_joint_states"] += 1
                self.last_error = self._joint_state_refused = str(exc)
            raise
        with self._lock:
            now = self._clock()
            why = self._beyond_limits(q)
            if why is None:  # a reading within the limits is what the next one is compared with
                previous, previous_time = self._q_received, self._received_time
                self._q_received, self._received_time = q, now
                why = self._jumped(q, previous, None if previous_time is None else now - previous_time)
            if why is not None:
                self.counters["implausible_joint_states"] += 1
                self.last_error = self._joint_state_refused = why
                raise ValueError(why)
            self._q_measured = q
            self._joint_state_time = now
            self._joint_state_refused = None
            self.counters["joint_states"] += 1

    def _beyond_limits(self, q: np.ndarray) -> str | None:
        below = self._lower - JOINT_LIMIT_TOLERANCE_RAD - q
        above = q - self._upper - JOINT_LIMIT_TOLERANCE_RAD
        beyond = np.maximum(below, above)
        if np.any(beyond > 0):
            j = int(np.argmax(beyond))
            return (f"implausible joint state: {self.joint_names[j]} measured at {q[j]:.6g} rad, beyond its limits "
                    f"[{self._lower[j]:.4g}, {self._upper[j]:.4g}] (tolerance {JOINT_LIMIT_TOLERANCE_RAD} rad): refused")
        return None

    def _jumped(self, q: np.ndarray, previous: np.ndarray | None, elapsed: float | None) -> str | None:
        if previous is not None:
            allowed = PLAUSIBLE_SPEED_FACTOR * self._velocity * max(elapsed, 0.0) + PLAUSIBLE_JUMP_SLACK_RAD
            excess = np.abs(q - previous) - allowed
            if np.any(excess > 0):
                j = int(np.argmax(excess))
                return (f"implausible joint state: {self.joint_names[j]} jumped {abs(q[j] - previous[j]):.4g} rad "
                        f"({previous[j]:.4g} -> {q[j]:.4g}) in {max(elapsed, 0.0):.3f} s, more than its velocity "
                        f"limit {self._velocity[j]:.3g} rad/s allows: refused (a reading that persists is "
                        f"accepted)")
        return None

    def _arm_positions(self, names, positions) -> np.ndarray:
        if not list(names):
            raise ValueError("joint state has no joint names")
        return order_joint_positions(names, positions, self.joint_names)

    def on_twist(self, frame_id: str, twist: Sequence[float]) -> None:
        """A commanded tip twist [vx vy vz wx wy wz] (m/s, rad/s) in `frame_id`.

        A refused twist (wrong frame, NaN/inf, wrong size) raises ValueError and makes the arm hold
        until the next good one: continuing the previous twist would keep moving on stale intent.
        """
        now = self._clock()
        try:
            if frame_id != self.expected_frame:
                raise ValueError(
                    f"twist frame_id {frame_id!r} is not the {self.twist_frame} frame {self.expected_frame!r}: refused "
                    f"(publish twists in {self.expected_frame!r} or change ik_node's "
                    f"{'base_frame' if self.twist_frame == TWIST_FRAME_BASE else 'tip_frame'}/twist_frame)")
            v = np.asarray(twist, dtype=float)
            if v.shape != (6,):
                raise ValueError(f"twist must have 6 components, got shape {v.shape}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"twist must be finite, got {v.tolist()}: holding")
        except (TypeError, ValueError) as exc:
            with self._lock:
                self._refused = str(exc)
                self._twist = None
                self.counters["bad_twists"] += 1
                self.last_error = str(exc)
            raise ValueError(str(exc)) from None
        with self._lock:
            self._twist, self._twist_time, self._refused = v, now, None
            self.counters["twists"] += 1

    def on_gripper(self, value) -> float:
        """A gripper command to forward; must be a finite number (ValueError otherwise)."""
        try:
            g = float(value)
        except (TypeError, ValueError):
            g = math.nan
        if not math.isfinite(g):
            with self._lock:
                self.counters["bad_gripper_commands"] += 1
                self.last_error = f"gripper command must be a finite number, got {value!r}"
            raise ValueError(self.last_error)
        with self._lock:
            self.counters["gripper_commands"] += 1
        return g

    # ---- the control tick ---------------------------------------------------------------------
    def tick(self) -> IkTick:
        """Joint targets for now. Call once per period (the period is measured, not assumed)."""
        with self._lock:
            now = self._clock()
            dt = self.period if self._last_tick is None else now - self._last_tick
            self._last_tick = now
            self._tick_times.append(now)
            dt = min(max(dt, 0.0), MAX_TICK_PERIODS * self.period)
            previous = self._last.q_target if self._last is not None else None
            out = self._decide(now, dt)
            out = dataclasses.replace(self._within_limits(out, previous, dt), time=now)
            self._last = out
            self.counters["ticks"] += 1
            if out.holding:
                self.counters["hold_ticks"] += 1
            return out

    def _within_limits(self, out: IkTick, previous: np.ndarray | None, dt: float) -> IkTick:
        """The last guard before the arm: targets inside the position limits, and no further from the
        previous target than the velocity limits allow in `dt` (the IK step and the re-seed slew
        already keep both; this makes it hold whatever path produced the target)."""
        if out.q_target is None:
            return out
        q = np.clip(out.q_target, self._lower, self._upper)
        if previous is not None:
            reach = self._velocity * dt
            q = np.clip(q, previous - reach, previous + reach)
        if np.array_equal(q, out.q_target):
            return out
        self.counters["limited_commands"] += 1
        self._q_command = q.copy()
        return IkTick(q, out.state, out.ik_status, out.dt)

    def _hold(self, state: str) -> IkTick:
        q = None if self._q_command is None else self._q_command.copy()
        return IkTick(q, state, None, 0.0)

    def _decide(self, now: float, dt: float) -> IkTick:
        if self._q_measured is None:
            return IkTick(None, STATE_WAITING_FOR_JOINT_STATES, None, 0.0)
        if now - self._joint_state_time > self.joint_state_timeout:
            return self._hold(STATE_BAD_JOINT_STATES if self._joint_state_refused else STATE_STALE_JOINT_STATES)
        target = np.clip(self._q_measured, self._lower, self._upper)
        if self._q_command is None:
            self._q_command = target  # the first target: where the arm is (inside its limits)
        elif self._reseeding or np.any(np.abs(target - self._q_command) > self.reseed_thresholds):
            if not self._reseeding:
                self._reseeding = True
                self.counters["reseeds"] += 1
            reach = self._velocity * dt
            self._q_command = self._q_command + np.clip(target - self._q_command, -reach, reach)
            self._reseeding = not np.allclose(self._q_command, target, rtol=0.0, atol=1e-9)
            return IkTick(self._q_command.copy(), STATE_RESEEDING, None, 0.0)
        if self._refused is not None:
            return self._hold(STATE_BAD_COMMAND)
        if self._twist is None:
            return self._hold(STATE_NO_COMMAND)
        if now - self._twist_time > self.command_timeout:
            return self._hold(STATE_COMMAND_TIMEOUT)
        if dt <= 0.0:
            return IkTick(self._q_command.copy(), STATE_OK, None, 0.0)
        result = self.kinematics.step(self._q_command, self._twist, dt)
        self._last_result = result
        self.counters[f"ik_{result.status.name.lower()}"] += 1
        if result.status.halts or (result.halted and np.any(self._twist)):
            return IkTick(self._q_command.copy(), STATE_IK_HALTED, result.status, 0.0)
        self._q_command = result.q_next
        return IkTick(self._q_command.copy(), STATE_OK, result.status, dt)

    # ---- status -------------------------------------------------------------------------------
    def loop_rate_hz(self) -> float:
        with self._lock:
            times = list(self._tick_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def status(self) -> dict:
        rate = self.loop_rate_hz()
        with self._lock:
            now = self._clock()
            last, result = self._last, self._last_result
            status = {
                "state": last.state if last is not None else STATE_WAITING_FOR_JOINT_STATES,
                "loop_hz": rate,
                "twist_age_s": now - self._twist_time if self._twist_time is not None else -1.0,
                "joint_state_age_s": now - self._joint_state_time if self._joint_state_time is not None else -1.0,
                "expected_frame": self.expected_frame,
                "reseed_threshold_rad": [round(float(v), 6) for v in self.reseed_thresholds],
                "last_error": self.last_error,
                "counters": dict(self.counters),
            }
            if result is not None:
                status.update(ik_status=result.status.name, ik_scale=result.scale,
                              condition_number=result.condition_number, manipulability=result.manipulability)
            if self._q_command is not None:
                status["q_command"] = [round(float(v), 6) for v in self._q_command]
            return status


def order_joint_positions(names: Sequence[str], positions: Sequence[float], joint_names: Sequence[str]) -> np.ndarray:
    """`positions` of the joints `joint_names`, picked by `names` (any order, extra joints ignored).

    Empty `names` means the positions are already in `joint_names` order (Float64MultiArray, or a
    JointState without names); then their number must match. Raises ValueError naming what is wrong.
    """
    names = [str(n) for n in names]
    try:
        values = np.asarray(list(positions), dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"joint positions must be numbers, got {positions!r}") from exc
    if not names:
        if values.shape != (len(joint_names),):
            raise ValueError(f"expected {len(joint_names)} joint positions {list(joint_names)}, got {values.size}")
        q = values
    else:
        if len(names) != values.size:
            raise ValueError(f"{len(names)} joint names but {values.size} positions")
        missing = [j for j in joint_names if j not in names]
        if missing:
            raise ValueError(f"joints {missing} missing (got {names})")
        where = {n: i for i, n in enumerate(names)}
        q = values[[where[j] for j in joint_names]]
    if not np.all(np.isfinite(q)):
        raise ValueError(f"joint positions must be finite, got {q.tolist()}")
    return q


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return v


def resolve_urdf_source(urdf_path: str, robot_description: str, use_sim_urdf: bool) -> str | None:
    """Which URDF ik_node loads: `urdf_path`, else the `robot_description` XML, else (only when
    `use_sim_urdf`) the simulated Panda's. None: nothing configured (wait for /robot_description).

    Never guesses a model for a real arm: the simulated URDF is only used when asked for.
    """
    if urdf_path:
        return urdf_path
    if robot_description and robot_description.strip():
        return robot_description
    if use_sim_urdf:
        from ..sim.scene import panda_urdf_path  # pybullet_data ships the simulated Panda

        return panda_urdf_path()
    return None
