"""Writing rosbag2 bags (sqlite3 or mcap) with `rosbags`, without ROS: demos, test fixtures, recordings.

`BagWriter` builds standard messages from numpy values with header stamps in seconds and stores
them under a chosen type store (``humble``, ``jazzy``, ``kilted``); `write_raw` takes bytes that
rclpy already serialised (the recorder node). Bags it writes are read by `bags.RosBag` and by
``ros2 bag`` on a ROS machine.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from openvla_ros.data.msgtypes import MessageTypeError, register_msg_definitions
from openvla_ros.imaging import encode_compressed_image, rgb_to_image_fields

from .bags import (
    CUSTOM_DATA_TYPESTORE_KEY,
    DEFAULT_TYPESTORE,
    MSG_BOOL,
    MSG_COMPRESSED_IMAGE,
    MSG_FLOAT64,
    MSG_FLOAT64_ARRAY,
    MSG_IMAGE,
    MSG_JOINT_STATE,
    MSG_JOINT_TRAJECTORY,
    MSG_POSE_STAMPED,
    MSG_STRING,
    MSG_TWIST_STAMPED,
    BagError,
    get_ros_typestore,
    normalise_msgtype,
)

STORAGES = ("sqlite3", "mcap")


def seconds_to_ns(stamp: float) -> int:
    """Integer nanoseconds of a stamp in seconds (rejects NaN/inf and negatives)."""
    if not (isinstance(stamp, (int, float, np.floating, np.integer)) and math.isfinite(stamp) and stamp >= 0):
        raise ValueError(f"stamp must be a finite number of seconds >= 0, got {stamp!r}")
    return int(round(float(stamp) * 1e9))


def _vector(values, size: int | None, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if size is not None and array.shape[0] != size:
        raise ValueError(f"{what} must have {size} values, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite, got {array.tolist()}")
    return array


class BagWriter:
    """A new rosbag2 bag; use as a context manager (the bag is complete once closed).

    Stamps are seconds. `receive_time` (the bag's own timestamp of a message) defaults to the
    header stamp, or to the given stamp for header-less messages.
    """

    def __init__(self, path: str | Path, storage: str = "sqlite3", typestore: str = DEFAULT_TYPESTORE,
                 message_definitions: Mapping[str, str] | None = None):
        """`message_definitions` maps custom types (``pkg/msg/Type``) to their ``.msg`` text; a type
        neither it nor the type store has is looked up in the installed packages (AMENT_PREFIX_PATH).
        The definitions go into the bag, so readers need no package either."""
        from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.path = Path(path)
        self.storage = storage
        self.typestore_name = typestore.lower()
        self.typestore = get_ros_typestore(self.typestore_name)
        self._own_store = False
        if message_definitions:
            self.register_types(message_definitions)
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        try:
            self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        except WriterError as exc:
            raise BagError(f"cannot write bag {str(self.path)!r}: {exc}") from exc
        self._writer.set_custom_data(CUSTOM_DATA_TYPESTORE_KEY, self.typestore_name)
        self._connections: dict[str, object] = {}
        self._open = False
        self.counts: dict[str, int] = {}

    def open(self) -> "BagWriter":
        from rosbags.rosbag2 import WriterError

        try:
            self._writer.open()
        except WriterError as exc:
            raise BagError(f"cannot write bag {str(self.path)!r}: {exc}") from exc
        self._open = True
        return self

    def close(self) -> None:
        if self._open:
            self._writer.close()
            self._open = False

    def __enter__(self) -> "BagWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # -- generic

    def _connection(self, topic: str, msgtype: str):
        known = self._connections.get(topic)
        if known is not None:
            if known.msgtype != msgtype:
                raise ValueError(f"topic {topic!r} already holds {known.msgtype}, cannot add {msgtype}")
            return known
        if msgtype not in self.typestore.types:
            try:
                self.register_types({}, wanted=[msgtype])
            except MessageTypeError as exc:
                raise BagError(f"bag {str(self.path)!r}, topic {topic!r}: {exc} (not in the {self.typestore_name} "
                               f"type store either)") from None
        connection = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
        self._connections[topic] = connection
        return connection

    def register_types(self, definitions: Mapping[str, str], wanted: Sequence[str] = ()) -> list[str]:
        """Add message types from ``.msg`` text (see `__init__`); returns the types added."""
        if not self._own_store:  # the distribution's store is shared: extend a copy of it
            from rosbags.typesys import Stores, get_typestore

            own = get_typestore(Stores.EMPTY)
            own.register(dict(self.typestore.fielddefs))
            self.typestore, self._own_store = own, True
        return register_msg_definitions(self.typestore, {normalise_msgtype(k): v for k, v in definitions.items()},
                                        wanted=[normalise_msgtype(w) for w in wanted])

    def write_raw(self, topic: str, msgtype: str, receive_ns: int, data: bytes) -> None:
        """Store already-serialised CDR bytes (e.g. from `rclpy.serialization.serialize_message`)."""
        if not self._open:
            raise ValueError(f"bag {str(self.path)!r} is not open")
        msgtype = normalise_msgtype(msgtype)
        self._writer.write(self._connection(topic, msgtype), int(receive_ns), bytes(data))
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def write_message(self, topic: str, msgtype: str, msg, receive_time: float) -> None:
        """Serialise a message object of this writer's type store and store it."""
        msgtype = normalise_msgtype(msgtype)
        raw = self.typestore.serialize_cdr(msg, msgtype)
        self.write_raw(topic, msgtype, seconds_to_ns(receive_time), raw)

    def _type(self, msgtype: str):
        return self.typestore.types[msgtype]

    def header(self, stamp: float, frame_id: str = ""):
        ns = seconds_to_ns(stamp)
        time = self._type("builtin_interfaces/msg/Time")(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        return self._type("std_msgs/msg/Header")(stamp=time, frame_id=frame_id)

    # -- message builders

    def write_image(self, topic: str, stamp: float, image, encoding: str = "rgb8", frame_id: str = "camera",
                    row_padding: int = 0, receive_time: float | None = None) -> None:
        """sensor_msgs/Image from an HxWx3 RGB uint8 array (HxW for mono8)."""
        fields = rgb_to_image_fields(image, encoding, row_padding)
        msg = self._type(MSG_IMAGE)(
            header=self.header(stamp, frame_id), height=fields.height, width=fields.width,
            encoding=fields.encoding, is_bigendian=fields.is_bigendian, step=fields.step, data=fields.data,
        )
        self.write_message(topic, MSG_IMAGE, msg, stamp if receive_time is None else receive_time)

    def write_compressed_image(self, topic: str, stamp: float, image, codec: str = "jpeg",
                               jpeg_quality: int = 95, frame_id: str = "camera",
                               receive_time: float | None = None) -> None:
        """sensor_msgs/CompressedImage (jpeg or png) from an HxWx3 RGB uint8 array."""
        fmt, data = encode_compressed_image(image, codec, jpeg_quality)
        msg = self._type(MSG_COMPRESSED_IMAGE)(header=self.header(stamp, frame_id), format=fmt, data=data)
        self.write_message(topic, MSG_COMPRESSED_IMAGE, msg, stamp if receive_time is None else receive_time)

    def write_string(self, topic: str, stamp: float, text: str) -> None:
        """std_msgs/String stored at `stamp` (it has no header)."""
        self.write_message(topic, MSG_STRING, self._type(MSG_STRING)(data=str(text)), stamp)

    def write_float64(self, topic: str, stamp: float, value: float) -> None:
        value = _vector([value], 1, "Float64 value")[0]
        self.write_message(topic, MSG_FLOAT64, self._type(MSG_FLOAT64)(data=float(value)), stamp)

    def write_bool(self, topic: str, stamp: float, value: bool) -> None:
        self.write_message(topic, MSG_BOOL, self._type(MSG_BOOL)(data=bool(value)), stamp)

    def write_float64_array(self, topic: str, stamp: float, values: Sequence[float]) -> None:
        """std_msgs/Float64MultiArray with an empty layout, stored at `stamp`."""
        layout = self._type("std_msgs/msg/MultiArrayLayout")(dim=[], data_offset=0)
        msg = self._type(MSG_FLOAT64_ARRAY)(layout=layout, data=_vector(values, None, "array"))
        self.write_message(topic, MSG_FLOAT64_ARRAY, msg, stamp)

    def write_twist(self, topic: str, stamp: float, linear, angular, frame_id: str = "base",
                    receive_time: float | None = None) -> None:
        """geometry_msgs/TwistStamped (m/s, rad/s)."""
        vec = self._type("geometry_msgs/msg/Vector3")
        lin, ang = _vector(linear, 3, "linear velocity"), _vector(angular, 3, "angular velocity")
        twist = self._type("geometry_msgs/msg/Twist")(linear=vec(*lin), angular=vec(*ang))
        msg = self._type(MSG_TWIST_STAMPED)(header=self.header(stamp, frame_id), twist=twist)
        self.write_message(topic, MSG_TWIST_STAMPED, msg, stamp if receive_time is None else receive_time)

    def write_pose(self, topic: str, stamp: float, position, quat_xyzw, frame_id: str = "base",
                   receive_time: float | None = None) -> None:
        """geometry_msgs/PoseStamped from a position and an (x, y, z, w) quaternion."""
        p, q = _vector(position, 3, "position"), _vector(quat_xyzw, 4, "quaternion")
        pose = self._type("geometry_msgs/msg/Pose")(
            position=self._type("geometry_msgs/msg/Point")(*p),
            orientation=self._type("geometry_msgs/msg/Quaternion")(*q),
        )
        msg = self._type(MSG_POSE_STAMPED)(header=self.header(stamp, frame_id), pose=pose)
        self.write_message(topic, MSG_POSE_STAMPED, msg, stamp if receive_time is None else receive_time)

    def write_joint_state(self, topic: str, stamp: float, names: Sequence[str], positions,
                          velocities=None, efforts=None, receive_time: float | None = None) -> None:
        """sensor_msgs/JointState (velocities/efforts empty unless given)."""
        n = len(names)
        msg = self._type(MSG_JOINT_STATE)(
            header=self.header(stamp),
            name=[str(x) for x in names],
            position=_vector(positions, n, "joint positions"),
            velocity=np.zeros(0) if velocities is None else _vector(velocities, n, "joint velocities"),
            effort=np.zeros(0) if efforts is None else _vector(efforts, n, "joint efforts"),
        )
        self.write_message(topic, MSG_JOINT_STATE, msg, stamp if receive_time is None else receive_time)

    def write_joint_trajectory(self, topic: str, stamp: float, joint_names: Sequence[str], points,
                               dt: float, frame_id: str = "", receive_time: float | None = None) -> None:
        """trajectory_msgs/JointTrajectory with one point per row of `points`, point i at i*dt.

        This is the layout of `/vla/action_chunk` (joint_names = action dims, stamp = observation).
        """
        rows = np.asarray(points, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != len(joint_names):
            raise ValueError(f"points must be (K, {len(joint_names)}) for names {list(joint_names)}, got {rows.shape}")
        if not np.all(np.isfinite(rows)) or not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"trajectory points and dt must be finite (dt={dt})")
        point_type = self._type("trajectory_msgs/msg/JointTrajectoryPoint")
        duration = self._type("builtin_interfaces/msg/Duration")
        empty = np.zeros(0)
        msg_points = []
        for i, row in enumerate(rows):
            ns = int(round(i * dt * 1e9))
            msg_points.append(point_type(
                positions=row.copy(), velocities=empty, accelerations=empty, effort=empty,
                time_from_start=duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000),
            ))
        msg = self._type(MSG_JOINT_TRAJECTORY)(header=self.header(stamp, frame_id),
                                               joint_names=[str(x) for x in joint_names], points=msg_points)
        self.write_message(topic, MSG_JOINT_TRAJECTORY, msg, stamp if receive_time is None else receive_time)
