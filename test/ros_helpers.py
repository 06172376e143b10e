"""Shared fixtures and helpers for tests that run real rclpy nodes in-process.

Import the fixtures into a test module (``from ros_helpers import ros_env, rclpy_context``) and mark
the tests ``@pytest.mark.ros``.

* `ros_env` (session): a session-unique ``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``
  and ``ROS_LOG_DIR`` under a temp dir, set before any ``rclpy.init`` so parallel test sessions on
  one machine never see each other's topics.
* `rclpy_context`: a fresh ``rclpy.Context`` per test, shut down afterwards. Create nodes with
  ``context=rclpy_context``.
* `spin_in_background(node, context)`: one SingleThreadedExecutor per node on a daemon thread
  (the MultiThreadedExecutor is unreliable with these wheels, see docs/architecture.md).
* `Probe`: a test-side node that records messages from topics (with arrival times), publishes,
  streams messages from a timer, and calls services; `wait_until(predicate, timeout)` polls.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest

# Domain ids 1..100 are valid on every platform and clear of the default 0.
_DOMAIN_RANGE = 100


def session_domain_id(pid: int | None = None) -> int:
    """A ROS_DOMAIN_ID for this test session, derived from the process id (1..100)."""
    return 1 + (os.getpid() if pid is None else pid) % _DOMAIN_RANGE


def configure_ros_environment(log_dir) -> dict:
    """Set the isolation variables (must run before rclpy.init); returns what was set."""
    values = {
        "ROS_DOMAIN_ID": str(session_domain_id()),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOG_DIR": str(log_dir),
    }
    os.environ.update(values)
    return values


@pytest.fixture(scope="session")
def ros_env(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR")}
    values = configure_ros_environment(tmp_path_factory.mktemp("ros_log"))
    yield values
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def rclpy_context(ros_env):
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        rclpy.shutdown(context=context)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


from openvla_ros.nodes.ros_common import SpinningNode  # noqa: E402  (re-exported for tests)


def spin_in_background(node, context) -> SpinningNode:
    return SpinningNode(node, context)


@dataclass
class Received:
    """A message and the monotonic time it arrived at the probe."""

    time: float
    msg: Any


class Probe:
    """Test-side node: record topics, publish, stream from a timer, call services."""

    def __init__(self, context, name: str = "test_probe"):
        import rclpy

        self.node = rclpy.create_node(name, context=context)
        self._lock = threading.Lock()
        self._received: dict[str, list[Received]] = {}
        self._publishers: dict[str, Any] = {}
        self._streams: dict[str, Any] = {}
        self.spinner = spin_in_background(self.node, context)

    # recording -----------------------------------------------------------------------------
    def record(self, msg_type, topic: str, qos=10) -> None:
        with self._lock:
            self._received.setdefault(topic, [])

        def callback(msg, topic=topic):
            with self._lock:
                self._received[topic].append(Received(time.monotonic(), msg))

        self.node.create_subscription(msg_type, topic, callback, qos)

    def received(self, topic: str, since: float | None = None) -> list[Received]:
        with self._lock:
            items = list(self._received[topic])
        return items if since is None else [r for r in items if r.time >= since]

    def messages(self, topic: str, since: float | None = None) -> list:
        return [r.msg for r in self.received(topic, since)]

    def wait_for(self, topic: str, predicate: Callable[[Any], bool] = lambda m: True, timeout: float = 5.0,
                 since: float | None = None):
        """The first message on ``topic`` (after ``since``) satisfying ``predicate``, or None."""
        def find():
            for msg in self.messages(topic, since):
                if predicate(msg):
                    return msg
            return None

        found = wait_until(lambda: find() is not None, timeout)
        return find() if found else None

    # publishing ----------------------------------------------------------------------------
    def publisher(self, msg_type, topic: str, qos=10):
        if topic not in self._publishers:
            self._publishers[topic] = self.node.create_publisher(msg_type, topic, qos)
        return self._publishers[topic]

    def publish(self, msg_type, topic: str, msg, qos=10) -> None:
        self.publisher(msg_type, topic, qos).publish(msg)

    def stream(self, msg_type, topic: str, rate_hz: float, make_msg: Callable[[], Any | None], qos=10) -> None:
        """Publish ``make_msg()`` at ``rate_hz`` from a timer (None: skip this tick)."""
        pub = self.publisher(msg_type, topic, qos)

        def tick():
            msg = make_msg()
            if msg is not None:
                pub.publish(msg)

        self.stop_stream(topic)
        self._streams[topic] = self.node.create_timer(1.0 / rate_hz, tick)

    def stop_stream(self, topic: str) -> None:
        timer = self._streams.pop(topic, None)
        if timer is not None:
            timer.cancel()
            self.node.destroy_timer(timer)

    def now_msg(self):
        return self.node.get_clock().now().to_msg()

    # services ------------------------------------------------------------------------------
    def call(self, srv_type, name: str, request, timeout: float = 5.0):
        """Call a service and wait for the answer (raises AssertionError when none comes)."""
        from openvla_ros.nodes.ros_common import call_service

        try:
            return call_service(self.node, srv_type, name, request, timeout)
        except ValueError as exc:
            raise AssertionError(str(exc)) from None

    def close(self) -> None:
        self.spinner.stop()


@pytest.fixture
def probe(rclpy_context):
    p = Probe(rclpy_context)
    try:
        yield p
    finally:
        p.close()
