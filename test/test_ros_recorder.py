"""recorder with real rclpy: live topics into rosbag2 episodes that read_frames reads back."""
import time

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, spin_in_background, wait_until  # noqa: F401

from openvla_ros.eval.bags import RosBag, read_frames
from openvla_ros.imaging import rgb_to_image_fields
from openvla_ros.nodes.ros_common import latched_qos

pytestmark = pytest.mark.ros


def _image(probe, value):
    from sensor_msgs.msg import Image

    fields = rgb_to_image_fields(np.full((4, 6, 3), value, np.uint8), "rgb8")
    msg = Image(height=fields.height, width=fields.width, encoding=fields.encoding, step=fields.step,
                data=fields.data.tobytes())
    msg.header.stamp = probe.now_msg()
    return msg


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_records_episodes_that_read_back(rclpy_context, probe, tmp_path, storage):
    from geometry_msgs.msg import TwistStamped
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from openvla_ros.nodes.recorder import make_node

    # Publishers first: the recorder takes the image type from the graph, the twist's from the entry.
    probe.publisher(Image, "/camera/image_raw")
    probe.publisher(TwistStamped, "/expert/twist")
    probe.publish(String, "/vla/instruction", String(data="reach the red cube"), qos=latched_qos())
    node = make_node(context=rclpy_context, parameter_overrides=[
        Parameter("topics", value=["/camera/image_raw", "/vla/instruction:std_msgs/String",
                                   "/expert/twist:geometry_msgs/msg/TwistStamped"]),
        Parameter("out_dir", value=str(tmp_path / "eps")), Parameter("storage", value=storage),
        Parameter("discovery_period_s", value=0.05)])
    spinner = spin_in_background(node, rclpy_context)
    try:
        assert wait_until(lambda: len(node.subscribed) == 3, 5.0), node.subscribed
        # Matching is asynchronous on each side: both the writers and the recorder's readers must
        # have matched, or a first (volatile) message can be lost in discovery.
        for msg_type, topic in ((Image, "/camera/image_raw"), (TwistStamped, "/expert/twist")):
            assert wait_until(lambda: probe.publisher(msg_type, topic).get_subscription_count() > 0, 5.0), topic
            assert wait_until(lambda: node.readers[topic].get_publisher_count() > 0, 5.0), topic
        # The latched instruction is delivered asynchronously after matching; episodes open with it.
        assert wait_until(lambda: node.recorder.has_latched("/vla/instruction"), 5.0)
        reply = probe.call(Trigger, "/recorder/stop", Trigger.Request())
        assert not reply.success and "not recording" in reply.message
        paths = []
        for episode, values in enumerate(([10, 20, 30], [40, 50])):
            reply = probe.call(Trigger, "/recorder/start", Trigger.Request())
            assert reply.success, reply.message
            paths.append(reply.message)
            for v in values:
                probe.publish(Image, "/camera/image_raw", _image(probe, v))
                twist = TwistStamped()
                twist.header.stamp = probe.now_msg()
                twist.twist.linear.x = v / 100.0
                probe.publish(TwistStamped, "/expert/twist", twist)
                time.sleep(0.05)
            time.sleep(0.2)
            reply = probe.call(Trigger, "/recorder/stop", Trigger.Request())
            assert reply.success and paths[-1] in reply.message
    finally:
        spinner.stop()

    assert [p.rsplit("/", 1)[1] for p in paths] == ["episode_0000", "episode_0001"]
    for path, values in zip(paths, ([10, 20, 30], [40, 50])):
        from openvla_ros.eval.bags import BagReadOptions

        # Every episode holds the instruction published once before either began (latched carry-over).
        frames = read_frames(path, BagReadOptions(truth_topic="/expert/twist", dt=0.5, tolerance=0.04))
        assert [int(f.image[0, 0, 0]) for f in frames] == values
        assert {f.instruction for f in frames} == {"reach the red cube"}
        np.testing.assert_allclose([f.truth[0] for f in frames], [v / 100.0 * 0.5 for v in values])
        with RosBag(path) as bag:
            assert bag.storage == storage
            assert bag.topics["/camera/image_raw"].msgtype == "sensor_msgs/msg/Image"


def test_bad_topic_entries_are_clear_errors(rclpy_context, tmp_path):
    from rclpy.parameter import Parameter

    from openvla_ros.nodes.recorder import make_node

    with pytest.raises(ValueError, match="absolute"):
        make_node(context=rclpy_context, parameter_overrides=[Parameter("topics", value=["camera"])])
    with pytest.raises(ValueError, match="'topics' is empty"):
        make_node(context=rclpy_context)
