"""The vla_node's logic without ROS: instruction, enable/stop, camera freshness, worker and buffer.

The node forwards messages and timer ticks here and publishes what `tick()` returns. Every
condition that must not move the arm (disabled, stopped, no instruction, stale or invalid camera,
failed engine, underrun, a non-finite command) yields a zero twist with the reason in `state`;
good input recovers on its own. Twists that pass are clamped to the configured speed limits
(each of the linear and angular vectors is scaled down as a whole, keeping its direction). The
clock is injected so tests drive time.

Execution: ``execution`` is the buffer's (auto | timeline | arrival, see `chunk_buffer`) or
``prefix``: the latency-compensated timeline with real-time chunking, where each observation is
decoded with the actions the arm will execute before its chunk can arrive (the buffer's plan over
`committed_steps` periods, from the worker's p95 latency) forced as the chunk's first tokens.

Camera freshness is judged by the newest valid frame's stamp: when it is older than
``stale_image_timeout_s`` the arm holds and the plan is flushed (a new epoch), so when frames
return the arm follows chunks computed from them, never the rest of a plan made before the gap.
A frame stamped older than the newest one is not used (it neither refreshes the camera nor reaches
the engine); one stamped more than ``FUTURE_STAMP_TOLERANCE_S`` ahead of the clock is refused (it
would never go stale). ``last_error`` says why the last input was refused; it is cleared once the
arm has followed the model for ``LAST_ERROR_CLEAR_S`` without a new refusal.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from openvla_ros.engines.base import ActionChunk
from openvla_ros.vla.constants import MAX_INSTRUCTION_CHARS, MIN_IMAGE_SIDE

from .chunk_buffer import EXECUTION_TIMELINE, EXECUTIONS, STATE_OK, STATE_UNDERRUN, ChunkBuffer, ControlCommand, PushResult
from .inference_worker import STATE_FAILED, InferenceWorker, Observation

logger = logging.getLogger(__name__)

# Gripper mappings of the model's output g (RLDS convention: 0 closed .. 1 open), as in OpenVLA's
# evaluation code: identity g | signed 2g-1 | binary sign(2g-1) (0 exactly at g = 0.5).
GRIPPER_IDENTITY = "identity"
GRIPPER_SIGNED = "signed"
GRIPPER_BINARY = "binary"
GRIPPER_MODES = (GRIPPER_IDENTITY, GRIPPER_SIGNED, GRIPPER_BINARY)
# Bound of the published gripper command: every mode's range (0..1, -1..1) lies within +-1.
GRIPPER_COMMAND_LIMIT = 1.0

EXECUTION_PREFIX = "prefix"
EXECUTION_CHOICES = EXECUTIONS + (EXECUTION_PREFIX,)


def buffer_execution(execution: str) -> str:
    """The chunk buffer's execution for a controller execution (prefix plays the plain timeline)."""
    if execution not in EXECUTION_CHOICES:
        raise ValueError(f"execution must be one of {EXECUTION_CHOICES}, got {execution!r}")
    return EXECUTION_TIMELINE if execution == EXECUTION_PREFIX else execution


def committed_steps(latency_s: float | None, chunk_len: int, dt: float) -> int:
    """Actions of ``dt`` the arm executes before a chunk answered ``latency_s`` after its frame lands,
    capped so the model still decodes at least one free action (0 before any latency is known)."""
    if latency_s is None or not math.isfinite(latency_s) or latency_s <= 0:
        return 0
    return max(0, min(int(chunk_len) - 1, math.ceil(latency_s / dt - 1e-9)))


# Why the arm holds; "ok" when it follows the model.
STATE_FOLLOWING = "ok"
HOLD_DISABLED = "disabled"
HOLD_STOPPED = "stopped"
HOLD_NO_INSTRUCTION = "no_instruction"
HOLD_NO_CAMERA = "no_camera"
HOLD_STALE_CAMERA = "stale_camera"
HOLD_ENGINE_FAILED = "engine_failed"
HOLD_UNDERRUN = "underrun"
HOLD_NON_FINITE = "non_finite_command"
HOLD_BAD_CAMERA = "bad_camera"  # frames arrive but are refused (last_error says why)
HOLD_NEW_INSTRUCTION = "new_instruction"  # a new instruction flushed the plan; none for it yet

# How far ahead of the controller's clock a frame may be stamped (clock offsets between machines):
# a frame stamped further ahead is refused, it would count as fresh long after it was taken.
FUTURE_STAMP_TOLERANCE_S = 0.1
# While the camera is stale, the hold is "bad_camera" when the newest frame that arrived was refused,
# up to this long after it came (a loaded system can space frames further apart than the stale
# timeout; the reason must not flicker between bad and stale camera).
BAD_CAMERA_MEMORY_S = 2.0
# last_error is cleared after the arm followed the model this long without a new error.
LAST_ERROR_CLEAR_S = 5.0


def map_gripper(value: float | None, mode: str = GRIPPER_IDENTITY, invert: bool = False) -> float | None:
    """Model gripper output (RLDS: 0 closed .. 1 open) to the arm's convention.

    ``invert`` mirrors the result within its range: ``1 - g`` for identity (still 0..1), ``-x``
    for the signed and binary modes (-1..1). The result is clamped to -1..1, which holds every
    mode's range, so no statistics or model output can command the gripper beyond it. None or
    non-finite input gives None (no command).
    """
    if mode not in GRIPPER_MODES:
        raise ValueError(f"gripper mode must be one of {GRIPPER_MODES}, got {mode!r}")
    if value is None or not math.isfinite(value):
        return None
    value = float(value)
    if mode == GRIPPER_IDENTITY:
        value = 1.0 - value if invert else value
    else:
        value = 2.0 * value - 1.0
        if mode == GRIPPER_BINARY:
            value = float(np.sign(value))
        value = -value if invert else value
    return min(GRIPPER_COMMAND_LIMIT, max(-GRIPPER_COMMAND_LIMIT, value))


def clamp_norm(vector: np.ndarray, limit: float) -> tuple[np.ndarray, bool]:
    """``vector`` scaled down to Euclidean norm ``limit`` when longer; (result, whether it was clamped)."""
    norm = float(np.linalg.norm(vector))
    if norm <= limit:
        return vector, False
    return vector * (limit / norm), True


@dataclass
class TickOutput:
    """What the node publishes for one control interval."""

    linear: np.ndarray  # (3,) m/s, base frame
    angular: np.ndarray  # (3,) rad/s, base frame
    gripper: float | None  # mapped gripper command; None before the model gave one
    state: str  # "ok" or one of the HOLD_* reasons
    command: ControlCommand | None = None  # the buffer's raw sample

    @property
    def moving(self) -> bool:
        return bool(np.any(self.linear) or np.any(self.angular))


@dataclass
class ControllerCounters:
    images: int = 0
    bad_images: int = 0
    instructions: int = 0
    bad_instructions: int = 0
    ticks: int = 0
    clamped_ticks: int = 0
    non_finite_commands: int = 0
    stale_flushes: int = 0
    out_of_order_images: int = 0
    holds: dict = field(default_factory=dict)


class VlaController:
    """Glue between camera/instruction input, the inference worker and the chunk buffer.

    ``on_chunk(chunk, epoch, result)`` (optional) is called from the worker thread after each chunk
    was offered to the buffer, with the buffer's `PushResult` (the node publishes accepted ones).
    """

    def __init__(self, engine, buffer: ChunkBuffer, *, clock: Callable[[], float] = time.monotonic,
                 stale_image_timeout_s: float = 0.5, start_enabled: bool = False,
                 gripper_mode: str = GRIPPER_IDENTITY, gripper_invert: bool = False,
                 max_linear_speed: float = math.inf, max_angular_speed: float = math.inf,
                 worker_options: dict | None = None, forced_prefix: bool = False,
                 on_chunk: Callable[[ActionChunk, int, PushResult], None] | None = None):
        self.stale_image_timeout_s = stale_image_timeout_s  # validated by the setter
        for name, value in (("max_linear_speed", max_linear_speed), ("max_angular_speed", max_angular_speed)):
            if not (isinstance(value, (int, float)) and not math.isnan(value) and value > 0):
                raise ValueError(f"{name} must be > 0 (inf: no limit), got {value!r}")
        map_gripper(0.0, gripper_mode)  # validates the mode
        self.buffer = buffer
        self._clock = clock
        self.gripper_mode = gripper_mode
        self.gripper_invert = bool(gripper_invert)
        self.max_linear_speed = float(max_linear_speed)
        self.max_angular_speed = float(max_angular_speed)
        self._chunk_listener = on_chunk
        options = dict(worker_options or {})
        if options.get("mode") == "threshold":
            options.setdefault("depth_fn", buffer.depth_s)
        if forced_prefix:
            options["prefix_fn"] = self._committed_prefix
        self.worker = InferenceWorker(engine, self._on_chunk, clock=clock, on_error=self._on_error, **options)
        self.enabled = bool(start_enabled)
        self.stopped = False
        self.instruction: str | None = None
        self.last_image_time: float | None = None  # stamp of the newest usable frame
        self.last_bad_image_time: float | None = None  # clock time the newest refused frame arrived
        self._last_good_arrival: float | None = None  # clock time the newest usable frame arrived
        self._awaiting_plan = False  # an instruction flushed the plan and nothing answered it yet
        self._last_error: str | None = None
        self._last_error_time = -math.inf
        self._following_since: float | None = None
        self.last_state: str | None = None
        self.counters = ControllerCounters()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @last_error.setter
    def last_error(self, text: str | None) -> None:
        self._last_error, self._last_error_time = text, self._clock()

    @property
    def stale_image_timeout_s(self) -> float:
        return self._stale_image_timeout_s

    @stale_image_timeout_s.setter
    def stale_image_timeout_s(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"stale_image_timeout_s must be > 0 seconds, got {value!r}")
        self._stale_image_timeout_s = float(value)

    # lifecycle --------------------------------------------------------------------------
    def start(self) -> "VlaController":
        self.worker.start()
        return self

    def shutdown(self) -> None:
        self.buffer.stop()
        self.worker.stop()

    # inputs -----------------------------------------------------------------------------
    def set_instruction(self, text) -> bool:
        """Every instruction message starts the task afresh: the plan made so far is flushed, even when
        the text repeats (a new episode, or the operator re-issuing a command). Empty text is refused (False)."""
        if not isinstance(text, str) or not text.strip():
            self.counters.bad_instructions += 1
            self.last_error = f"ignored empty instruction {text!r:.80}"
            logger.warning(self.last_error)
            return False
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate: no tokenizer can take it
                self.counters.bad_instructions += 1
                self.last_error = f"ignored instruction that is not valid text ({exc.reason} at {exc.start})"
                logger.warning(self.last_error)
                return False
        if len(text) > MAX_INSTRUCTION_CHARS:
            self.counters.bad_instructions += 1
            self.last_error = (f"ignored instruction of {len(text)} characters (limit {MAX_INSTRUCTION_CHARS}): "
                               f"{text[:40]!r}...")
            logger.warning(self.last_error)
            return False
        self.instruction = text.strip()
        self._awaiting_plan = True
        self.buffer.reset()
        self.counters.instructions += 1
        return True

    def on_image(self, image: np.ndarray, stamp: float) -> bool:
        """A decoded RGB frame taken at `stamp` (controller clock). Invalid frames are counted, not used;
        a frame older than the newest one is counted as out of order and not used (False)."""
        usable = (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                  and image.shape[2] == 3 and min(image.shape[:2]) >= MIN_IMAGE_SIDE)
        if not usable:
            self.on_bad_image(f"unusable frame: shape {getattr(image, 'shape', None)} "
                              f"dtype {getattr(image, 'dtype', type(image).__name__)}")
            return False
        if not (isinstance(stamp, (int, float)) and math.isfinite(stamp)):
            self.on_bad_image(f"unusable frame stamp {stamp!r}")
            return False
        now = self._clock()
        if self.last_image_time is not None and self.last_image_time > now + FUTURE_STAMP_TOLERANCE_S:
            self.last_image_time = None  # the clock went back (e.g. a simulation restarted): start afresh
        if stamp > now + FUTURE_STAMP_TOLERANCE_S:
            self.on_bad_image(f"frame stamped {stamp - now:.3f} s in the future (stamp {stamp:.3f}, clock "
                              f"{now:.3f}; tolerance {FUTURE_STAMP_TOLERANCE_S} s): clocks out of sync?")
            return False
        if self.last_image_time is not None and stamp < self.last_image_time:
            self.counters.out_of_order_images += 1
            return False
        self.counters.images += 1
        self.last_image_time = float(stamp)
        self._last_good_arrival = now
        if self.enabled and not self.stopped and self.instruction is not None:
            self.worker.submit(Observation(image, self.instruction, float(stamp), self.buffer.epoch))
        return True

    def on_bad_image(self, reason: str) -> None:
        self.counters.bad_images += 1
        self.last_bad_image_time = self._clock()
        self.last_error = reason

    def set_enabled(self, enabled: bool) -> None:
        """Enable follows the model from the next frame; disable flushes the plan and holds."""
        if enabled:
            self.stopped = False
            self.buffer.resume()
        else:
            self.buffer.reset()
        self.enabled = bool(enabled)

    def stop(self) -> None:
        """Flush, zero twist, stay stopped until enabled again."""
        self.stopped = True
        self.enabled = False
        self.buffer.stop()

    # outputs ----------------------------------------------------------------------------
    def hold_reason(self, now: float) -> str | None:
        """Why the arm must hold at ``now`` regardless of the buffer (None: follow the buffer)."""
        if self.stopped:
            return HOLD_STOPPED
        if not self.enabled:
            return HOLD_DISABLED
        if self.instruction is None:
            return HOLD_NO_INSTRUCTION
        if self.last_image_time is None or now - self.last_image_time > self.stale_image_timeout_s:
            bad = self.last_bad_image_time
            if (bad is not None and now - bad <= BAD_CAMERA_MEMORY_S
                    and (self._last_good_arrival is None or bad >= self._last_good_arrival)):
                return HOLD_BAD_CAMERA  # frames arrive, but are refused
            return HOLD_NO_CAMERA if self.last_image_time is None else HOLD_STALE_CAMERA
        if self.worker.state == STATE_FAILED:
            return HOLD_ENGINE_FAILED
        return None

    def tick(self, period: float, now: float | None = None) -> TickOutput:
        """The command for the control interval [now, now + period)."""
        now = self._clock() if now is None else now
        self.counters.ticks += 1
        reason = self.hold_reason(now)
        stale = reason in (HOLD_STALE_CAMERA, HOLD_BAD_CAMERA) and self.last_image_time is not None
        if stale and self.last_state not in (HOLD_STALE_CAMERA, HOLD_BAD_CAMERA):
            # The plan was made from frames that are now too old: drop it (and any chunk in flight).
            self.buffer.reset()
            self.counters.stale_flushes += 1
            logger.warning("camera stale (newest frame %.3f s old): holding", now - self.last_image_time)
        command = self.buffer.sample(now, period=period)
        gripper = map_gripper(command.gripper, self.gripper_mode, self.gripper_invert)
        linear, angular = command.linear, command.angular
        if reason is None and command.state != STATE_OK:
            reason = self._underrun_reason() if command.state == STATE_UNDERRUN else command.state
        if reason is None and not (np.all(np.isfinite(linear)) and np.all(np.isfinite(angular))):
            # The buffer rejects non-finite chunks; this guards the last step before the arm.
            self.counters.non_finite_commands += 1
            reason = HOLD_NON_FINITE
        self.last_state = reason or STATE_FOLLOWING
        if reason is None:
            if self._following_since is None:
                self._following_since = now
            if (self._last_error is not None and now - self._following_since >= LAST_ERROR_CLEAR_S
                    and now - self._last_error_time >= LAST_ERROR_CLEAR_S):
                self._last_error = None  # followed the model for a while with nothing refused
        else:
            self._following_since = None
        if reason is not None:
            self.counters.holds[reason] = self.counters.holds.get(reason, 0) + 1
            return TickOutput(np.zeros(3), np.zeros(3), gripper, reason, command)
        linear, clamped_linear = clamp_norm(linear, self.max_linear_speed)
        angular, clamped_angular = clamp_norm(angular, self.max_angular_speed)
        if clamped_linear or clamped_angular:
            self.counters.clamped_ticks += 1
        return TickOutput(np.array(linear, dtype=np.float64), np.array(angular, dtype=np.float64), gripper,
                          STATE_FOLLOWING, command)

    def status(self, now: float | None = None) -> dict:
        """Everything /vla/status reports; ``state`` is "ok" or why the arm holds."""
        now = self._clock() if now is None else now
        reason = self.hold_reason(now)
        buffer = self.buffer.status(now)
        if reason is None:  # the buffer's state is that of the last tick's sample
            if buffer["state"] == STATE_UNDERRUN:
                reason = self._underrun_reason()
            elif self.last_state == HOLD_NON_FINITE:
                reason = HOLD_NON_FINITE
        age = None if self.last_image_time is None else now - self.last_image_time
        c = self.counters
        return {
            "state": reason or STATE_FOLLOWING,
            "enabled": self.enabled,
            "stopped": self.stopped,
            "instruction": self.instruction,
            "image_age_s": age,
            "images": c.images,
            "bad_images": c.bad_images,
            "instructions": c.instructions,
            "bad_instructions": c.bad_instructions,
            "ticks": c.ticks,
            "clamped_ticks": c.clamped_ticks,
            "non_finite_commands": c.non_finite_commands,
            "stale_flushes": c.stale_flushes,
            "out_of_order_images": c.out_of_order_images,
            "holds": dict(c.holds),
            "last_error": self.last_error,
            "buffer": buffer,
            "worker": self.worker.status(),
        }

    def _underrun_reason(self) -> str:
        return HOLD_NEW_INSTRUCTION if self._awaiting_plan else HOLD_UNDERRUN

    # worker callbacks (worker thread) ---------------------------------------------------
    def _on_chunk(self, chunk: ActionChunk, epoch: int) -> None:
        result = self.buffer.push(chunk, epoch)
        if epoch == self.buffer.epoch:
            self._awaiting_plan = False
        if not result:
            logger.debug("chunk rejected: %s %s", result.reason, result.detail)
        if self._chunk_listener is not None:
            self._chunk_listener(chunk, epoch, result)

    def _committed_prefix(self, observation) -> np.ndarray | None:
        engine = self.worker.engine
        steps = committed_steps(self.worker.latency_p95_s(), engine.chunk_len, engine.dt)
        if steps == 0:
            return None
        return self.buffer.planned_actions(observation.stamp, steps, engine.dt, engine.dim_names)

    def _on_error(self, exc: BaseException, state: str) -> None:
        self._awaiting_plan = False  # answered, with an error: the hold is the engine's
        self.last_error = f"engine error ({state}): {exc}"
