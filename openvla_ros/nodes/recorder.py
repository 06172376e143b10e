"""recorder: records live topics into rosbag2 bags (sqlite3 or mcap), one new bag per episode.

    ros2 run openvla_ros recorder --ros-args --params-file config/recorder.yaml \\
        -p "topics:=['/camera/image_raw', '/vla/eef_delta:geometry_msgs/msg/TwistStamped']"
    ros2 service call /recorder/start std_srvs/srv/Trigger   # new bag under out_dir
    ros2 service call /recorder/stop std_srvs/srv/Trigger    # closes it; the reply names it

Messages are taken raw (serialised CDR, never deserialised) with their receive time on the node's
clock. A topic is subscribed once it has a publisher, with the publishers' QoS (best effort when
any publisher is best effort, transient_local when all are, as ``ros2 bag record`` does); its type
comes from the graph unless given as ``name:pkg/msg/Type``. Episode naming, latched-topic carry-over
and error counting live in `openvla_ros.eval.recording`.
"""
from __future__ import annotations

from ..eval.bag_writer import STORAGES
from ..eval.bags import DEFAULT_TYPESTORE, TYPESTORE_NAMES, normalise_msgtype
from ..eval.recording import DEFAULT_NAME_PATTERN, EpisodeRecorder
from .bag_player import message_class
from .params import ParamSpec, declare_parameters

NODE_NAME = "recorder"

PARAMS = [
    ParamSpec("topics", [], "topics to record: 'name' (type from the graph) or 'name:pkg/msg/Type'", read_only=True),
    ParamSpec("out_dir", "bags", "directory that receives one bag directory per episode", read_only=True),
    ParamSpec("name_pattern", DEFAULT_NAME_PATTERN, "episode bag name; {index} = next free number, {time} = start time",
              read_only=True),
    ParamSpec("storage", "mcap", "rosbag2 storage", choices=STORAGES, read_only=True),
    ParamSpec("typestore", DEFAULT_TYPESTORE, "ROS 2 distribution whose message definitions go into the bag",
              choices=TYPESTORE_NAMES, read_only=True),
    ParamSpec("start_recording", False, "start the first episode right away (else call ~/start)", read_only=True),
    ParamSpec("discovery_period_s", 0.5, "how often topics without a publisher yet are looked up", "s",
              min=0.01, max=60.0, read_only=True),
]


def parse_topic_specs(entries) -> dict[str, str | None]:
    """``['/a', '/b:pkg/msg/T']`` -> ``{'/a': None, '/b': 'pkg/msg/T'}`` (ValueError on a malformed entry)."""
    specs: dict[str, str | None] = {}
    for entry in entries:
        name, _, msgtype = str(entry).partition(":")
        name, msgtype = name.strip(), msgtype.strip()
        if not name.startswith("/") or " " in name:
            raise ValueError(f"topic entry {entry!r}: the name must be absolute, e.g. '/camera/image_raw'")
        if ":" in str(entry) and msgtype.count("/") not in (1, 2):
            raise ValueError(f"topic entry {entry!r}: the type must look like pkg/msg/Type")
        if name in specs:
            raise ValueError(f"topic {name!r} is listed twice")
        specs[name] = normalise_msgtype(msgtype) if msgtype else None
    if not specs:
        raise ValueError("parameter 'topics' is empty: list the topics to record")
    return specs


def _make_node_class():
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_srvs.srv import Trigger

    class RecorderNode(Node):
        def __init__(self, **node_kwargs):
            super().__init__(NODE_NAME, **node_kwargs)
            self.params = p = declare_parameters(self, PARAMS)
            self.wanted = parse_topic_specs(p["topics"])
            self.recorder = EpisodeRecorder(p["out_dir"], p["name_pattern"], p["storage"], p["typestore"],
                                            clock_ns=lambda: self.get_clock().now().nanoseconds)
            self.subscribed: dict[str, str] = {}  # topic -> type
            self.readers: dict = {}  # topic -> rclpy Subscription (its get_publisher_count() tells matching)
            self._qos = (QoSProfile, ReliabilityPolicy, DurabilityPolicy)
            self.create_service(Trigger, "~/start", self._on_start)
            self.create_service(Trigger, "~/stop", self._on_stop)
            self.create_timer(p["discovery_period_s"], self._discover)
            self._discover()
            if p["start_recording"]:
                self.start_episode()
            self.get_logger().info(f"recorder ready: {sorted(self.wanted)} -> {p['out_dir']} ({p['storage']})")

        # topics ------------------------------------------------------------------------------
        def _discover(self) -> None:
            missing = [t for t in self.wanted if t not in self.subscribed]
            if not missing:
                return
            graph = dict(self.get_topic_names_and_types())
            for topic in missing:
                publishers = self.get_publishers_info_by_topic(topic)
                if not publishers:
                    continue  # subscribe once a publisher exists, so its QoS can be matched
                msgtype = self.wanted[topic] or (graph.get(topic) or [None])[0]
                if msgtype is None:
                    continue
                try:
                    self._subscribe(topic, normalise_msgtype(msgtype), publishers)
                except ValueError as exc:
                    self.get_logger().error(f"cannot record {topic}: {exc}", throttle_duration_sec=10.0)

        def _subscribe(self, topic: str, msgtype: str, publishers) -> None:
            QoSProfile, ReliabilityPolicy, DurabilityPolicy = self._qos
            qos = QoSProfile(depth=100)
            offered = [info.qos_profile for info in publishers]
            best_effort = any(q.reliability == ReliabilityPolicy.BEST_EFFORT for q in offered)
            latched = all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offered)
            qos.reliability = ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE
            qos.durability = DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE
            if latched:
                self.recorder.latched_topics.add(topic)
            cls = message_class(msgtype)

            def on_message(data: bytes, topic=topic, msgtype=msgtype) -> None:
                self.recorder.write(topic, msgtype, self.get_clock().now().nanoseconds, data)

            self.readers[topic] = self.create_subscription(cls, topic, on_message, qos, raw=True)
            self.subscribed[topic] = msgtype
            self.get_logger().info(f"recording {topic} [{msgtype}]"
                                   f"{' (latched)' if latched else ''}{' (best effort)' if best_effort else ''}")

        # episodes ----------------------------------------------------------------------------
        def start_episode(self):
            path = self.recorder.start()
            self.get_logger().info(f"recording into {path}")
            return path

        def stop_episode(self):
            summary = self.recorder.stop()
            self.get_logger().info(f"recorded {summary.describe()}")
            return summary

        def _on_start(self, request, response):
            try:
                response.message = str(self.start_episode())
                response.success = True
            except ValueError as exc:
                response.success, response.message = False, str(exc)
            return response

        def _on_stop(self, request, response):
            try:
                response.message = self.stop_episode().describe()
                response.success = True
            except ValueError as exc:
                response.success, response.message = False, str(exc)
            return response

        def close(self):
            summary = self.recorder.close()
            if summary is not None:
                self.get_logger().info(f"recorded {summary.describe()}")

    return RecorderNode


def make_node(**node_kwargs):
    """Build the node (rclpy must be initialised)."""
    return _make_node_class()(**node_kwargs)


def main(args=None) -> int:
    from .ros_common import spin_node

    return spin_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
