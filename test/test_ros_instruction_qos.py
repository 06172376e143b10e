"""The instruction topic reaches vla_node from every common publisher, each message once.

Publishers as they are in the wild (profiles read from ros2cli's `ros2topic/verb/pub.py` on its
humble and jazzy branches): `ros2 topic pub` on Humble publishes reliable + transient_local with
depth 1, from Jazzy on with the `default` profile (reliable, volatile, depth 10); both wait for a
matching subscription with `--once`, publish, keep the node alive 0.1 s and exit. Foxglove and
rqt publish reliable + volatile. A latched publisher (sim_node, scripts) is reliable +
transient_local and may publish before vla_node exists. ros2cli itself cannot be installed here,
so `ros2_topic_pub_once` does what its `--once` does with rclpy.
"""
import time

import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.nodes.ros_common import TwoPathDeduplicator, subscribe_volatile_and_latched

TOPIC = "/vla/instruction"
TIMEOUT = 10.0


def profile(name):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    if name == "humble-ros2-topic-pub":  # get_pub_qos_profile() on humble
        return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    if name in ("jazzy-ros2-topic-pub", "foxglove-rqt"):  # QoSPresetProfiles 'default'
        return QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
    if name == "latched":
        return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    raise ValueError(name)


PUBLISHERS = ["humble-ros2-topic-pub", "jazzy-ros2-topic-pub", "foxglove-rqt", "latched"]


def ros2_topic_pub_once(context, qos, text: str, name="ros2_topic_pub"):
    """`ros2 topic pub --once TOPIC std_msgs/msg/String "{data: TEXT}"` as ros2cli runs it."""
    import rclpy
    from std_msgs.msg import String

    node = rclpy.create_node(name, context=context)
    try:
        pub = node.create_publisher(String, TOPIC, qos)
        assert wait_until(lambda: pub.get_subscription_count() >= 1, TIMEOUT), "no matching subscription"
        pub.publish(String(data=text))
        time.sleep(0.1)  # --keep-alive default
    finally:
        node.destroy_node()


class Listener:
    """A node with the instruction subscriptions vla_node makes; records what its callback gets."""

    def __init__(self, context, name="instruction_listener"):
        import rclpy
        from std_msgs.msg import String

        self.got: list[str] = []
        self.node = rclpy.create_node(name, context=context)
        subscribe_volatile_and_latched(self.node, String, TOPIC, lambda msg: self.got.append(msg.data))
        self.spinner = spin_in_background(self.node, context)

    def stop(self):
        self.spinner.stop()


@pytest.fixture
def listener(rclpy_context):
    made = []

    def make():
        made.append(Listener(rclpy_context, name=f"instruction_listener_{len(made)}"))
        return made[-1]

    yield make
    for item in made:
        item.stop()


def settle(listener, count):
    """Wait until `count` messages arrived, then a little longer for a duplicate that should not."""
    assert wait_until(lambda: len(listener.got) >= count, TIMEOUT), listener.got
    time.sleep(0.3)
    return listener.got


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_ros2_topic_pub_once_reaches_a_running_node_exactly_once(rclpy_context, listener, publisher):
    node = listener()
    ros2_topic_pub_once(rclpy_context, profile(publisher), "pick up the screw")
    assert settle(node, 1) == ["pick up the screw"]


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_a_long_lived_publisher_repeating_the_same_text_is_heard_each_time(rclpy_context, listener, probe, publisher):
    from std_msgs.msg import String

    node = listener()
    pub = probe.publisher(String, TOPIC, qos=profile(publisher))
    assert wait_until(lambda: pub.get_subscription_count() >= 1, TIMEOUT)
    for text in ("open the drawer", "open the drawer", "close it"):
        pub.publish(String(data=text))
        time.sleep(0.05)
    assert settle(node, 3) == ["open the drawer", "open the drawer", "close it"]


def test_a_node_started_after_a_latched_instruction_still_gets_it_once(rclpy_context, listener, probe):
    from std_msgs.msg import String

    pub = probe.publisher(String, TOPIC, qos=profile("latched"))
    pub.publish(String(data="stack the cups"))
    time.sleep(0.2)
    node = listener()
    assert settle(node, 1) == ["stack the cups"]
    pub.publish(String(data="unstack them"))
    assert settle(node, 2) == ["stack the cups", "unstack them"]


def test_a_volatile_message_sent_before_the_node_started_is_not_replayed(rclpy_context, listener, probe):
    from std_msgs.msg import String

    pub = probe.publisher(String, TOPIC, qos=profile("foxglove-rqt"))
    pub.publish(String(data="old"))
    time.sleep(0.2)
    node = listener()
    assert wait_until(lambda: pub.get_subscription_count() >= 1, TIMEOUT)
    pub.publish(String(data="new"))
    assert settle(node, 1) == ["new"]


def test_each_publisher_kind_at_once_reaches_the_node_once_per_message(rclpy_context, listener, probe):
    from std_msgs.msg import String

    node = listener()
    pubs = {name: probe.publisher(String, TOPIC, qos=profile(name)) for name in PUBLISHERS}
    assert wait_until(lambda: all(p.get_subscription_count() >= 1 for p in pubs.values()), TIMEOUT)
    for name, pub in pubs.items():
        pub.publish(String(data="same text"))
        pub.publish(String(data=f"from {name}"))
    got = settle(node, 2 * len(PUBLISHERS))
    assert sorted(got) == sorted(["same text"] * len(PUBLISHERS) + [f"from {n}" for n in PUBLISHERS])


# ------------------------------------------------------------------- the de-duplication itself
def test_the_second_copy_on_the_other_path_is_dropped_and_repeats_on_one_path_pass():
    now = [0.0]
    dedup = TwoPathDeduplicator(window_s=2.0, clock=lambda: now[0])
    assert dedup.accept("volatile", "a") is True
    assert dedup.accept("latched", "a") is False  # the same message's copy
    assert dedup.accept("volatile", "a") is True  # sent again: a new message
    assert dedup.accept("volatile", "a") is True
    assert dedup.accept("latched", "a") is False
    assert dedup.accept("latched", "a") is False  # both volatile copies now paired
    assert dedup.accept("latched", "a") is True  # a third latched one is new
    now[0] = 5.0
    assert dedup.accept("volatile", "a") is True  # past the window: not a copy of the old one
    assert dedup.accept("volatile", "b") is True and dedup.accept("latched", "b") is False


# ------------------------------------------------------------------- vla_node itself
@pytest.mark.parametrize("publisher", ["humble-ros2-topic-pub", "jazzy-ros2-topic-pub"])
def test_vla_node_takes_the_readme_instruction_command_once_on_each_distro(rclpy_context, probe, torch_engine,
                                                                           publisher):
    from diagnostic_msgs.msg import DiagnosticArray

    from openvla_ros.nodes.vla_node import make_node

    probe.record(DiagnosticArray, "/vla/status")
    spinner = spin_in_background(make_node(engine=torch_engine, context=rclpy_context), rclpy_context)
    try:
        ros2_topic_pub_once(rclpy_context, profile(publisher), "pick up the screw")

        def status():
            for msg in reversed(probe.messages("/vla/status")):
                values = {kv.key: kv.value for kv in msg.status[0].values}
                if values.get("instruction") == "pick up the screw":
                    return values
        values = wait_until(status, TIMEOUT)
        assert values is not None, "instruction never reached vla_node"
        time.sleep(1.0)  # two more status periods: a duplicate would have been counted by now
        assert status()["instructions"] == "1"
    finally:
        spinner.stop()
