"""Bags with message types this package has no rule for: a lab's own types and ROS 1 bags.

The bags are written here with `rosbags` (custom types registered from .msg text) and read back
through the definitions they store, without any package of those types.
"""
from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.data.msgtypes import MessageTypeError, bag_typestore, find_msg_definition, numeric_fields
from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import BagError, BagReadOptions, RosBag, read_frames

ARM_CMD = "lab_msgs/msg/ArmCommand"
ARM_CMD_MSG = """std_msgs/Header header
float64[6] delta
lab_msgs/Grip grip
string note
"""
GRIP_MSG = "float32 opening\nbool closed\n"
CAM = "/camera/image_raw"


def _write_lab_bag(path, storage="sqlite3", n=5):
    images = [np.full((8, 10, 3), (10 * i, 200 - 10 * i, 7), dtype=np.uint8) for i in range(n)]
    deltas = [np.arange(6, dtype=np.float64) * 0.01 * (i + 1) for i in range(n)]
    with BagWriter(path, storage, "jazzy", message_definitions={ARM_CMD: ARM_CMD_MSG, "lab_msgs/msg/Grip": GRIP_MSG}) as w:
        w.write_string("/vla/instruction", 0.5, "stack the cups")
        cmd, grip = w.typestore.types[ARM_CMD], w.typestore.types["lab_msgs/msg/Grip"]
        for i in range(n):
            t = 1.0 + 0.2 * i
            w.write_image(CAM, t, images[i])
            msg = cmd(header=w.header(t), delta=deltas[i], grip=grip(opening=0.25 * i, closed=i % 2 == 1), note="x")
            w.write_message("/lab/arm_command", ARM_CMD, msg, t)
    return images, deltas


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_bag_with_a_custom_message_type_reads_through_the_definitions_it_stores(tmp_path, storage):
    images, deltas = _write_lab_bag(tmp_path / "bag", storage)
    with RosBag(tmp_path / "bag") as bag:
        assert bag.topics["/lab/arm_command"].msgtype == ARM_CMD
        assert ARM_CMD in bag.typestore.types  # from the bag, not from an installed package
    frames = read_frames(tmp_path / "bag", BagReadOptions(truth_topic="/lab/arm_command"))
    assert frames.dim_names == [f"delta.{i}" for i in range(6)] + ["grip.opening", "grip.closed"]
    assert len(frames) == 5
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.image, images[i])
        np.testing.assert_allclose(frame.truth[:6], deltas[i])
        assert frame.truth[6] == pytest.approx(0.25 * i)
        assert frame.truth[7] == (1.0 if i % 2 else 0.0)


def test_truth_fields_pick_the_action_out_of_a_custom_message(tmp_path):
    _, deltas = _write_lab_bag(tmp_path / "bag")
    frames = read_frames(tmp_path / "bag", BagReadOptions(truth_topic="/lab/arm_command",
                                                          truth_fields=["delta", "grip.opening"]))
    assert frames.dim_names == [f"delta.{i}" for i in range(6)] + ["grip.opening"]
    np.testing.assert_allclose(frames.truths()[2], np.append(deltas[2], 0.5))
    with pytest.raises(BagError, match="no numeric field \\['speed'\\]"):
        read_frames(tmp_path / "bag", BagReadOptions(truth_topic="/lab/arm_command", truth_fields=["speed"]))


def test_a_writer_without_the_definition_of_a_custom_type_names_it(tmp_path):
    with BagWriter(tmp_path / "bag", "sqlite3", "jazzy") as w:
        with pytest.raises(BagError, match="lab_msgs/msg/Unknown"):
            w.write_raw("/x", "lab_msgs/msg/Unknown", 1, b"\x00\x01\x00\x00")


def test_a_custom_type_is_found_in_an_installed_package_share_directory(tmp_path, monkeypatch):
    share = tmp_path / "install" / "share" / "lab_msgs" / "msg"
    share.mkdir(parents=True)
    (share / "Grip.msg").write_text(GRIP_MSG)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path / "install"))
    assert find_msg_definition("lab_msgs/msg/Grip") == GRIP_MSG
    assert find_msg_definition("lab_msgs/msg/Missing") is None
    with BagWriter(tmp_path / "bag", "mcap", "jazzy") as w:
        grip = w.typestore  # the shared distribution store must stay untouched
        raw = None
        w.register_types({}, wanted=["lab_msgs/msg/Grip"])
        raw = w.typestore.serialize_cdr(w.typestore.types["lab_msgs/msg/Grip"](opening=0.5, closed=True),
                                        "lab_msgs/msg/Grip")
        w.write_raw("/grip", "lab_msgs/msg/Grip", 1_000_000_000, raw)
        assert "lab_msgs/msg/Grip" not in grip.types
    with RosBag(tmp_path / "bag") as bag:
        (msg,) = [m.msg for m in bag.messages(["/grip"])]
    assert (msg.opening, msg.closed) == (0.5, True)


def test_a_ros1_bag_reads_as_frames(tmp_path):
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    T = store.types
    path = tmp_path / "demo.bag"
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[..., 0] = 200  # red in rgb8
    with Writer(path) as w:
        cam = w.add_connection(CAM, "sensor_msgs/msg/Image", typestore=store)
        text = w.add_connection("/vla/instruction", "std_msgs/msg/String", typestore=store)
        cmd = w.add_connection("/cmd", "std_msgs/msg/Float64MultiArray", typestore=store)
        w.write(text, 900_000_000, store.serialize_ros1(T["std_msgs/msg/String"](data="open the drawer"),
                                                        "std_msgs/msg/String"))
        for i in range(3):
            ns = 1_000_000_000 + i * 200_000_000
            stamp = T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
            header = T["std_msgs/msg/Header"](seq=i, stamp=stamp, frame_id="cam")
            msg = T["sensor_msgs/msg/Image"](header=header, height=4, width=6, encoding="rgb8", is_bigendian=0,
                                             step=18, data=image.reshape(-1))
            w.write(cam, ns, store.serialize_ros1(msg, "sensor_msgs/msg/Image"))
            layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
            w.write(cmd, ns, store.serialize_ros1(T["std_msgs/msg/Float64MultiArray"](
                layout=layout, data=np.array([i, -i], dtype=np.float64)), "std_msgs/msg/Float64MultiArray"))
    frames = read_frames(path, BagReadOptions(truth_topic="/cmd"))
    with pytest.raises(BagError, match="ROS 1 bag: convert it first"):  # a player publishes ROS 2 types
        from openvla_ros.eval.playback import BagPlayback

        BagPlayback(path)
    assert len(frames) == 3
    assert frames.frames[0].instruction == "open the drawer"
    np.testing.assert_array_equal(frames.frames[1].image, image)
    np.testing.assert_allclose(frames.truths(), [[0, 0], [1, -1], [2, -2]])
    assert frames.frames[2].stamp == pytest.approx(1.4)


def test_definitions_that_do_not_parse_are_named():
    from rosbags.interfaces import MessageDefinition, MessageDefinitionFormat

    class Conn:
        msgtype = "lab_msgs/msg/Bad"
        msgdef = MessageDefinition(MessageDefinitionFormat.MSG, "float64[ oops\n")

    with pytest.raises(MessageTypeError, match="lab_msgs/msg/Bad"):
        bag_typestore([Conn()], "ros2_jazzy")


def test_numeric_fields_flatten_nested_messages_in_definition_order():
    from rosbags.typesys import Stores, get_typestore

    T = get_typestore(Stores.ROS2_JAZZY).types
    twist = T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](1.0, 2.0, 3.0),
                                         angular=T["geometry_msgs/msg/Vector3"](4.0, 5.0, 6.0))
    assert numeric_fields(twist) == [("linear.x", 1.0), ("linear.y", 2.0), ("linear.z", 3.0),
                                     ("angular.x", 4.0), ("angular.y", 5.0), ("angular.z", 6.0)]
