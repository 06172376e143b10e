"""The action timeline between the model (~5 Hz chunks of deltas) and the control loop (~100 Hz twists).

Timeline. Action ``i`` of a chunk stamped ``t0`` (the observation time) covers
``[t0 + i*dt, t0 + (i+1)*dt)``. Over that interval it plays as a constant twist: linear velocity
``delta_xyz / dt`` (m/s) and angular velocity ``rotvec(R_delta) / dt`` (rad/s), where ``R_delta``
is the action's roll/pitch/yaw delta as a matrix (see `rotations` for the frame convention: base
frame, ``R_next = R_delta @ R``). The gripper is an absolute target, not a delta; it is held
through underruns and resets. Dimensions other than the mapped ones are reported as absolute
values in `ControlCommand.extras`.

Exact integration at any control rate. A controller ticking at period ``p`` asks for the command
of the interval it is about to execute, ``sample(now, period=p)`` (or ``sample_interval(a, b)``).
The answer is the constant twist whose integral over ``b - a`` equals the timeline's motion over
``[a, b)``: the mean linear velocity, and the angular velocity ``log(R_k ... R_1) / (b - a)``
composed from the pieces of the timeline inside the interval (later pieces on the left). So a
controller that applies each command for its period (``p += v*tau``, ``R = exp(omega*tau) @ R``)
reproduces every delta exactly, including ticks that straddle the boundary between two actions and
ticks of any length. Each instant of the timeline is paid out once per interval sampled, never a
delta per tick. (``sample(now)`` without a period gives the instantaneous twist, which is exact only
when ticks never straddle action boundaries.)

Latency and execution. A chunk is pushed ``latency`` after its stamp. Two ways to place it:

* ``timeline`` (latency-compensated): action ``i`` covers ``[stamp + i*dt, stamp + (i+1)*dt)`` as
  above; the part before the arrival time is already past and dropped (the current action plays
  only its remaining fraction). Right when the chunk is long enough that its future still covers
  the time until the next chunk lands.
* ``arrival`` (latency-holding): the chunk's timeline is shifted by its measured latency, so action
  ``i`` covers ``[arrival + i*dt, arrival + (i+1)*dt)``: the predicted motion is executed whole,
  late, instead of discarded. When the chunk ends before the next one arrives, its last action's
  velocity continues for up to ``arrival_hold_s`` (a gap between back-to-back answers would
  otherwise stop the arm on every answer); a newer chunk cuts the hold at its arrival, and each
  instant is still paid out once, so no delta is replayed. This is what a one-action model
  (the released OpenVLA: K = 1, dt = 0.2 s) answering after 0.2 s or more needs to move at all.
* ``auto`` decides per chunk: ``timeline`` when the chunk spans ``K*dt >= AUTO_COVERAGE_MARGIN *
  p95(needed)``, where ``needed`` is the time a chunk must cover, from its observation until the
  next chunk arrives (measured at each push as ``arrival - previous chunk's stamp``; before two
  chunks have arrived, twice this chunk's latency); ``arrival`` otherwise.

Whatever the execution, nothing of a chunk plays more than ``max_chunk_age_s`` after its
observation.

Overlap policies, for chunks in arrival order:

* ``replace``: from the new chunk's effective start on, only the new chunk counts; the old plan's
  future is discarded (after the new chunk ends the timeline underruns rather than falling back
  to an older, staler plan).
* ``crossfade``: like replace, but over ``crossfade_window_s`` after the new chunk's start the
  *velocities* (and gripper target) are blended linearly, ``(1 - a) * old + a * new`` with ``a``
  rising from 0 to 1. Blending velocities rather than deltas or poses keeps each source's
  contribution an ordinary twist; the linear part integrates exactly. Within a blend window the
  angular velocity's direction changes continuously, and the rotation of a piece is taken as
  ``exp(integral of omega)`` (exact when the blended axes are parallel; otherwise off by a
  second-order commutator term, well below 1e-4 rad for per-step rotations of a few degrees).
  If the old timeline has nothing at a time, the new chunk plays alone.
* ``ensemble``: ACT-style temporal ensembling. Every stored prediction covering the time
  contributes its velocity (and gripper target) with weight ``exp(-ensemble_decay * i)``, where
  ``i`` is its age order among those predictions, ``i = 0`` being the OLDEST (as in ACT: with a
  positive decay the oldest prediction weighs most and new observations are incorporated
  gradually; a negative decay favours the newest).

Chunks whose observation is older than ``max_chunk_age_s`` are rejected on arrival, and the
part of any chunk lying more than ``max_chunk_age_s`` after its stamp is never played.

Epochs. `reset()` (new instruction, stop, disable) flushes the timeline and increments the epoch;
a chunk pushed with the epoch of its observation is discarded when that epoch is no longer current,
so a chunk still being computed for the old state can never move the arm. `stop()` additionally
makes the buffer refuse chunks and return zero twists until `resume()`.

Times (chunk stamps, ``now``) must all be on the injected clock's timeline. The buffer is
thread-safe: the inference thread pushes while the control timer samples.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from openvla_ros.control.rotations import matrix_to_rotvec, matrix_to_rpy, rotvec_to_matrix, rpy_to_matrix
from openvla_ros.engines.base import ActionChunk
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES

POLICY_REPLACE = "replace"
POLICY_CROSSFADE = "crossfade"
POLICY_ENSEMBLE = "ensemble"
POLICIES = (POLICY_REPLACE, POLICY_CROSSFADE, POLICY_ENSEMBLE)

EXECUTION_TIMELINE = "timeline"
EXECUTION_ARRIVAL = "arrival"
EXECUTION_AUTO = "auto"
EXECUTIONS = (EXECUTION_AUTO, EXECUTION_TIMELINE, EXECUTION_ARRIVAL)
# auto keeps the latency-compensated timeline only while chunks span this much more than the time
# they must cover (jitter headroom); below it, chunks are executed from their arrival.
AUTO_COVERAGE_MARGIN = 1.2
# Pushes remembered for the p95 of the time a chunk must cover.
COVERAGE_WINDOW = 20

STATE_OK = "ok"
STATE_UNDERRUN = "underrun"
STATE_STOPPED = "stopped"

ROTATION_RPY = "rpy"
ROTATION_ROTVEC = "rotvec"
ROTATION_FORMATS = (ROTATION_RPY, ROTATION_ROTVEC)

# Push rejection reasons (keys of status()["rejected_by_reason"]).
REJECT_STOPPED = "stopped"
REJECT_STALE_EPOCH = "stale_epoch"
REJECT_NON_FINITE = "non_finite"
REJECT_BAD_STAMP = "bad_stamp"
REJECT_MISSING_DIMS = "missing_dims"
REJECT_TOO_OLD = "too_old"
REJECT_FUTURE = "future_stamp"
REJECT_OUT_OF_ORDER = "out_of_order"
REJECT_EXPIRED = "expired"

# Entries stay stored this long after they stop mattering, so a control tick that read the clock
# just before a push still sees the timeline it expected.
_PRUNE_LAG_S = 1.0
# Pieces shorter than this (seconds) are rounding residue between coincident breakpoints.
_MIN_PIECE_S = 1e-12
# 3-point Gauss-Legendre nodes/weights on [0, 1]: exact for the polynomial (in time) velocities
# that nested crossfade windows produce, up to degree 5.
_GAUSS_NODES = (0.5 - math.sqrt(15.0) / 10.0, 0.5, 0.5 + math.sqrt(15.0) / 10.0)
_GAUSS_WEIGHTS = (5.0 / 18.0, 8.0 / 18.0, 5.0 / 18.0)


@dataclass(frozen=True)
class ActionMapping:
    """Which named action dimensions are position deltas, rotation deltas and the gripper."""

    position: tuple[str, str, str] = tuple(DEFAULT_ACTION_DIM_NAMES[0:3])
    rotation: tuple[str, str, str] = tuple(DEFAULT_ACTION_DIM_NAMES[3:6])
    gripper: str | None = DEFAULT_ACTION_DIM_NAMES[6]
    rotation_format: str = ROTATION_RPY  # "rpy" (extrinsic XYZ, the released model) or "rotvec"

    def __post_init__(self):
        if len(self.position) != 3 or len(self.rotation) != 3:
            raise ValueError(f"position and rotation need 3 names each, got {self.position} and {self.rotation}")
        if self.rotation_format not in ROTATION_FORMATS:
            raise ValueError(f"rotation_format must be one of {ROTATION_FORMATS}, got {self.rotation_format!r}")
        names = list(self.position) + list(self.rotation) + ([self.gripper] if self.gripper else [])
        if len(set(names)) != len(names):
            raise ValueError(f"action mapping names must be distinct, got {names}")

    @property
    def required(self) -> list[str]:
        return list(self.position) + list(self.rotation) + ([self.gripper] if self.gripper else [])


@dataclass
class ControlCommand:
    """What the control loop executes over ``[t_start, t_end)`` (an instant when they are equal)."""

    linear: np.ndarray  # (3,) m/s, base frame
    angular: np.ndarray  # (3,) rad/s, base frame
    gripper: float | None  # absolute target in action units; None before any target is known
    state: str  # ok | underrun | stopped
    t_start: float
    t_end: float
    coverage: float  # fraction of the interval the timeline covered (1 or 0 for an instant)
    epoch: int
    chunk_stamp: float | None = None  # stamp of the newest chunk contributing
    action_index: int | None = None  # index of the contributing action in that chunk
    sources: int = 0  # chunks contributing at the last covered instant
    extras: dict[str, float] = field(default_factory=dict)  # unmapped dims, absolute values

    @property
    def duration(self) -> float:
        return self.t_end - self.t_start

    @property
    def is_zero(self) -> bool:
        return not (np.any(self.linear) or np.any(self.angular))


@dataclass(frozen=True)
class PushResult:
    """Outcome of `ChunkBuffer.push`; truthy when the chunk was accepted."""

    accepted: bool
    reason: str  # "accepted" or one of the REJECT_* reasons
    detail: str = ""
    trimmed_s: float = 0.0  # seconds of the chunk already in the past on arrival
    execution: str | None = None  # how an accepted chunk is placed: timeline | arrival

    def __bool__(self) -> bool:
        return self.accepted


@dataclass
class _Entry:
    """A chunk converted to per-action velocities, placed on the timeline."""

    seq: int
    stamp: float
    dt: float
    linear: np.ndarray  # (K, 3) m/s
    angular: np.ndarray  # (K, 3) rad/s
    gripper: np.ndarray | None  # (K,)
    extras: np.ndarray  # (K, E)
    origin: float  # where action 0 starts: the stamp (timeline) or the arrival (arrival execution)
    start: float  # max(origin, arrival): earlier parts were already past
    end: float  # min(origin + K*dt, stamp + max_age): the end of the plan
    hold_end: float  # the last action's velocity continues until here (== end unless holding)
    execution: str

    def index_at(self, t: float) -> int:
        k = self.linear.shape[0]
        return min(k - 1, max(0, int(math.floor((t - self.origin) / self.dt))))

    def covers(self, t: float) -> bool:
        return self.start <= t < self.hold_end


@dataclass
class _Value:
    """The timeline at one instant."""

    linear: np.ndarray
    angular: np.ndarray
    gripper: float | None
    extras: np.ndarray
    newest: _Entry
    sources: int
    held: bool = False  # the value continues a finished chunk's last action (arrival hold)


class ChunkBuffer:
    """Timeline of action chunks sampled into twists; see the module docstring for the semantics."""

    def __init__(self, *, policy: str = POLICY_REPLACE, crossfade_window_s: float = 0.1,
                 ensemble_decay: float = 0.01, max_chunk_age_s: float = 2.0,
                 max_future_s: float = 0.5, control_period_s: float | None = None,
                 mapping: ActionMapping | None = None, extra_dims: Sequence[str] | None = None,
                 initial_gripper: float | None = None, execution: str = EXECUTION_TIMELINE,
                 arrival_hold_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        for name, value, minimum in (("crossfade_window_s", crossfade_window_s, 0.0),
                                     ("max_chunk_age_s", max_chunk_age_s, 1e-9),
                                     ("max_future_s", max_future_s, 0.0),
                                     ("arrival_hold_s", arrival_hold_s, 0.0)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
                raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
        if not (isinstance(ensemble_decay, (int, float)) and math.isfinite(ensemble_decay)):
            raise ValueError(f"ensemble_decay must be a finite number, got {ensemble_decay!r}")
        if control_period_s is not None and not (math.isfinite(control_period_s) and control_period_s > 0):
            raise ValueError(f"control_period_s must be a positive number of seconds, got {control_period_s!r}")
        if initial_gripper is not None and not math.isfinite(initial_gripper):
            raise ValueError(f"initial_gripper must be finite, got {initial_gripper!r}")
        self.policy = policy
        self.execution = execution
        self.arrival_hold_s = float(arrival_hold_s)
        self.crossfade_window_s = float(crossfade_window_s) if policy == POLICY_CROSSFADE else 0.0
        self.ensemble_decay = float(ensemble_decay)
        self.max_chunk_age_s = float(max_chunk_age_s)
        self.max_future_s = float(max_future_s)
        self.control_period_s = control_period_s
        self.mapping = mapping or ActionMapping()
        self.extra_dims = list(extra_dims) if extra_dims is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._seq = 0
        self._epoch = 0
        self._stopped = False
        self._state = STATE_UNDERRUN
        self._held_gripper = None if initial_gripper is None else float(initial_gripper)
        self._extra_names: list[str] = list(self.extra_dims or [])
        self._held_extras: dict[str, float] = {}
        self._newest_stamp = -math.inf
        self._accepted = 0
        self._rejected: dict[str, int] = {}
        self._underruns = 0
        self._underrun_ticks = 0
        self._last_latency_s: float | None = None
        self._last_trimmed_s = 0.0
        self._last_execution: str | None = None
        self._previous_stamp: float | None = None  # observation stamp of the last accepted chunk, this epoch
        self._needed_s: deque[float] = deque(maxlen=COVERAGE_WINDOW)
        self._held_ticks = 0

    # ------------------------------------------------------------------ epochs and state
    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def reset(self) -> int:
        """Flush the timeline and start a new epoch (chunks for older epochs are discarded)."""
        with self._lock:
            self._flush_locked()
            return self._epoch

    def stop(self) -> int:
        """Flush, start a new epoch and refuse chunks (zero twist) until `resume()`."""
        with self._lock:
            self._flush_locked()
            self._stopped = True
            self._state = STATE_STOPPED
            return self._epoch

    def resume(self) -> int:
        """Accept chunks again after `stop()`; returns the current epoch."""
        with self._lock:
            self._stopped = False
            if self._state == STATE_STOPPED:
                self._state = STATE_UNDERRUN
            return self._epoch

    def _flush_locked(self) -> None:
        self._entries.clear()
        self._epoch += 1
        self._newest_stamp = -math.inf
        self._previous_stamp = None
        if not self._stopped:
            self._state = STATE_UNDERRUN

    # ------------------------------------------------------------------ push
    def push(self, chunk: ActionChunk, epoch: int) -> PushResult:
        """Place a chunk computed for ``epoch`` on the timeline; never raises on bad data."""
        if not isinstance(chunk, ActionChunk):
            raise ValueError(f"push expects an ActionChunk, got {type(chunk).__name__}")
        with self._lock:
            now = float(self._clock())
            result = self._push_locked(chunk, int(epoch), now)
            if result.accepted:
                self._accepted += 1
                self._last_latency_s = now - chunk.stamp
                self._last_trimmed_s = result.trimmed_s
            else:
                self._rejected[result.reason] = self._rejected.get(result.reason, 0) + 1
            return result

    def _push_locked(self, chunk: ActionChunk, epoch: int, now: float) -> PushResult:
        if self._stopped:
            return PushResult(False, REJECT_STOPPED, "buffer is stopped")
        if epoch != self._epoch:
            return PushResult(False, REJECT_STALE_EPOCH, f"chunk epoch {epoch} != current {self._epoch}")
        if not chunk.is_finite:
            return PushResult(False, REJECT_NON_FINITE, "actions contain NaN or inf")
        stamp = float(chunk.stamp)
        if not math.isfinite(stamp):
            return PushResult(False, REJECT_BAD_STAMP, f"stamp {stamp!r}")
        missing = [n for n in self.mapping.required + list(self.extra_dims or []) if n not in chunk.dim_names]
        if missing:
            return PushResult(False, REJECT_MISSING_DIMS, f"missing dims {missing} in {chunk.dim_names}")
        if now - stamp > self.max_chunk_age_s:
            return PushResult(False, REJECT_TOO_OLD, f"observation is {now - stamp:.3f} s old")
        if stamp - now > self.max_future_s:
            return PushResult(False, REJECT_FUTURE, f"stamp {stamp - now:.3f} s in the future")
        if stamp <= self._newest_stamp:
            return PushResult(False, REJECT_OUT_OF_ORDER, f"stamp {stamp} <= newest {self._newest_stamp}")
        execution = self._choose_execution_locked(chunk, now)
        entry = self._make_entry(chunk, now, execution)
        if entry.end <= now:
            return PushResult(False, REJECT_EXPIRED, "every action is already in the past")
        for older in self._entries:  # a newer chunk ends every hold at its arrival
            older.hold_end = max(older.end, min(older.hold_end, entry.start))
        self._entries.append(entry)
        self._newest_stamp = stamp
        self._previous_stamp = stamp
        self._last_execution = execution
        self._prune_locked(now - _PRUNE_LAG_S)
        trimmed = max(0.0, now - entry.origin)
        return PushResult(True, "accepted", trimmed_s=trimmed, execution=execution)

    def _choose_execution_locked(self, chunk: ActionChunk, now: float) -> str:
        """Record how long this chunk's predecessor had to cover and pick this chunk's execution."""
        latency = max(0.0, now - float(chunk.stamp))
        if self._previous_stamp is not None:
            self._needed_s.append(now - self._previous_stamp)
        if self.execution != EXECUTION_AUTO:
            return self.execution
        needed = float(np.percentile(self._needed_s, 95)) if self._needed_s else 2.0 * latency
        span = chunk.chunk_len * float(chunk.dt)
        return EXECUTION_TIMELINE if span >= AUTO_COVERAGE_MARGIN * needed else EXECUTION_ARRIVAL

    def _make_entry(self, chunk: ActionChunk, now: float, execution: str) -> _Entry:
        names = chunk.dim_names
        acts = chunk.actions
        dt = float(chunk.dt)
        pos = acts[:, [names.index(n) for n in self.mapping.position]]
        rot = acts[:, [names.index(n) for n in self.mapping.rotation]]
        if self.mapping.rotation_format == ROTATION_RPY:
            rotvecs = np.stack([matrix_to_rotvec(rpy_to_matrix(r)) for r in rot])
        else:
            rotvecs = rot.copy()
        gripper = acts[:, names.index(self.mapping.gripper)].copy() if self.mapping.gripper else None
        if self.extra_dims is None:
            used = set(self.mapping.required)
            extra_names = [n for n in names if n not in used]
            if extra_names != self._extra_names:
                # Only the newest chunk's unmapped dims are reported when dims are not pinned.
                self._extra_names = extra_names
                for entry in self._entries:
                    entry.extras = np.zeros((entry.linear.shape[0], len(extra_names)))
        extras = acts[:, [names.index(n) for n in self._extra_names]] if self._extra_names else \
            np.zeros((acts.shape[0], 0))
        stamp = float(chunk.stamp)
        origin = max(stamp, now) if execution == EXECUTION_ARRIVAL else stamp
        oldest_allowed = stamp + self.max_chunk_age_s
        end = min(origin + chunk.chunk_len * dt, oldest_allowed)
        hold_end = min(end + self.arrival_hold_s, oldest_allowed) if execution == EXECUTION_ARRIVAL else end
        return _Entry(seq=self._next_seq(), stamp=stamp, dt=dt, linear=pos / dt, angular=rotvecs / dt,
                      gripper=gripper, extras=extras, origin=origin, start=max(origin, now), end=end,
                      hold_end=max(end, hold_end), execution=execution)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _prune_locked(self, now: float) -> None:
        """Drop entries that cannot affect any time >= ``now``."""
        if self.policy == POLICY_ENSEMBLE:
            self._entries = [e for e in self._entries if e.hold_end > now]
            return
        # Replace/crossfade: once an entry is fully faded in, everything older is superseded.
        for k in range(len(self._entries) - 1, -1, -1):
            if self._entries[k].start + self.crossfade_window_s <= now:
                self._entries = self._entries[k:]
                break
        if self._entries and all(e.hold_end <= now for e in self._entries):
            self._entries = []

    # ------------------------------------------------------------------ timeline evaluation
    def _value_at(self, t: float) -> _Value | None:
        """Blend the stored entries at time ``t`` (which must not sit on a breakpoint)."""
        if self.policy == POLICY_ENSEMBLE:
            covering = [e for e in self._entries if e.covers(t)]  # arrival order: oldest first
            if not covering:
                return None
            weights = np.exp(-self.ensemble_decay * np.arange(len(covering)))
            weights /= weights.sum()
            idx = [e.index_at(t) for e in covering]
            lin = sum(w * e.linear[i] for w, e, i in zip(weights, covering, idx))
            ang = sum(w * e.angular[i] for w, e, i in zip(weights, covering, idx))
            ext = sum(w * e.extras[i] for w, e, i in zip(weights, covering, idx))
            grip = None
            if covering[0].gripper is not None:
                grip = float(sum(w * e.gripper[i] for w, e, i in zip(weights, covering, idx)))
            return _Value(lin, ang, grip, ext, covering[-1], len(covering), any(t >= e.end for e in covering))
        value: _Value | None = None
        for e in self._entries:  # fold in arrival order: each newer entry supersedes after fading in
            if t < e.start:
                continue
            if t >= e.hold_end:
                value = None
                continue
            i = e.index_at(t)
            new = _Value(e.linear[i], e.angular[i], None if e.gripper is None else float(e.gripper[i]),
                         e.extras[i], e, 1, t >= e.end)
            alpha = 1.0 if self.crossfade_window_s <= 0 else min(1.0, (t - e.start) / self.crossfade_window_s)
            if value is None or alpha >= 1.0:
                value = new
            else:
                grip = new.gripper
                if value.gripper is not None and new.gripper is not None:
                    grip = (1 - alpha) * value.gripper + alpha * new.gripper
                value = _Value((1 - alpha) * value.linear + alpha * new.linear,
                               (1 - alpha) * value.angular + alpha * new.angular, grip,
                               (1 - alpha) * value.extras + alpha * new.extras, e, value.sources + 1,
                               value.held or new.held)
        return value

    def _breakpoints(self, t_start: float, t_end: float) -> list[float]:
        points = {t_start, t_end}
        for e in self._entries:
            candidates = [e.start, e.end, e.hold_end, e.start + self.crossfade_window_s]
            first = max(0, int(math.floor((t_start - e.origin) / e.dt)))
            last = min(int(math.ceil((t_end - e.origin) / e.dt)), e.linear.shape[0])
            candidates.extend(e.origin + i * e.dt for i in range(first, last + 1))
            points.update(p for p in candidates if t_start < p < t_end)
        return sorted(points)

    # ------------------------------------------------------------------ sampling
    def sample(self, now: float | None = None, period: float | None = None) -> ControlCommand:
        """The command for the tick starting at ``now`` (default: the clock).

        With a period (argument, else ``control_period_s``) this is `sample_interval(now, now +
        period)`, exact at any rate; without one, the instantaneous twist at ``now``.
        """
        t = float(self._clock()) if now is None else float(now)
        period = self.control_period_s if period is None else period
        if period is not None:
            return self.sample_interval(t, t + period)
        if not math.isfinite(t):
            raise ValueError(f"sample time must be finite, got {t!r}")
        with self._lock:
            value = None if self._stopped else self._value_at(t)
            if value is None:
                return self._finish_locked(np.zeros(3), np.zeros(3), None, t, t, 0.0)
            return self._finish_locked(value.linear.copy(), value.angular.copy(), value, t, t, 1.0)

    def sample_interval(self, t_start: float, t_end: float) -> ControlCommand:
        """The constant twist reproducing the timeline's motion over ``[t_start, t_end)``."""
        _check_interval(t_start, t_end)
        with self._lock:
            if self._stopped:
                return self._finish_locked(np.zeros(3), np.zeros(3), None, t_start, t_end, 0.0)
            displacement, rotation, covered, last_value = self._integrate_locked(t_start, t_end)
            duration = t_end - t_start
            if last_value is None:
                return self._finish_locked(np.zeros(3), np.zeros(3), None, t_start, t_end, 0.0)
            return self._finish_locked(displacement / duration, matrix_to_rotvec(rotation) / duration,
                                       last_value, t_start, t_end, min(1.0, covered / duration))

    def _integrate_locked(self, t_start: float, t_end: float):
        """(displacement, rotation matrix, seconds covered, value at the last covered piece) over the interval."""
        points = self._breakpoints(t_start, t_end)
        displacement = np.zeros(3)
        rotation = np.eye(3)
        covered = 0.0
        last_value = None
        for a, b in zip(points[:-1], points[1:]):
            length = b - a
            if length < _MIN_PIECE_S:
                continue
            mid = self._value_at(0.5 * (a + b))
            if mid is None:
                continue
            covered += length
            last_value = mid
            if self.policy == POLICY_CROSSFADE and self._in_window(a, b):
                lin_int = np.zeros(3)
                ang_int = np.zeros(3)
                for node, weight in zip(_GAUSS_NODES, _GAUSS_WEIGHTS):
                    v = self._value_at(a + node * length)
                    lin_int += weight * length * v.linear
                    ang_int += weight * length * v.angular
            else:
                lin_int = mid.linear * length
                ang_int = mid.angular * length
            displacement += lin_int
            rotation = rotvec_to_matrix(ang_int) @ rotation  # base frame: later pieces on the left
        return displacement, rotation, covered, last_value

    def planned_actions(self, t_start: float, steps: int, dt: float, dim_names: Sequence[str]) -> np.ndarray:
        """The motion the timeline will execute over ``steps`` periods of ``dt`` from ``t_start``, as
        actions in ``dim_names`` (deltas per period, the mapping's rotation format; the gripper and
        other dims as absolute values at the end of each period, held ones where nothing plays).

        These are the actions already committed when an observation at ``t_start`` is sent to the
        model: a chunk decoded with them as its prefix continues the motion the arm is making.
        Reads the timeline without changing the buffer's state or counters.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {dt!r}")
        names = list(dim_names)
        missing = [n for n in self.mapping.required if n not in names]
        if missing:
            raise ValueError(f"dim_names {names} lack the mapped dims {missing}")
        out = np.zeros((int(steps), len(names)))
        with self._lock:
            for i in range(int(steps)):
                a = float(t_start) + i * dt
                _check_interval(a, a + dt)
                value = None
                if not self._stopped:
                    displacement, rotation, _, value = self._integrate_locked(a, a + dt)
                    out[i, [names.index(n) for n in self.mapping.position]] = displacement
                    if self.mapping.rotation_format == ROTATION_RPY:
                        rotation_delta = matrix_to_rpy(rotation)
                    else:
                        rotation_delta = matrix_to_rotvec(rotation)
                    out[i, [names.index(n) for n in self.mapping.rotation]] = rotation_delta
                absolute = dict(self._held_extras) if value is None else \
                    {n: float(x) for n, x in zip(self._extra_names, value.extras)}
                gripper = self._held_gripper if value is None or value.gripper is None else value.gripper
                if self.mapping.gripper is not None and gripper is not None:
                    absolute[self.mapping.gripper] = gripper
                for name, x in absolute.items():
                    if name in names:
                        out[i, names.index(name)] = x
        return out

    def _in_window(self, a: float, b: float) -> bool:
        w = self.crossfade_window_s
        return w > 0 and any(e.start < b and a < e.start + w for e in self._entries)

    def _finish_locked(self, linear, angular, value: _Value | None, t_start: float, t_end: float,
                       coverage: float) -> ControlCommand:
        if self._stopped:
            state = STATE_STOPPED
        elif value is None:
            state = STATE_UNDERRUN
            if self._state == STATE_OK:
                self._underruns += 1
            self._underrun_ticks += 1
        else:
            state = STATE_OK
            if value.held:
                self._held_ticks += 1
            if value.gripper is not None:
                self._held_gripper = value.gripper
            self._held_extras = {n: float(x) for n, x in zip(self._extra_names, value.extras)}
        self._state = state
        if value is None:
            return ControlCommand(np.zeros(3), np.zeros(3), self._held_gripper, state, t_start, t_end,
                                  0.0, self._epoch, extras=dict(self._held_extras))
        # The reported action index is the one at the last covered instant of the interval.
        t_ref = min(t_end, value.newest.end) if t_end > t_start else t_start
        index = value.newest.index_at(t_ref - 1e-9 if t_end > t_start else t_ref)
        return ControlCommand(linear, angular, self._held_gripper, state, t_start, t_end, coverage,
                              self._epoch, chunk_stamp=value.newest.stamp, action_index=index,
                              sources=value.sources, extras=dict(self._held_extras))

    # ------------------------------------------------------------------ status
    def depth_s(self, now: float | None = None) -> float:
        """Seconds of timeline left from ``now`` (0 when ``now`` is not covered)."""
        t = float(self._clock()) if now is None else float(now)
        with self._lock:
            return self._depth_locked(t)[0]

    def _depth_locked(self, t: float) -> tuple[float, int]:
        if self._stopped or self._value_at(t) is None:
            return 0.0, 0
        if self.policy == POLICY_ENSEMBLE:
            live = [e for e in self._entries if e.hold_end > t]  # what covers t, holds included
        else:
            started = [e for e in self._entries if e.start <= t]
            live = started[-1:] + [e for e in self._entries if e.start > t]
        furthest = max(live, key=lambda e: e.end)
        depth = max(0.0, furthest.end - t)
        first = furthest.index_at(max(t, furthest.start))
        last = furthest.index_at(furthest.end - 1e-9)
        return depth, last - first + 1

    def status(self, now: float | None = None) -> dict:
        """Depth, counters and state for /vla/status."""
        t = float(self._clock()) if now is None else float(now)
        with self._lock:
            depth, actions = self._depth_locked(t)
            return {
                "state": self._state,
                "policy": self.policy,
                "execution": self._last_execution or self.execution,
                "execution_setting": self.execution,
                "needed_s_p95": float(np.percentile(self._needed_s, 95)) if self._needed_s else None,
                "held_ticks": self._held_ticks,
                "epoch": self._epoch,
                "depth_s": depth,
                "depth_actions": actions,
                "chunks": len(self._entries),
                "accepted": self._accepted,
                "rejected": sum(self._rejected.values()),
                "rejected_by_reason": dict(self._rejected),
                "non_finite": self._rejected.get(REJECT_NON_FINITE, 0),
                "underruns": self._underruns,
                "underrun_ticks": self._underrun_ticks,
                "last_latency_s": self._last_latency_s,
                "last_trimmed_s": self._last_trimmed_s,
                "gripper": self._held_gripper,
            }


def _check_interval(t_start: float, t_end: float) -> None:
    if not (math.isfinite(t_start) and math.isfinite(t_end) and t_end > t_start):
        raise ValueError(f"sample interval must be finite with t_end > t_start, got [{t_start}, {t_end})")


def integrate_commands(commands: Iterable[ControlCommand], position=None, rotation=None,
                       duration: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply each command for its interval (or ``duration`` for instant samples) as a controller would.

    Returns ``(position, rotation)``: ``p += v * tau`` and ``R = exp(omega * tau) @ R`` (base frame).
    """
    p = np.zeros(3) if position is None else np.array(position, dtype=np.float64)
    r = np.eye(3) if rotation is None else np.array(rotation, dtype=np.float64)
    for cmd in commands:
        tau = cmd.duration if cmd.duration > 0 else duration
        if tau is None:
            raise ValueError(f"command at {cmd.t_start} is an instant sample; pass duration=")
        p = p + cmd.linear * tau
        r = rotvec_to_matrix(cmd.angular * tau) @ r
    return p, r
