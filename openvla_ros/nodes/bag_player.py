"""bag_player: publishes a rosbag2 bag's camera and instruction topics on their original timeline.

    ros2 run openvla_ros bag_player --ros-args --params-file config/bag_player.yaml -p bag:=/path/to/bag

The bytes recorded in the bag are published as they are (rclpy publishes serialised CDR), with
header stamps rewritten per `stamp_mode`; topic names are the bag's, so ``-r /cam:=/camera/image_raw``
remaps them. std_msgs/String topics (the instruction) are latched (reliable + transient_local).
All timing logic lives in `openvla_ros.eval.playback`; this node runs it on its own thread.
"""
from __future__ import annotations

import importlib
import threading
import time

from ..eval.playback import STAMP_MODES, BagPlayback, PlaybackMessage, PlaybackOptions
from .params import ParamSpec, declare_parameters

NODE_NAME = "bag_player"

PARAMS = [
    ParamSpec("bag", "", "rosbag2 directory (sqlite3 or mcap) or single .db3/.mcap file", read_only=True),
    ParamSpec("topics", [], "topics to publish (empty: every Image, CompressedImage and std_msgs/String topic)", read_only=True),
    ParamSpec("latched_topics", [], "topics published reliable + transient_local (empty: the std_msgs/String ones)", read_only=True),
    ParamSpec("rate", 1.0, "playback speed factor (2.0 = twice as fast)", min=0.01, max=100.0, read_only=True),
    ParamSpec("start_offset_s", 0.0, "skip this much of the bag's beginning", "s", min=0.0, read_only=True),
    ParamSpec("loop", False, "start again after the last message", read_only=True),
    ParamSpec("stamp_mode", "now", "header stamps: time of publishing, original shifted to now, or kept",
              choices=STAMP_MODES, read_only=True),
    ParamSpec("publish_clock", False, "publish the bag time on /clock (pair with stamp_mode keep and use_sim_time)", read_only=True),
    ParamSpec("clock_rate_hz", 100.0, "rate of /clock", "Hz", min=1.0, max=1000.0, read_only=True),
    ParamSpec("wait_for_subscribers_s", 0.0, "wait up to this long for a subscriber on every non-latched topic before playing",
              "s", min=0.0, max=600.0, read_only=True),
    ParamSpec("typestore", "", "ROS 2 type store of the bag: humble, jazzy, kilted (empty: from the bag)", read_only=True),
]


def message_class(msgtype: str):
    """The rclpy message class of ``pkg/msg/Type`` (ValueError naming the type when it is not installed)."""
    parts = msgtype.strip("/").split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"message type {msgtype!r} is not of the form pkg/msg/Type")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError):
        raise ValueError(f"message type {msgtype!r} is not installed for rclpy") from None


def _make_node_class():
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock

    from .ros_common import latched_qos

    class BagPlayerNode(Node):
        def __init__(self, on_published=None, clock=time.monotonic, **node_kwargs):
            """`on_published(PlaybackMessage)` is called after each publish (playback thread; in-process users)."""
            super().__init__(NODE_NAME, **node_kwargs)
            self.params = p = declare_parameters(self, PARAMS)
            if not p["bag"]:
                raise ValueError("parameter 'bag' is empty: set it to a rosbag2 directory")
            options = PlaybackOptions(topics=p["topics"] or None, latched_topics=p["latched_topics"] or None,
                                      rate=p["rate"], start_offset_s=p["start_offset_s"], loop=p["loop"],
                                      stamp_mode=p["stamp_mode"], typestore=p["typestore"] or None)
            self.playback = BagPlayback(p["bag"], options, clock=clock,
                                        now_ns=lambda: self.get_clock().now().nanoseconds)
            self._on_published = on_published
            self._wait_clock = clock
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            self._publishers_by_topic = {
                topic: self.create_publisher(message_class(msgtype), topic,
                                             latched_qos() if topic in self.playback.latched else reliable)
                for topic, msgtype in self.playback.topics.items()}
            self._clock_pub = None
            if p["publish_clock"]:
                self._clock_pub = self.create_publisher(Clock, "/clock", QoSProfile(depth=10))
                self._clock_cls = Clock
                self.create_timer(1.0 / p["clock_rate_hz"], self._on_clock)
            self.error: BaseException | None = None
            self._thread = threading.Thread(target=self._play, name="bag_player", daemon=True)
            self._thread.start()
            self.get_logger().info(
                f"playing {p['bag']} at x{p['rate']:g}: {', '.join(sorted(self.playback.topics))}"
                f" (latched: {self.playback.latched or 'none'}, stamps: {p['stamp_mode']})")

        @property
        def finished(self) -> threading.Event:
            return self.playback.finished

        def _wait_for_subscribers(self) -> None:
            timeout = self.params["wait_for_subscribers_s"]
            waiting = [t for t in self._publishers_by_topic if t not in self.playback.latched]
            deadline = self._wait_clock() + timeout
            while waiting and self._wait_clock() < deadline and not self.playback.stop_requested:
                waiting = [t for t in waiting if self._publishers_by_topic[t].get_subscription_count() == 0]
                time.sleep(0.02)
            if waiting and timeout > 0:
                self.get_logger().warning(f"no subscriber on {waiting} after {timeout:g} s; playing anyway")

        def _play(self) -> None:
            try:
                self._wait_for_subscribers()
                count = self.playback.run(self._publish)
                self.get_logger().info(f"finished: {count} messages published")
            except Exception as exc:  # noqa: BLE001 - reported on the log and kept for in-process callers
                self.error = exc
                self.get_logger().error(f"playback failed: {exc}")

        def _publish(self, message: PlaybackMessage) -> None:
            self._publishers_by_topic[message.topic].publish(message.data)
            if self._on_published is not None:
                self._on_published(message)

        def _on_clock(self) -> None:
            ns = self.playback.bag_time_ns()
            if ns is None:
                return
            msg = self._clock_cls()
            msg.clock.sec, msg.clock.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
            self._clock_pub.publish(msg)

        def close(self) -> None:
            self.playback.stop()
            self._thread.join(timeout=5.0)

    return BagPlayerNode


def make_node(on_published=None, **node_kwargs):
    """Build the node (rclpy must be initialised); playback starts on its own thread right away."""
    return _make_node_class()(on_published=on_published, **node_kwargs)


def main(args=None) -> int:
    from .ros_common import spin_node

    return spin_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
