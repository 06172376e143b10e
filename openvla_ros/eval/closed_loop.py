"""Closed-loop replay scoring (no ROS): how the model and the chunk buffer behave through ROS.

`openvla_ros.nodes.replay` plays a bag into the real vla_node and records the stack's outputs
(``/vla/eef_delta``, ``/vla/action_chunk``, ``/vla/gripper_command``, ``/vla/status``) into a new
bag; this module reads that bag back and scores it against the source bag's ground truth:

- **control stream**: number of commands, rate (from the twists' header stamps) and jitter
  (command intervals: mean, std, p50, p95, max);
- **latency**: image stamp -> arrival of the chunk computed from it. vla_node publishes a chunk in
  the same control tick as the first twist computed from it, so this is also image -> first command
  (to within one control period);
- **underruns**: fraction of control ticks in steady state (from the first accepted chunk to the last
  camera frame) that held because the buffer had nothing for "now" (from ``/vla/status``);
- **first action vs truth**: each chunk's first action against the truth of the frame it was
  computed from (the player logs which original frame each published image was), with the
  open-loop metrics of `metrics.action_metrics`;
- **command tracking**: the twist stream against the truth turned into a velocity (delta / dt), at
  the bag time each command corresponds to;
- **joint commands** (when the replay also ran ik_node): how many joint targets it sent, their rate
  and period error against ik_node's ``rate_hz``, how many distinct positions were commanded (did
  the arm get told to move) and the largest step between consecutive commands.

`ReplayOptions` are the ``openvla-ros eval replay`` options shared with the node bringup.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .bags import (MSG_FLOAT64_ARRAY, MSG_JOINT_STATE, MSG_JOINT_TRAJECTORY, MSG_STRING, TWIST_DIM_NAMES, BagError,
                   BagFrames, BagReadOptions, RosBag, _stamp_ns)
from .metrics import action_metrics, latency_stats, mae, period_errors_ms, rmse
from .open_loop import EvalResult, align_dims
from .report import (PLOT_ERRORS, PLOT_LATENCY, PLOT_PREDICTIONS, REPORT_MD, SUMMARY_JSON, new_figure, histogram,
                     markdown_table, plot_error_histograms, plot_latency, plot_predictions, write_summary_json)

log = logging.getLogger(__name__)

TWIST_TOPIC = "/vla/eef_delta"
CHUNK_TOPIC = "/vla/action_chunk"
GRIPPER_TOPIC = "/vla/gripper_command"
STATUS_TOPIC = "/vla/status"
INSTRUCTION_TOPIC = "/vla/instruction"
CAMERA_TOPIC = "/camera/image_raw"
# What the replay records, with types (the recorder subscribes before the player starts).
RECORDED_TOPICS = {
    TWIST_TOPIC: "geometry_msgs/msg/TwistStamped",
    CHUNK_TOPIC: "trajectory_msgs/msg/JointTrajectory",
    GRIPPER_TOPIC: "std_msgs/msg/Float64",
    STATUS_TOPIC: "diagnostic_msgs/msg/DiagnosticArray",
    INSTRUCTION_TOPIC: MSG_STRING,
}
RECORDED_BAG = "replay_bag"
# Message types ik_node can command the arm with (its `output_type` parameter picks one).
JOINT_COMMAND_TYPES = (MSG_JOINT_TRAJECTORY, MSG_JOINT_STATE, MSG_FLOAT64_ARRAY)
PLOT_COMMANDS = "commands_vs_truth.png"
PLOT_INTERVALS = "command_intervals.png"


@dataclass(frozen=True)
class ReplayOptions:
    """What to replay and how (``openvla-ros eval replay`` flags)."""

    image_topic: str | None = None  # None: the bag's only camera topic
    instruction: str | None = None  # fixed instruction (wins over instruction_topic)
    instruction_topic: str | None = None  # None: the bag's only std_msgs/String topic
    truth_topic: str | None = None  # None: no action metrics, only rate/latency/underruns
    gripper_topic: str | None = None
    sync: str = "nearest"
    tolerance: float = 0.05  # s, truth matching
    typestore: str | None = None
    rate: float = 1.0  # playback speed factor
    start_offset_s: float = 0.0
    drain_s: float = 1.0  # s to keep running after the last frame, so the last chunks arrive
    storage: str = "mcap"  # of the recorded bag
    vla_params_file: str | None = None  # vla_node parameter file
    vla_parameters: dict = field(default_factory=dict)  # vla_node parameter overrides
    ik_params_files: tuple[str, ...] = ()  # ik_node parameter files, in order (empty: no ik_node)
    ik_parameters: dict = field(default_factory=dict)  # ik_node parameter overrides
    joint_states_topic: str | None = None  # the bag's JointState topic for ik_node (None: its only one)
    startup_timeout_s: float = 20.0

    @property
    def ik_enabled(self) -> bool:
        return bool(self.ik_params_files)

    def validated(self) -> "ReplayOptions":
        if not (np.isfinite(self.drain_s) and self.drain_s >= 0):
            raise ValueError(f"drain_s must be a finite number of seconds >= 0, got {self.drain_s!r}")
        if not (np.isfinite(self.startup_timeout_s) and self.startup_timeout_s > 0):
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s!r}")
        if self.vla_params_file is not None and not Path(self.vla_params_file).is_file():
            raise ValueError(f"vla_node parameter file {self.vla_params_file!r} does not exist")
        if isinstance(self.ik_params_files, (str, Path)):
            raise ValueError(f"ik_params_files must be a sequence of paths, got one path {self.ik_params_files!r}")
        for path in self.ik_params_files:
            if not Path(path).is_file():
                raise ValueError(f"ik_node parameter file {str(path)!r} does not exist")
        if not self.ik_enabled and (self.ik_parameters or self.joint_states_topic is not None):
            given = sorted(self.ik_parameters) + (["joint_states_topic"] if self.joint_states_topic is not None else [])
            raise ValueError(f"ik_node settings {given} given without ik_node parameter files (--ik-params FILE): "
                             "ik_node only runs with them")
        return self

    def read_options(self, dt: float) -> BagReadOptions:
        return BagReadOptions(image_topic=self.image_topic, instruction=self.instruction,
                              instruction_topic=self.instruction_topic, truth_topic=self.truth_topic,
                              gripper_topic=self.gripper_topic, dt=dt, sync=self.sync, tolerance=self.tolerance,
                              typestore=self.typestore).validated()


@dataclass
class SourceFrames:
    """The source bag's camera frames (stamps, ns) with their truth, images dropped."""

    path: Path
    image_topic: str
    image_type: str
    instruction_topic: str | None
    stamps_ns: np.ndarray  # (N,) int64 sorted
    truths: np.ndarray | None  # (N, D)
    dim_names: list[str] | None
    sync: dict
    dt: float

    def truth_at(self, stamp_ns: int) -> np.ndarray | None:
        """Truth of the frame with exactly this (original) stamp."""
        if self.truths is None:
            return None
        i = int(np.searchsorted(self.stamps_ns, stamp_ns))
        if i < len(self.stamps_ns) and self.stamps_ns[i] == stamp_ns:
            return self.truths[i]
        return None

    def truth_before(self, bag_ns: int) -> np.ndarray | None:
        """Truth of the newest frame at or before bag time `bag_ns`."""
        if self.truths is None or not len(self.stamps_ns):
            return None
        i = bisect.bisect_right(self.stamps_ns.tolist(), bag_ns) - 1
        return None if i < 0 else self.truths[i]


def load_source_frames(bag: str | Path, options: ReplayOptions, dt: float) -> SourceFrames:
    """Read the source bag's frames (decoding each image once to validate it) and their truth."""
    frames = BagFrames(bag, options.read_options(dt))
    stamps, truths = [], []
    for frame in frames:  # images are decoded (a corrupt one is a clear BagError now) and dropped
        stamps.append(frame.stamp_ns)
        truths.append(frame.truth)
    order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
    stamps_ns = np.asarray(stamps, dtype=np.int64)[order]
    has_truth = frames.dim_names is not None and len(truths) > 0
    return SourceFrames(path=Path(bag), image_topic=frames.image_topic, image_type=frames.image_type,
                        instruction_topic=frames.instruction_topic, stamps_ns=stamps_ns,
                        truths=np.stack([truths[i] for i in order]) if has_truth else None,
                        dim_names=frames.dim_names if has_truth else None, sync=frames.report.as_dict(), dt=dt)


@dataclass(frozen=True)
class SourceJointStates:
    """The source bag's JointState topic that ik_node gets as its measured state."""

    topic: str
    count: int
    max_gap_s: float  # longest interval between two of its messages in the bag (0 with fewer than two)


def source_joint_states(bag: str | Path, options: ReplayOptions) -> SourceJointStates:
    """`options.joint_states_topic`, else the bag's only sensor_msgs/JointState topic (BagError listing the topics)."""
    with RosBag(bag, options.typestore) as source:
        topic = source.pick_topic(options.joint_states_topic, (MSG_JOINT_STATE,),
                                  kind="sensor_msgs/msg/JointState topics", role="joint states topic",
                                  how_to_choose="ik_node needs the arm's joint states: choose the topic with the "
                                                "joint states topic option")
        times = np.asarray([m.receive_ns for m in source.raw_messages([topic])], dtype=np.int64)
    gap = float(np.diff(np.sort(times)).max()) * 1e-9 if len(times) > 1 else 0.0
    return SourceJointStates(topic=topic, count=int(len(times)), max_gap_s=gap)


@dataclass(frozen=True)
class PublishedFrame:
    """One camera frame as the player published it: its stamp in the bag and the stamp it went out with."""

    original_stamp_ns: int
    stamp_ns: int


@dataclass
class RecordedStream:
    """The stack's outputs read back from the recorded bag."""

    twist_stamps_ns: np.ndarray  # (T,)
    twists: np.ndarray  # (T, 6)
    chunk_stamps_ns: np.ndarray  # (C,) observation stamps
    chunk_receive_ns: np.ndarray  # (C,)
    chunk_first: list[np.ndarray]
    chunk_dims: list[str] | None
    status_receive_ns: np.ndarray
    status: list[dict]

    @classmethod
    def read(cls, path: str | Path) -> "RecordedStream":
        twist_t, twists, chunk_t, chunk_rx, firsts, dims, status_rx, status = [], [], [], [], [], None, [], []
        with RosBag(path) as bag:
            topics = [t for t in (TWIST_TOPIC, CHUNK_TOPIC, STATUS_TOPIC) if t in bag.topics]
            for item in bag.messages(topics):
                msg = item.msg
                if item.topic == TWIST_TOPIC:
                    s = msg.header.stamp
                    twist_t.append(s.sec * 1_000_000_000 + s.nanosec)
                    t = msg.twist
                    twists.append([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])
                elif item.topic == CHUNK_TOPIC:
                    if not len(msg.points):
                        continue
                    s = msg.header.stamp
                    chunk_t.append(s.sec * 1_000_000_000 + s.nanosec)
                    chunk_rx.append(item.receive_ns)
                    firsts.append(np.asarray(msg.points[0].positions, dtype=np.float64))
                    dims = list(msg.joint_names)
                else:
                    values = {kv.key: kv.value for status_entry in msg.status for kv in status_entry.values}
                    status_rx.append(item.receive_ns)
                    status.append(values)
        order = np.argsort(np.asarray(twist_t, dtype=np.int64), kind="stable")
        return cls(twist_stamps_ns=np.asarray(twist_t, dtype=np.int64)[order],
                   twists=np.asarray(twists, dtype=np.float64).reshape(-1, 6)[order],
                   chunk_stamps_ns=np.asarray(chunk_t, dtype=np.int64),
                   chunk_receive_ns=np.asarray(chunk_rx, dtype=np.int64), chunk_first=firsts, chunk_dims=dims,
                   status_receive_ns=np.asarray(status_rx, dtype=np.int64), status=status)


@dataclass
class JointCommands:
    """ik_node's joint targets read back from the recorded bag."""

    topic: str
    msgtype: str
    stamps_ns: np.ndarray  # (N,) header stamp where the message has a non-zero one, else receive time
    stamp_source: str  # "header" or "receive"
    positions: np.ndarray  # (N, J)
    joint_names: list[str] | None  # None for Float64MultiArray (it carries no names)
    skipped: int  # messages whose joint count differs from the first one's

    @classmethod
    def read(cls, path: str | Path, topic: str) -> "JointCommands":
        stamps, receive, rows, names, skipped, msgtype = [], [], [], None, 0, ""
        with RosBag(path) as bag:
            if topic not in bag.topics:
                return cls(topic, "", np.zeros(0, np.int64), "receive", np.zeros((0, 0)), None, 0)
            msgtype = bag.require_topic(topic, JOINT_COMMAND_TYPES, role="joint command topic").msgtype
            for item in bag.messages([topic]):
                msg, stamp = item.msg, 0
                if msgtype == MSG_JOINT_TRAJECTORY:
                    if not len(msg.points):
                        skipped += 1
                        continue
                    q, joint_names = msg.points[0].positions, list(msg.joint_names)
                    stamp = _stamp_ns(msg.header.stamp, 0)
                elif msgtype == MSG_JOINT_STATE:
                    q, joint_names = msg.position, list(msg.name)
                    stamp = _stamp_ns(msg.header.stamp, 0)
                else:
                    q, joint_names = msg.data, None
                q = np.asarray(q, dtype=np.float64)
                if rows and q.shape != rows[0].shape:
                    skipped += 1
                    continue
                if names is None:
                    names = joint_names
                rows.append(q)
                stamps.append(int(stamp))
                receive.append(item.receive_ns)
        # joint_trajectory_controller wants a zero stamp (start on receipt), so such commands are
        # timed by when the recorder got them.
        use_header = bool(stamps) and all(s != 0 for s in stamps)
        times = np.asarray(stamps if use_header else receive, dtype=np.int64)
        order = np.argsort(times, kind="stable")
        q = np.stack(rows)[order] if rows else np.zeros((0, 0))
        return cls(topic, msgtype, times[order], "header" if use_header else "receive", q, names, skipped)


def joint_command_stats(commands: JointCommands, target_rate_hz: float | None = None) -> dict:
    """Count, rate, period error against `target_rate_hz`, distinct positions and joint steps of `commands`."""
    n = int(len(commands.stamps_ns))
    t = commands.stamps_ns
    span_s = (t[-1] - t[0]) * 1e-9 if n > 1 else 0.0
    out: dict = {"topic": commands.topic, "msgtype": commands.msgtype or None, "count": n,
                 "stamps": commands.stamp_source, "skipped": commands.skipped,
                 "rate_hz": (n - 1) / span_s if span_s > 0 else None, "target_rate_hz": target_rate_hz,
                 "interval_ms": interval_stats(t), "period_error_ms": {"p50": None, "p99": None, "max": None},
                 "distinct_positions": 0, "joint_names": commands.joint_names, "joint_range_rad": None,
                 "max_step_rad": None, "max_step_joint": None, "step_p99_rad": None}
    if n > 1 and target_rate_hz:
        error = period_errors_ms(t.astype(np.float64) * 1e-9, 1.0 / float(target_rate_hz))
        out["period_error_ms"] = {"p50": float(np.percentile(error, 50)), "p99": float(np.percentile(error, 99)),
                                  "max": float(error.max())}
    if not n:
        return out
    q = commands.positions
    names = commands.joint_names or [f"joint_{i}" for i in range(q.shape[1])]
    out["distinct_positions"] = int(len(np.unique(q, axis=0)))
    out["joint_range_rad"] = dict(zip(names, np.ptp(q, axis=0).tolist()))
    if n > 1:
        steps = np.abs(np.diff(q, axis=0))  # (N-1, J)
        largest = np.unravel_index(int(np.argmax(steps)), steps.shape)
        out["max_step_rad"] = float(steps[largest])
        out["max_step_joint"] = names[largest[1]]
        out["step_p99_rad"] = float(np.percentile(steps.max(axis=1), 99))
    return out


def last_status(path: str | Path, topic: str) -> dict | None:
    """Key/values of the last DiagnosticArray on `topic` in the bag (None when it has none)."""
    values = None
    with RosBag(path) as bag:
        if topic not in bag.topics:
            return None
        for item in bag.messages([topic]):
            values = {kv.key: kv.value for entry in item.msg.status for kv in entry.values}
    return values


def interval_stats(stamps_ns: np.ndarray) -> dict:
    """Statistics of the intervals between consecutive stamps, in ms."""
    if len(stamps_ns) < 2:
        return {"mean": None, "std": None, "p50": None, "p95": None, "max": None, "count": 0}
    d = np.diff(np.asarray(stamps_ns, dtype=np.float64)) * 1e-6
    return {"mean": float(d.mean()), "std": float(d.std()), "p50": float(np.percentile(d, 50)),
            "p95": float(np.percentile(d, 95)), "max": float(d.max()), "count": int(d.size)}


def _int(values: dict, key: str, default: int = 0) -> int:
    try:
        return int(float(values.get(key, default)))
    except ValueError:
        return default


def underrun_fraction(stream: RecordedStream, window_ns: tuple[int, int]) -> dict:
    """Underrun holds / control ticks between the status messages bracketing the steady-state window."""
    lo, hi = window_ns
    inside = [i for i, t in enumerate(stream.status_receive_ns)
              if lo <= t <= hi and _int(stream.status[i], "buffer.accepted") >= 1]
    if len(inside) < 2:
        return {"underrun_fraction": None, "steady_ticks": 0, "underrun_ticks": 0}
    first, last = stream.status[inside[0]], stream.status[inside[-1]]
    ticks = _int(last, "ticks") - _int(first, "ticks")
    # Ticks with nothing to play: plain underruns and those right after an instruction flushed the plan.
    underruns = sum(_int(last, f"holds.{k}") - _int(first, f"holds.{k}") for k in ("underrun", "new_instruction"))
    return {"underrun_fraction": underruns / ticks if ticks > 0 else None, "steady_ticks": ticks,
            "underrun_ticks": underruns}


# Chunk stamps travel through float seconds (ActionChunk.stamp), which keeps ~0.25 us at today's epoch.
STAMP_MATCH_NS = 10_000


def _stamp_lookup(published: Sequence[PublishedFrame]):
    """original_of(published stamp ns) -> the frame's stamp in the bag, or None (nearest within STAMP_MATCH_NS)."""
    pairs = sorted((p.stamp_ns, p.original_stamp_ns) for p in published)
    keys = [k for k, _ in pairs]

    def original_of(stamp_ns: int) -> int | None:
        i = bisect.bisect_left(keys, stamp_ns)
        best = min((j for j in (i - 1, i) if 0 <= j < len(keys)), key=lambda j: abs(keys[j] - stamp_ns), default=None)
        if best is None or abs(keys[best] - stamp_ns) > STAMP_MATCH_NS:
            return None
        return pairs[best][1]

    return original_of


def score_replay(recorded: str | Path, published: Sequence[PublishedFrame], source: SourceFrames, *,
                 rate: float = 1.0, control_rate_hz: float | None = None, joint_command_topic: str | None = None,
                 ik_rate_hz: float | None = None, ik_status_topic: str | None = None) -> tuple[dict, dict]:
    """(summary, series for plots) of one closed-loop replay.

    With `joint_command_topic` (the replay ran ik_node) the summary's ``joint_commands`` section
    scores ik_node's joint targets against its `ik_rate_hz`, with its last status from `ik_status_topic`.
    """
    stream = RecordedStream.read(recorded)
    original_of = _stamp_lookup(published)
    summary: dict = {"frames_published": len(published), "commands": int(len(stream.twist_stamps_ns)),
                     "control_rate_target_hz": control_rate_hz}
    t = stream.twist_stamps_ns
    span_s = (t[-1] - t[0]) * 1e-9 if len(t) > 1 else 0.0
    summary["control_rate_hz"] = (len(t) - 1) / span_s if span_s > 0 else None
    summary["command_interval_ms"] = interval_stats(t)
    summary["chunks"] = len(stream.chunk_first)
    chunk_span = (stream.chunk_receive_ns[-1] - stream.chunk_receive_ns[0]) * 1e-9 if summary["chunks"] > 1 else 0
    summary["chunk_rate_hz"] = (summary["chunks"] - 1) / chunk_span if chunk_span > 0 else None
    summary["frames_inferred_fraction"] = summary["chunks"] / len(published) if published else None
    latencies = ((stream.chunk_receive_ns - stream.chunk_stamps_ns) * 1e-6).tolist()
    summary["latency_ms"] = latency_stats(latencies)

    # Steady state: from the first chunk to the last frame published (plus one action period).
    if summary["chunks"] and published:
        window = (int(stream.chunk_receive_ns.min()),
                  int(max(p.stamp_ns for p in published) + source.dt * 1e9))
    else:
        window = (0, 0)
    summary.update(underrun_fraction(stream, window))
    summary["final_status"] = stream.status[-1] if stream.status else None

    # First action of each chunk vs the truth of its frame.
    series: dict = {"twist_t": t, "twists": stream.twists, "latencies_ms": latencies, "window": window}
    summary.update({"mae": None, "rmse": None, "first_action": None, "command_tracking": None})
    if source.truths is not None and stream.chunk_dims is not None:
        rows = []
        for stamp, first in zip(stream.chunk_stamps_ns, stream.chunk_first):
            original = original_of(int(stamp))
            truth = None if original is None else source.truth_at(original)
            if truth is not None and np.all(np.isfinite(first)):
                rows.append((original, first, truth, (int(stamp))))
        if rows:
            pairs = align_dims(stream.chunk_dims, source.dim_names)
            pred = np.stack([r[1] for r in rows])
            true = np.stack([r[2] for r in rows])
            compared_names = [stream.chunk_dims[p] for p, _ in pairs]
            metrics = action_metrics(pred[:, [p for p, _ in pairs]], true[:, [q for _, q in pairs]], compared_names)
            summary["first_action"] = metrics
            summary["mae"], summary["rmse"] = metrics["mae"], metrics["rmse"]
            chunk_latency = {int(s): l for s, l in zip(stream.chunk_stamps_ns, latencies)}
            series["first_action"] = EvalResult(
                dim_names=list(stream.chunk_dims), stamps=np.array([r[0] * 1e-9 for r in rows]),
                instructions=[""] * len(rows), predictions=pred, latencies_ms=[chunk_latency[r[3]] for r in rows],
                tokens=[""] * len(rows), truths=true, truth_dim_names=list(source.dim_names), pairs=pairs)
        tracking = command_tracking(stream, published, source, rate, window)
        if tracking is not None:
            summary["command_tracking"], series["tracking"] = tracking
    summary["unscored_chunks"] = summary["chunks"] - (summary["first_action"] or {}).get("frames", 0)
    summary["joint_commands"] = None
    if joint_command_topic is not None:
        joints = joint_command_stats(JointCommands.read(recorded, joint_command_topic), ik_rate_hz)
        joints["ik_final_status"] = last_status(recorded, ik_status_topic) if ik_status_topic else None
        summary["joint_commands"] = joints
    return summary, series


def command_tracking(stream: RecordedStream, published: Sequence[PublishedFrame], source: SourceFrames,
                     rate: float, window: tuple[int, int]):
    """Twist stream vs truth velocity (truth delta / dt) at the bag time of each command in the window."""
    names = [n for n in TWIST_DIM_NAMES if n in (source.dim_names or [])]
    if not names or not published:
        return None
    truth_idx = [source.dim_names.index(n) for n in names]
    twist_idx = [TWIST_DIM_NAMES.index(n) for n in names]
    pub = sorted(published, key=lambda p: p.stamp_ns)
    pub_stamps = [p.stamp_ns for p in pub]
    times, commanded, truth = [], [], []
    for stamp, twist in zip(stream.twist_stamps_ns, stream.twists):
        if not (window[0] <= stamp <= window[1]):
            continue
        k = bisect.bisect_right(pub_stamps, int(stamp)) - 1
        if k < 0:
            continue
        bag_ns = pub[k].original_stamp_ns + int((int(stamp) - pub[k].stamp_ns) * rate)
        value = source.truth_before(bag_ns)
        if value is None:
            continue
        times.append(stamp)
        commanded.append(twist[twist_idx])
        truth.append(np.asarray(value)[truth_idx] / source.dt)
    if not times:
        return None
    c, v = np.stack(commanded), np.stack(truth)
    summary = {"samples": len(times), "dims": names, "unit": "m/s, rad/s",
               "mae": dict(zip(names, mae(c, v).tolist())), "rmse": dict(zip(names, rmse(c, v).tolist()))}
    return summary, {"t": np.asarray(times), "commanded": c, "truth": v, "dims": names}


# --- outputs ----------------------------------------------------------------------------------


def plot_commands(tracking: dict, path: str | Path) -> Path:
    """Commanded twist vs truth velocity per dim over time."""
    t = (tracking["t"] - tracking["t"][0]) * 1e-9
    n = len(tracking["dims"])
    figure = new_figure(10, 1.6 * n + 0.6)
    axes = figure.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        ax.plot(t, tracking["truth"][:, i], color="black", linewidth=1.2, label="truth delta / dt")
        ax.plot(t, tracking["commanded"][:, i], color="tab:orange", linewidth=0.8, label="commanded")
        ax.set_ylabel(tracking["dims"][i])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("time (s)")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_intervals(twist_t: np.ndarray, path: str | Path) -> Path | None:
    """Histogram of the intervals between consecutive commands."""
    if len(twist_t) < 3:
        return None
    figure = new_figure(6, 3.2)
    ax = figure.subplots()
    histogram(ax, np.diff(twist_t.astype(np.float64)) * 1e-6, "tab:purple")
    ax.set_xlabel("interval between commands (ms)")
    ax.set_ylabel("commands")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def report_markdown(summary: dict, plots: dict[str, Path | None]) -> str:
    lines = ["# Closed-loop replay", ""]
    for key, label in (("checkpoint", "Checkpoint"), ("bag", "Bag"), ("recorded_bag", "Recorded outputs"),
                       ("image_topic", "Image topic"), ("truth_topic", "Truth topic"), ("rate", "Playback rate")):
        if summary.get(key) is not None:
            lines.append(f"- {label}: `{summary[key]}`")
    if summary.get("engine"):
        lines.append(f"- Engine: `{summary['engine'].get('name', '?')}`")
    interval, latency = summary["command_interval_ms"], summary["latency_ms"]
    lines += ["", "## Control stream", "", markdown_table(["metric", "value"], [
        ["frames published", summary["frames_published"]], ["chunks", summary["chunks"]],
        ["frames inferred (fraction)", summary["frames_inferred_fraction"]],
        ["commands", summary["commands"]], ["control rate (Hz)", summary["control_rate_hz"]],
        ["target rate (Hz)", summary["control_rate_target_hz"]],
        ["interval mean / std (ms)", f"{_num(interval['mean'])} / {_num(interval['std'])}"],
        ["interval p95 / max (ms)", f"{_num(interval['p95'])} / {_num(interval['max'])}"],
        ["latency image -> chunk p50 / p95 (ms)", f"{_num(latency['p50'])} / {_num(latency['p95'])}"],
        ["underrun fraction (steady state)", summary["underrun_fraction"]],
    ])]
    first = summary.get("first_action")
    if first:
        dims = list(first["mae"])
        lines += ["## First action vs truth", "",
                  f"{first['frames']} chunks scored; L2 mean {_num(first['l2_mean'])}, "
                  f"accuracy (1 - NRMSE) {_num(first['accuracy'])}.", "",
                  markdown_table(["dim", "MAE", "RMSE"], [[d, first["mae"][d], first["rmse"][d]] for d in dims])]
    tracking = summary.get("command_tracking")
    if tracking:
        lines += ["## Commanded twist vs truth velocity", "", f"{tracking['samples']} commands ({tracking['unit']}).", "",
                  markdown_table(["dim", "MAE", "RMSE"],
                                 [[d, tracking["mae"][d], tracking["rmse"][d]] for d in tracking["dims"]])]
    joints = summary.get("joint_commands")
    if joints:
        error = joints["period_error_ms"]
        ik = joints.get("ik_final_status") or {}
        lines += ["## Joint commands (ik_node)", "", markdown_table(["metric", "value"], [
            ["topic", f"`{joints['topic']}` ({joints['msgtype'] or 'nothing recorded'})"],
            ["commands", joints["count"]],
            ["rate / target (Hz)", f"{_num(joints['rate_hz'])} / {_num(joints['target_rate_hz'])}"],
            ["period error p50 / p99 / max (ms)", " / ".join(_num(error[k]) for k in ("p50", "p99", "max"))],
            ["distinct commanded positions", joints["distinct_positions"]],
            ["max step between commands (rad)", _num(joints["max_step_rad"])
             + (f" ({joints['max_step_joint']})" if joints["max_step_joint"] else "")],
            ["ik_node ticks / holds / reseeds",
             # the status lists only counters that have counted something
             " / ".join(ik.get(k, "0") if ik else "–"
                        for k in ("counters.ticks", "counters.hold_ticks", "counters.reseeds"))],
        ])]
    lines += ["## Plots", ""]
    for title, path in plots.items():
        if path is not None:
            lines.append(f"### {title}\n\n![{title}]({Path(path).name})\n")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def write_replay_outputs(summary: dict, series: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """summary.json, report.md and the PNG plots under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path | None] = {}
    if plots:
        result = series.get("first_action")
        if result is not None:
            made["First action vs truth"] = plot_predictions(result, out / PLOT_PREDICTIONS)
            made["First action error"] = plot_error_histograms(result, out / PLOT_ERRORS)
        if "tracking" in series:
            made["Commanded twist vs truth velocity"] = plot_commands(series["tracking"], out / PLOT_COMMANDS)
        made["Command intervals"] = plot_intervals(series["twist_t"], out / PLOT_INTERVALS)
        if series["latencies_ms"]:  # every chunk's latency, scored or not
            latencies = EvalResult(dim_names=[], stamps=np.zeros(0), instructions=[], predictions=np.zeros((0, 0)),
                                   latencies_ms=list(series["latencies_ms"]), tokens=[])
            made["Latency image -> chunk"] = plot_latency(latencies, out / PLOT_LATENCY)
    paths = {"summary": write_summary_json(summary, out / SUMMARY_JSON)}
    report = out / REPORT_MD
    report.write_text(report_markdown(summary, made), encoding="utf-8")
    paths["report"] = report
    paths.update({k: v for k, v in made.items() if v is not None})
    return paths
