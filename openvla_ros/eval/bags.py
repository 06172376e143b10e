"""Reading rosbag2 bags (sqlite3 or mcap) into evaluation frames, with `rosbags` and no ROS.

A *frame* is one camera image with the instruction in force when it was taken and, when the bag
records one, the ground-truth action for it. `read_frames` / `BagFrames` do the work:

1. the instruction, ground-truth and gripper topics are read first (they are small) and sorted by
   stamp;
2. the camera topic is streamed; each image is matched by stamp to those series (`sync`:
   ``nearest`` or ``previous`` sample within ``tolerance`` seconds; ``interpolate`` for pose and
   joint-state truth) and decoded to HxWx3 uint8 RGB;
3. a `SyncReport` counts frames matched and dropped (per reason).

Stamps: messages with a header use ``header.stamp`` (falling back to the time the recorder received
them when the stamp is zero, as simulators without a clock publish); header-less messages
(``std_msgs/String``, ``Float64MultiArray``, ``Float64``) use the receive time. Both are on the
recorder's clock in a normal recording.

Ground truth, chosen by the message type of ``truth_topic`` (read from the bag):

================================  ==================================================================
``geometry_msgs/TwistStamped``    delta = twist * dt, dims dx dy dz droll dpitch dyaw
``trajectory_msgs/JointTrajectory`` (``/vla/action_chunk``) first point's positions, dims = joint_names
``std_msgs/Float64MultiArray``    the data, dims from ``truth_dim_names`` (default: OpenVLA's 7 names)
``geometry_msgs/PoseStamped``     base-frame delta between the pose at t and at t + dt (`poses.py`)
``sensor_msgs/JointState``        as PoseStamped, after ``fk(joint_names, positions) -> 4x4``
any other type (a lab's own)      its numbers in definition order (``truth_fields`` picks some),
                                  dims named by field path (``cmd.0``, ``gripper``)
================================  ==================================================================

Types decode with the definitions the bag stores (`RosBag`), so a lab's own message package need
not be installed; ROS 1 ``.bag`` files read the same way.

``gripper_topic`` (Float64, Float32, Bool or Float64MultiArray[0]) appends a ``gripper`` dimension.
"""
from __future__ import annotations

import bisect
import logging
import sqlite3
import struct
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from openvla_ros.data.msgtypes import MessageTypeError, bag_typestore, numeric_fields
from openvla_ros.imaging import decode_compressed_image, image_fields_to_rgb
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES, DEFAULT_CONTROL_PERIOD_S

from .poses import check_transform, interpolate_pose, pose_delta, pose_matrix

log = logging.getLogger(__name__)

MSG_IMAGE = "sensor_msgs/msg/Image"
MSG_COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
MSG_STRING = "std_msgs/msg/String"
MSG_TWIST_STAMPED = "geometry_msgs/msg/TwistStamped"
MSG_POSE_STAMPED = "geometry_msgs/msg/PoseStamped"
MSG_JOINT_STATE = "sensor_msgs/msg/JointState"
MSG_JOINT_TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
MSG_FLOAT64_ARRAY = "std_msgs/msg/Float64MultiArray"
MSG_FLOAT64 = "std_msgs/msg/Float64"
MSG_FLOAT32 = "std_msgs/msg/Float32"
MSG_BOOL = "std_msgs/msg/Bool"

IMAGE_TYPES = (MSG_IMAGE, MSG_COMPRESSED_IMAGE)
TRUTH_TYPES = (MSG_TWIST_STAMPED, MSG_JOINT_TRAJECTORY, MSG_FLOAT64_ARRAY, MSG_POSE_STAMPED, MSG_JOINT_STATE)
GRIPPER_TYPES = (MSG_FLOAT64, MSG_FLOAT32, MSG_BOOL, MSG_FLOAT64_ARRAY)

SYNC_MODES = ("nearest", "previous", "interpolate")
STAMP_SOURCES = ("header", "receive")

TWIST_DIM_NAMES = tuple(DEFAULT_ACTION_DIM_NAMES[:6])
GRIPPER_DIM_NAME = DEFAULT_ACTION_DIM_NAMES[6]

# Type stores by the names ROS distributions go by ("latest" is the newest the library ships).
TYPESTORE_NAMES = ("humble", "iron", "jazzy", "kilted", "latest")
DEFAULT_TYPESTORE = "kilted"
# ROS 1 bags (one .bag file) decode with ROS 1's types (Noetic's, plus the definitions the bag stores).
ROS1_SUFFIX = ".bag"
ROS1_TYPESTORE = "noetic"
# Key under metadata.yaml custom_data where `bag_writer` records the type store it used.
CUSTOM_DATA_TYPESTORE_KEY = "openvla_ros.typestore"


class BagError(ValueError):
    """A bag cannot be used as asked: missing, corrupt, lacking a topic, or of an unsupported type."""


def _store_value(name: str) -> str:
    key = name.lower()
    if key not in TYPESTORE_NAMES:
        raise BagError(f"unknown type store {name!r}; choose one of {list(TYPESTORE_NAMES)}")
    return "latest" if key == "latest" else f"ros2_{key}"


@lru_cache(maxsize=None)
def get_ros_typestore(name: str = DEFAULT_TYPESTORE):
    """The `rosbags` type store of a ROS 2 distribution (``humble``, ``jazzy``, ``kilted``, ...)."""
    from rosbags.typesys import Stores, get_typestore

    key = name.lower()
    if key not in TYPESTORE_NAMES:
        raise BagError(f"unknown type store {name!r}; choose one of {list(TYPESTORE_NAMES)}")
    store = Stores.LATEST if key == "latest" else Stores[f"ROS2_{key.upper()}"]
    return get_typestore(store)


def normalise_msgtype(name: str) -> str:
    """``pkg/Type`` or ``pkg/msg/Type`` -> ``pkg/msg/Type``."""
    parts = name.strip("/").split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    return "/".join(parts)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "this file is damaged" when raised while reading a bag."""
    import apsw
    from rosbags.rosbag2 import ReaderError
    from rosbags.serde import SerdeError

    return (ReaderError, SerdeError, apsw.Error, sqlite3.Error, struct.error, EOFError, OSError,
            IndexError, KeyError, UnicodeDecodeError, AssertionError, ValueError)


def _stamp_ns(header_stamp, receive_ns: int) -> int:
    ns = int(header_stamp.sec) * 1_000_000_000 + int(header_stamp.nanosec)
    return ns if ns != 0 else int(receive_ns)


@dataclass(frozen=True)
class TopicSummary:
    name: str
    msgtype: str
    count: int

    def __str__(self) -> str:
        return f"{self.name} [{self.msgtype}] x{self.count}"


@dataclass
class BagMessage:
    topic: str
    msgtype: str
    receive_ns: int
    msg: object


@dataclass
class RawBagMessage:
    """A message as stored: CDR bytes (what a player republishes without decoding)."""

    topic: str
    msgtype: str
    receive_ns: int
    data: bytes


class RosBag:
    """An open bag: rosbag2 (directory with metadata.yaml, or a single .db3/.mcap file) or ROS 1 (.bag).

    Messages decode with the type definitions the bag stores (any message package, no install
    needed), falling back to `typestore` (or the distribution the bag names) for types it does not
    store; ROS 1 messages come out as ROS 2 CDR bytes from `raw_messages`.

    Every failure surfaces as `BagError` naming the bag and what is wrong with it.
    """

    def __init__(self, path: str | Path, typestore: str | None = None):
        from rosbags.rosbag1 import Reader as Reader1
        from rosbags.rosbag2 import Reader

        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"bag {str(self.path)!r} does not exist")
        self.is_ros1 = self.path.is_file() and self.path.suffix == ROS1_SUFFIX
        if self.path.is_dir() and not (self.path / "metadata.yaml").exists():
            raise BagError(f"{str(self.path)!r} is not a rosbag2 directory: it has no metadata.yaml")
        try:
            self._reader = Reader1(self.path) if self.is_ros1 else Reader(self.path)
            self._reader.open()
        except BagError:
            raise
        except _storage_errors() as exc:
            raise BagError(f"bag {str(self.path)!r} is corrupt, truncated or unreadable: {exc}") from exc
        self.storage = self._detect_storage()
        if self.is_ros1:
            self.typestore_name = ROS1_TYPESTORE
        else:
            self.typestore_name = typestore or self._typestore_from_metadata()
        try:
            base = "ros1_noetic" if self.is_ros1 else _store_value(self.typestore_name)
            # The definitions the bag stores come first: a lab's own message types read without
            # their package, and a bag from another distribution decodes with the types it was written with.
            self.typestore = bag_typestore(self._reader.connections, base)
        except (BagError, MessageTypeError) as exc:
            self.close()
            raise BagError(f"bag {str(self.path)!r}: {exc}") from None
        self.topics: dict[str, TopicSummary] = {
            name: TopicSummary(name, info.msgtype or "<mixed types>", int(info.msgcount))
            for name, info in self._reader.topics.items()
        }

    def _detect_storage(self) -> str:
        if self.is_ros1:
            return "rosbag1"
        if self.path.is_dir():
            names = [p.suffix for p in self.path.iterdir()]
            return "mcap" if ".mcap" in names else "sqlite3"
        return "mcap" if self.path.suffix == ".mcap" else "sqlite3"

    def _typestore_from_metadata(self) -> str:
        metadata = getattr(self._reader.storage, "metadata", None)
        custom = getattr(metadata, "custom", None) or {}
        for candidate in (custom.get(CUSTOM_DATA_TYPESTORE_KEY), getattr(metadata, "ros_distro", None)):
            if candidate and candidate.lower() in TYPESTORE_NAMES:
                return candidate.lower()
        return DEFAULT_TYPESTORE

    def __enter__(self) -> "RosBag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None and getattr(reader, "is_open", True):  # the ROS 1 reader has no is_open
            self._reader = None
            reader.close()

    def describe_topics(self) -> str:
        return ", ".join(str(t) for t in sorted(self.topics.values(), key=lambda t: t.name)) or "(none)"

    def require_topic(self, name: str, accepted_types: Sequence[str] | None = None, role: str = "topic") -> TopicSummary:
        """The topic `name`, or BagError listing the bag's topics / the accepted types."""
        if name not in self.topics:
            raise BagError(
                f"{role} {name!r} is not in bag {str(self.path)!r}; it has: {self.describe_topics()}"
            )
        summary = self.topics[name]
        if accepted_types is not None and summary.msgtype not in accepted_types:
            raise BagError(
                f"{role} {name!r} in bag {str(self.path)!r} has unsupported message type "
                f"{summary.msgtype!r}; supported: {list(accepted_types)}"
            )
        if summary.msgtype not in self.typestore.types:
            raise BagError(
                f"{role} {name!r} has message type {summary.msgtype!r}: the bag stores no definition of it "
                f"and the {self.typestore_name} type store does not know it"
            )
        return summary

    def topics_of_type(self, msgtypes: Sequence[str]) -> list[str]:
        return sorted(name for name, t in self.topics.items() if t.msgtype in msgtypes)

    def pick_topic(self, name: str | None, msgtypes: Sequence[str], *, kind: str, role: str, how_to_choose: str) -> str:
        """`name` checked against `msgtypes`, or with None the bag's only topic of those types.

        BagError when there is no such topic or several ("bag B has 2 <kind> [...]; <how_to_choose>",
        with the bag's topics), or when `name` is missing or of another type.
        """
        if name is None:
            found = self.topics_of_type(msgtypes)
            if len(found) != 1:
                raise BagError(f"bag {str(self.path)!r} has {len(found)} {kind} {found}; {how_to_choose} "
                               f"(topics: {self.describe_topics()})")
            name = found[0]
        self.require_topic(name, msgtypes, role=role)
        return name

    @property
    def time_range_ns(self) -> tuple[int, int]:
        """(first, last) receive time of the bag's messages, in ns."""
        return int(self._reader.start_time), int(self._reader.end_time)

    def raw_messages(self, topics: Sequence[str], start_ns: int | None = None,
                     stop_ns: int | None = None) -> Iterator[RawBagMessage]:
        """Serialised messages of `topics` received in [start_ns, stop_ns), in the order the bag stores them."""
        for name in topics:
            self.require_topic(name)
        wanted = set(topics)
        connections = [c for c in self._reader.connections if c.topic in wanted]
        if not connections:
            return
        iterator = self._reader.messages(connections=connections, start=start_ns, stop=stop_ns)
        while True:
            try:
                connection, receive_ns, raw = next(iterator)
            except StopIteration:
                return
            except _storage_errors() as exc:
                raise BagError(
                    f"bag {str(self.path)!r} is corrupt or truncated (while reading {sorted(wanted)}): {exc}"
                ) from exc
            if self.is_ros1:  # handed on as CDR like every other bag's (decoded once, re-encoded)
                try:
                    raw = self.typestore.serialize_cdr(self.typestore.deserialize_ros1(raw, connection.msgtype),
                                                       connection.msgtype)
                except _storage_errors() as exc:
                    raise BagError(f"bag {str(self.path)!r}: a {connection.msgtype} on {connection.topic!r} "
                                   f"does not decode: {exc}") from exc
            yield RawBagMessage(connection.topic, connection.msgtype, int(receive_ns), bytes(raw))

    def messages(self, topics: Sequence[str]) -> Iterator[BagMessage]:
        """Deserialised messages of `topics`, in the order the bag stores them."""
        for raw in self.raw_messages(topics):
            try:
                msg = self.typestore.deserialize_cdr(raw.data, raw.msgtype)
            except _storage_errors() as exc:
                raise BagError(
                    f"bag {str(self.path)!r} is corrupt or truncated (a {raw.msgtype} on {raw.topic!r} "
                    f"does not decode): {exc}"
                ) from exc
            yield BagMessage(raw.topic, raw.msgtype, raw.receive_ns, msg)


def list_topics(path: str | Path, typestore: str | None = None) -> list[TopicSummary]:
    """The topics of a bag with their types and message counts, sorted by name."""
    with RosBag(path, typestore) as bag:
        return sorted(bag.topics.values(), key=lambda t: t.name)


# --- frames -------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One camera image with its instruction and (when known) its ground-truth action."""

    stamp: float  # seconds
    image: np.ndarray  # HxWx3 uint8 RGB
    instruction: str
    truth: np.ndarray | None  # (D,) float64 in the truth's dim order, or None
    stamp_ns: int = 0
    index: int = 0  # position of the image on the camera topic


@dataclass
class SyncReport:
    """How many camera frames were matched to an instruction and a ground truth, and why others were not."""

    images: int = 0  # camera messages considered (after stride)
    matched: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {"images": self.images, "matched": self.matched, "dropped": self.dropped_total,
                "dropped_by_reason": dict(self.dropped)}


@dataclass
class BagReadOptions:
    """What to read from a bag and how to match it (the `eval bag` / `train` topic flags)."""

    image_topic: str | None = None  # None: the bag's only Image/CompressedImage topic
    instruction: str | None = None  # fixed instruction for every frame (wins over instruction_topic)
    instruction_topic: str | None = None  # None (and no instruction): the bag's only String topic
    truth_topic: str | None = None  # None: frames carry no ground truth
    gripper_topic: str | None = None
    dt: float | None = None  # seconds each action covers; None: DEFAULT_CONTROL_PERIOD_S
    sync: str = "nearest"
    tolerance: float = 0.05  # seconds
    fk: Callable[[Sequence[str], np.ndarray], np.ndarray] | None = None  # JointState truth
    truth_dim_names: Sequence[str] | None = None  # Float64MultiArray truth
    # Any other truth type (a lab's own message): its numbers in definition order, or only the
    # fields named here (a name selects a field and everything under it: "cmd" -> cmd.0, cmd.1, ...).
    truth_fields: Sequence[str] | None = None
    typestore: str | None = None  # None: from the bag's metadata, else kilted
    stamp_source: str = "header"
    stride: int = 1  # use every n-th camera image
    max_frames: int | None = None

    def validated(self) -> "BagReadOptions":
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {self.sync!r}")
        if self.stamp_source not in STAMP_SOURCES:
            raise ValueError(f"stamp_source must be one of {STAMP_SOURCES}, got {self.stamp_source!r}")
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number of seconds >= 0, got {self.tolerance}")
        dt = DEFAULT_CONTROL_PERIOD_S if self.dt is None else self.dt
        if not (np.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {dt}")
        if int(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.max_frames is not None and int(self.max_frames) < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {self.max_frames}")
        return replace(self, dt=float(dt), stride=int(self.stride))


class _Series:
    """Samples sorted by stamp, looked up with a sync mode and tolerance."""

    def __init__(self, stamps_ns: Sequence[int], values: Sequence):
        order = sorted(range(len(stamps_ns)), key=lambda i: stamps_ns[i])
        self.stamps = [int(stamps_ns[i]) for i in order]
        self.values = [values[i] for i in order]

    def __len__(self) -> int:
        return len(self.stamps)

    def index(self, t_ns: int, mode: str, tol_ns: int) -> int | None:
        """Index of the sample matching `t_ns` (``nearest`` or ``previous``), None if beyond tolerance."""
        pos = bisect.bisect_right(self.stamps, t_ns)  # samples [0, pos) are at or before t
        candidates = []
        if pos > 0:
            candidates.append(pos - 1)
        if mode == "nearest" and pos < len(self.stamps):
            candidates.append(pos)
        best = min(candidates, key=lambda i: abs(self.stamps[i] - t_ns), default=None)
        if best is None or abs(self.stamps[best] - t_ns) > tol_ns:
            return None
        return best

    def bracket(self, t_ns: int, tol_ns: int) -> tuple[int, int, float] | None:
        """(i, j, fraction) with stamps[i] <= t <= stamps[j]; ends extend by the tolerance."""
        if not self.stamps:
            return None
        pos = bisect.bisect_right(self.stamps, t_ns)
        if pos == 0:
            return (0, 0, 0.0) if self.stamps[0] - t_ns <= tol_ns else None
        if pos == len(self.stamps):
            return (pos - 1, pos - 1, 0.0) if t_ns - self.stamps[-1] <= tol_ns else None
        i, j = pos - 1, pos
        span = self.stamps[j] - self.stamps[i]
        return i, j, (t_ns - self.stamps[i]) / span if span else 0.0


def _scalar_of(msg, msgtype: str, topic: str) -> float:
    if msgtype == MSG_FLOAT64_ARRAY:
        if len(msg.data) == 0:
            raise BagError(f"gripper topic {topic!r} has an empty Float64MultiArray")
        return float(msg.data[0])
    if msgtype == MSG_BOOL:
        return 1.0 if msg.data else 0.0
    return float(msg.data)


class BagFrames:
    """The frames of one bag, streamed: topics are checked and side series loaded on construction.

    Iterate to decode images; `report` holds the counts of the last full iteration; `dim_names`
    names the truth dimensions (None without a truth topic).
    """

    def __init__(self, path: str | Path, options: BagReadOptions | None = None):
        self.path = Path(path)
        self.options = (options or BagReadOptions()).validated()
        self.report = SyncReport()
        self.dim_names: list[str] | None = None
        self.truth_kind: str | None = None
        self._instructions: _Series | None = None
        self._truth: _Series | None = None
        self._gripper: _Series | None = None
        with RosBag(self.path, self.options.typestore) as bag:
            self.storage = bag.storage
            self.typestore_name = bag.typestore_name
            self.image_topic = self._pick_image_topic(bag)
            self.image_type = bag.topics[self.image_topic].msgtype
            self.instruction_topic = self._pick_instruction_topic(bag)
            self._load_side_series(bag)
            self.image_count = -(-bag.topics[self.image_topic].count // self.options.stride)

    def __len__(self) -> int:
        """Camera images considered (an upper bound on the number of frames)."""
        if self.options.max_frames is not None:
            return min(self.image_count, int(self.options.max_frames))
        return self.image_count

    # -- set-up

    def _pick_image_topic(self, bag: RosBag) -> str:
        return bag.pick_topic(self.options.image_topic, IMAGE_TYPES, kind="camera topics", role="image topic",
                              how_to_choose="choose one with the image topic option")

    def _pick_instruction_topic(self, bag: RosBag) -> str | None:
        if self.options.instruction is not None:
            if not self.options.instruction.strip():
                raise ValueError("the instruction is empty")
            return None
        return bag.pick_topic(self.options.instruction_topic, (MSG_STRING,), kind="std_msgs/String topics",
                              role="instruction topic", how_to_choose="give an instruction or an instruction topic")

    def _load_side_series(self, bag: RosBag) -> None:
        opts = self.options
        wanted: dict[str, str] = {}
        if self.instruction_topic:
            wanted[self.instruction_topic] = "instruction"
        if opts.truth_topic:
            truth_type = bag.require_topic(opts.truth_topic, None, role="truth topic").msgtype
            if truth_type == MSG_JOINT_STATE and opts.fk is None:
                raise BagError(
                    f"truth topic {opts.truth_topic!r} is sensor_msgs/JointState: pass a kinematics "
                    f"function fk(joint_names, positions) -> 4x4 to turn it into end-effector poses"
                )
            if opts.sync == "interpolate" and truth_type not in (MSG_POSE_STAMPED, MSG_JOINT_STATE):
                raise ValueError(
                    f"sync 'interpolate' applies to PoseStamped/JointState truth, not {truth_type}"
                )
            self.truth_kind = truth_type
            wanted.setdefault(opts.truth_topic, "truth")
        if opts.gripper_topic:
            bag.require_topic(opts.gripper_topic, GRIPPER_TYPES, role="gripper topic")
            if opts.gripper_topic in wanted:
                raise ValueError(f"gripper topic {opts.gripper_topic!r} is also used as another input")
            wanted[opts.gripper_topic] = "gripper"

        collected: dict[str, tuple[list[int], list]] = {topic: ([], []) for topic in wanted}
        for item in bag.messages(list(wanted)):
            stamps, values = collected[item.topic]
            role = wanted[item.topic]
            if role == "instruction":
                stamps.append(item.receive_ns)
                values.append(str(item.msg.data))
            elif role == "gripper":
                stamps.append(self._stamp(item))
                values.append(_scalar_of(item.msg, item.msgtype, item.topic))
            else:
                try:
                    value = self._truth_value(item)
                except BagError:
                    raise
                except ValueError as exc:
                    raise BagError(
                        f"truth message on {item.topic!r} received at {item.receive_ns * 1e-9:.9f} s "
                        f"in {str(self.path)!r} is unusable: {exc}"
                    ) from exc
                if value is not None:
                    stamps.append(self._stamp(item))
                    values.append(value)

        if self.instruction_topic:
            self._instructions = _Series(*collected[self.instruction_topic])
            if not len(self._instructions):
                raise BagError(f"instruction topic {self.instruction_topic!r} has no messages")
        if opts.truth_topic:
            self._truth = _Series(*collected[opts.truth_topic])
            if not len(self._truth):
                raise BagError(f"truth topic {opts.truth_topic!r} has no usable messages")
            self.dim_names = self._truth_dim_names()
        if opts.gripper_topic:
            self._gripper = _Series(*collected[opts.gripper_topic])
            if self.dim_names is not None:
                self.dim_names = self.dim_names + [GRIPPER_DIM_NAME]

    def _stamp(self, item: BagMessage) -> int:
        header = getattr(item.msg, "header", None)
        if self.options.stamp_source == "receive" or header is None:
            return item.receive_ns
        return _stamp_ns(header.stamp, item.receive_ns)

    def _truth_value(self, item: BagMessage):
        msg, kind, topic = item.msg, item.msgtype, item.topic
        if kind == MSG_TWIST_STAMPED:
            t = msg.twist
            return np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])
        if kind == MSG_POSE_STAMPED:
            p, q = msg.pose.position, msg.pose.orientation
            return pose_matrix([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])
        if kind == MSG_JOINT_STATE:
            names = list(msg.name)
            positions = np.asarray(msg.position, dtype=np.float64)
            if len(names) != positions.shape[0]:
                raise BagError(f"JointState on {topic!r} has {len(names)} names but {positions.shape[0]} positions")
            return check_transform(self.options.fk(names, positions), f"fk result for {topic!r}")
        if kind == MSG_JOINT_TRAJECTORY:
            if len(msg.points) == 0:
                return None  # an empty chunk carries no action
            names = tuple(msg.joint_names)
            positions = np.asarray(msg.points[0].positions, dtype=np.float64)
            if len(names) != positions.shape[0]:
                raise BagError(
                    f"JointTrajectory on {topic!r} names {len(names)} dims {list(names)} but its first "
                    f"point has {positions.shape[0]} positions"
                )
            return names, positions
        if kind == MSG_FLOAT64_ARRAY:
            return np.asarray(msg.data, dtype=np.float64).copy()
        return self._generic_truth(msg, topic)

    def _generic_truth(self, msg, topic: str):
        """(field paths, values) of a message type with no rule of its own (see `truth_fields`)."""
        pairs = numeric_fields(msg)
        wanted = self.options.truth_fields
        if wanted:
            pairs = [(n, v) for n, v in pairs if any(n == w or n.startswith(w + ".") for w in wanted)]
            missing = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n, _ in pairs)]
            if missing:
                raise BagError(f"truth topic {topic!r} ({self.truth_kind}) has no numeric field {missing}; "
                               f"its numeric fields: {[n for n, _ in numeric_fields(msg)]}")
        if not pairs:
            raise BagError(f"truth topic {topic!r} ({self.truth_kind}) holds no numbers to use as an action")
        return tuple(n for n, _ in pairs), np.array([v for _, v in pairs], dtype=np.float64)

    def _truth_dim_names(self) -> list[str]:
        values = self._truth.values
        if self.truth_kind in (MSG_TWIST_STAMPED, MSG_POSE_STAMPED, MSG_JOINT_STATE):
            return list(TWIST_DIM_NAMES)
        if self.truth_kind not in TRUTH_TYPES or self.truth_kind == MSG_JOINT_TRAJECTORY:
            names = {v[0] for v in values}
            if len(names) != 1:
                raise BagError(
                    f"truth topic {self.options.truth_topic!r} changes its dim names: {sorted(names)}"
                )
            self._truth.values = [v[1] for v in values]
            return list(names.pop())
        sizes = {v.shape[0] for v in values}
        if len(sizes) != 1:
            raise BagError(f"truth topic {self.options.truth_topic!r} has arrays of sizes {sorted(sizes)}")
        size = sizes.pop()
        names = self.options.truth_dim_names
        if names is None:
            names = DEFAULT_ACTION_DIM_NAMES if size == len(DEFAULT_ACTION_DIM_NAMES) else [f"a{i}" for i in range(size)]
        if len(names) != size:
            raise BagError(f"{len(names)} truth dim names {list(names)} for arrays of {size} values")
        return list(names)

    # -- per frame

    def _instruction_at(self, t_ns: int, tol_ns: int) -> str | None:
        if self.options.instruction is not None:
            return self.options.instruction
        series = self._instructions
        pos = bisect.bisect_right(series.stamps, t_ns)
        if pos > 0:
            return series.values[pos - 1]
        # A latched instruction is often recorded just after the first images were taken.
        if series.stamps[0] - t_ns <= tol_ns:
            return series.values[0]
        return None

    def _pose_at(self, t_ns: int, tol_ns: int) -> np.ndarray | None:
        series = self._truth
        if self.options.sync == "interpolate":
            found = series.bracket(t_ns, tol_ns)
            if found is None:
                return None
            i, j, fraction = found
            return interpolate_pose(series.values[i], series.values[j], fraction)
        i = series.index(t_ns, self.options.sync, tol_ns)
        return None if i is None else series.values[i]

    def _truth_at(self, t_ns: int, tol_ns: int) -> tuple[np.ndarray | None, str | None]:
        """(truth, None) or (None, reason it is missing)."""
        opts = self.options
        if self.truth_kind in (MSG_POSE_STAMPED, MSG_JOINT_STATE):
            start = self._pose_at(t_ns, tol_ns)
            end = self._pose_at(t_ns + int(round(opts.dt * 1e9)), tol_ns)
            if start is None or end is None:
                return None, "no_pose" if start is None else "no_pose_after_dt"
            truth = pose_delta(start, end)
        else:
            i = self._truth.index(t_ns, opts.sync, tol_ns)
            if i is None:
                return None, "no_truth"
            truth = np.array(self._truth.values[i], dtype=np.float64)
            if self.truth_kind == MSG_TWIST_STAMPED:
                truth = truth * opts.dt
        if self._gripper is not None:
            mode = "nearest" if opts.sync == "interpolate" else opts.sync
            g = self._gripper.index(t_ns, mode, tol_ns)
            if g is None:
                return None, "no_gripper"
            truth = np.append(truth, self._gripper.values[g])
        if not np.all(np.isfinite(truth)):
            return None, "non_finite_truth"
        return truth, None

    def _decode(self, msg) -> np.ndarray:
        if self.image_type == MSG_COMPRESSED_IMAGE:
            return decode_compressed_image(msg.format, msg.data)
        return image_fields_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)

    def __iter__(self) -> Iterator[Frame]:
        opts = self.options
        tol_ns = int(round(opts.tolerance * 1e9))
        report = self.report = SyncReport()
        limit = opts.max_frames
        with RosBag(self.path, opts.typestore) as bag:
            for index, item in enumerate(bag.messages([self.image_topic])):
                if index % opts.stride:
                    continue
                if limit is not None and report.matched >= limit:
                    return
                report.images += 1
                t_ns = self._stamp(item)
                instruction = self._instruction_at(t_ns, tol_ns)
                if instruction is None:
                    report.drop("no_instruction")
                    continue
                truth = None
                if self._truth is not None:
                    truth, reason = self._truth_at(t_ns, tol_ns)
                    if truth is None:
                        report.drop(reason)
                        continue
                try:
                    image = self._decode(item.msg)
                except ValueError as exc:
                    raise BagError(f"image {index} on {self.image_topic!r} in {str(self.path)!r}: {exc}") from exc
                report.matched += 1
                yield Frame(stamp=t_ns * 1e-9, image=image, instruction=instruction, truth=truth,
                            stamp_ns=t_ns, index=index)
        log.info("%s: %d of %d frames matched, dropped %s", self.path, report.matched, report.images,
                 report.dropped)


@dataclass
class FrameSet:
    """All frames of one bag in memory, with their truth dim names and sync counts."""

    path: Path
    frames: list[Frame]
    dim_names: list[str] | None
    report: SyncReport
    image_topic: str
    truth_topic: str | None

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    def truths(self) -> np.ndarray:
        """(N, D) ground truth of all frames (error when the bag has none)."""
        if self.dim_names is None:
            raise ValueError(f"bag {str(self.path)!r} was read without a truth topic")
        return np.stack([f.truth for f in self.frames]) if self.frames else np.zeros((0, len(self.dim_names)))


def read_frames(path: str | Path, options: BagReadOptions | None = None) -> FrameSet:
    """Read and match all frames of a bag (see the module docstring)."""
    source = BagFrames(path, options)
    frames = list(source)
    return FrameSet(path=source.path, frames=frames, dim_names=source.dim_names, report=source.report,
                    image_topic=source.image_topic, truth_topic=source.options.truth_topic)
