"""Bag writing and reading (openvla_ros.eval.bags / bag_writer) on synthetic rosbag2 bags.

Every bag here is written by the tests with known content, in both storages and with the Humble
and Jazzy type stores, then read back and compared with the values written or with ground truth
computed by hand.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import (
    BagError,
    BagReadOptions,
    RosBag,
    list_topics,
    read_frames,
)

STORAGES = ["sqlite3", "mcap"]
TYPESTORES = ["humble", "jazzy"]
CAM = "/camera/image_raw"
INSTR = "/vla/instruction"


def _img(seed: int, shape=(12, 16, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _quat_zx(yaw: float, roll: float) -> list[float]:
    """(x, y, z, w) of Rz(yaw) @ Rx(roll), multiplied out by hand."""
    sz, cz = math.sin(yaw / 2), math.cos(yaw / 2)
    sx, cx = math.sin(roll / 2), math.cos(roll / 2)
    return [cz * sx, sz * sx, sz * cx, cz * cx]


# --- round trip of every message kind ----------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("typestore", TYPESTORES)
def test_every_message_kind_round_trips_exactly(tmp_path, storage, typestore):
    path = tmp_path / "bag"
    image, png_image = _img(1), _img(2)
    with BagWriter(path, storage, typestore) as w:
        w.write_string(INSTR, 1.0, "pick up the screw")
        w.write_image(CAM, 1.25, image, encoding="bgr8", row_padding=2, frame_id="cam_link")
        w.write_compressed_image(CAM + "/compressed", 1.5, png_image, codec="png")
        w.write_float64("/gripper", 1.1, 0.75)
        w.write_bool("/flag", 1.2, True)
        w.write_float64_array("/cmd", 1.3, [0.1, -0.2, 0.3])
        w.write_twist("/twist", 1.4, [0.1, 0.2, 0.3], [-0.4, -0.5, -0.6], frame_id="base_link")
        w.write_pose("/pose", 1.6, [1.0, 2.0, 3.0], [0.0, 0.0, math.sin(0.25), math.cos(0.25)])
        w.write_joint_state("/joint_states", 1.7, ["j1", "j2"], [0.5, -0.5], velocities=[0.1, 0.2])
        w.write_joint_trajectory("/vla/action_chunk", 1.8, ["dx", "dy"], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dt=0.2)

    assert {t.name: (t.msgtype, t.count) for t in list_topics(path)} == {
        INSTR: ("std_msgs/msg/String", 1),
        CAM: ("sensor_msgs/msg/Image", 1),
        CAM + "/compressed": ("sensor_msgs/msg/CompressedImage", 1),
        "/gripper": ("std_msgs/msg/Float64", 1),
        "/flag": ("std_msgs/msg/Bool", 1),
        "/cmd": ("std_msgs/msg/Float64MultiArray", 1),
        "/twist": ("geometry_msgs/msg/TwistStamped", 1),
        "/pose": ("geometry_msgs/msg/PoseStamped", 1),
        "/joint_states": ("sensor_msgs/msg/JointState", 1),
        "/vla/action_chunk": ("trajectory_msgs/msg/JointTrajectory", 1),
    }
    with RosBag(path) as bag:
        assert bag.storage == storage
        assert bag.typestore_name == typestore  # recorded by the writer in custom_data
        got = {m.topic: m for m in bag.messages(sorted(bag.topics))}

    assert got[INSTR].msg.data == "pick up the screw" and got[INSTR].receive_ns == 1_000_000_000
    img = got[CAM].msg
    assert (img.header.stamp.sec, img.header.stamp.nanosec, img.header.frame_id) == (1, 250_000_000, "cam_link")
    assert (img.height, img.width, img.encoding, img.step) == (12, 16, "bgr8", 16 * 3 + 2)
    row0 = img.data[: 16 * 3].reshape(16, 3)
    np.testing.assert_array_equal(row0[:, ::-1], image[0])
    assert got[CAM + "/compressed"].msg.format == "rgb8; png compressed bgr8"
    assert got["/gripper"].msg.data == 0.75
    assert got["/flag"].msg.data is True
    np.testing.assert_array_equal(got["/cmd"].msg.data, [0.1, -0.2, 0.3])
    tw = got["/twist"].msg
    assert [tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z] == [0.1, 0.2, 0.3]
    assert [tw.twist.angular.x, tw.twist.angular.y, tw.twist.angular.z] == [-0.4, -0.5, -0.6]
    assert tw.header.frame_id == "base_link"
    pose = got["/pose"].msg.pose
    assert [pose.position.x, pose.position.y, pose.position.z] == [1.0, 2.0, 3.0]
    assert [pose.orientation.z, pose.orientation.w] == [math.sin(0.25), math.cos(0.25)]
    js = got["/joint_states"].msg
    assert list(js.name) == ["j1", "j2"]
    np.testing.assert_array_equal(js.position, [0.5, -0.5])
    np.testing.assert_array_equal(js.velocity, [0.1, 0.2])
    assert len(js.effort) == 0
    traj = got["/vla/action_chunk"].msg
    assert list(traj.joint_names) == ["dx", "dy"] and len(traj.points) == 3
    np.testing.assert_array_equal(traj.points[2].positions, [5.0, 6.0])
    assert (traj.points[2].time_from_start.sec, traj.points[2].time_from_start.nanosec) == (0, 400_000_000)
    assert (traj.header.stamp.sec, traj.header.stamp.nanosec) == (1, 800_000_000)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("typestore", TYPESTORES)
@pytest.mark.parametrize("compressed", [False, True])
def test_frames_return_the_written_images(tmp_path, storage, typestore, compressed):
    path = tmp_path / "bag"
    images = [_img(10 + i) for i in range(4)]
    with BagWriter(path, storage, typestore) as w:
        w.write_string(INSTR, 0.5, "open the drawer")
        for i, image in enumerate(images):
            if compressed:
                w.write_compressed_image(CAM, 1.0 + i, image, codec="png")
            else:
                w.write_image(CAM, 1.0 + i, image, encoding="rgba8", row_padding=1)
    frames = read_frames(path)
    assert len(frames) == 4
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.image, images[i])
        assert frame.stamp == pytest.approx(1.0 + i, abs=1e-9)
        assert frame.instruction == "open the drawer" and frame.truth is None
    assert frames.report.as_dict() == {"images": 4, "matched": 4, "dropped": 0, "dropped_by_reason": {}}


@pytest.mark.ros  # rclpy's own CDR serialisation
def test_rclpy_reads_what_the_writer_wrote_and_the_reader_reads_rclpy_bytes(tmp_path):
    from rclpy.serialization import deserialize_message, serialize_message
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    path = tmp_path / "bag"
    image = _img(3)
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 2, 500
    msg.height, msg.width, msg.encoding, msg.step = 12, 16, "rgb8", 48
    msg.data = image.tobytes()
    with BagWriter(path, "mcap", "humble") as w:
        w.write_image(CAM, 1.0, image)
        text = String()
        text.data = "from rclpy"
        w.write_raw("/rclpy_text", "std_msgs/String", 1_500_000_000, serialize_message(text))
        w.write_raw("/rclpy_image", "sensor_msgs/msg/Image", 2_000_000_500, serialize_message(msg))
    with Reader(path) as reader:
        raw = {c.topic: bytes(data) for c, _, data in reader.messages()}
    decoded = deserialize_message(raw[CAM], Image)
    assert (decoded.height, decoded.width, decoded.encoding) == (12, 16, "rgb8")
    np.testing.assert_array_equal(np.frombuffer(bytes(decoded.data), np.uint8).reshape(12, 16, 3), image)
    frames = read_frames(path, BagReadOptions(image_topic="/rclpy_image", instruction_topic="/rclpy_text",
                                              tolerance=1.0))
    assert len(frames) == 1 and frames.frames[0].instruction == "from rclpy"
    assert frames.frames[0].stamp_ns == 2_000_000_500
    np.testing.assert_array_equal(frames.frames[0].image, image)


# --- synchronisation ----------------------------------------------------------------------------


def _sync_bag(path: Path, storage: str) -> None:
    """Images at 10 + 0.1 i +/- 8 ms (header stamps; received 0.3 s late); truth at 10 + 0.1 i + 20 ms
    holding [i] * 7, with samples 5, 6 and 12 lost."""
    with BagWriter(path, storage, "jazzy") as w:
        w.write_string(INSTR, 9.0, "stack the cups")
        for i in range(20):
            stamp = 10 + 0.1 * i + (0.008 if i % 2 else -0.008)
            w.write_image(CAM, stamp, _img(i, (4, 4, 3)), receive_time=stamp + 0.3)
            if i not in (5, 6, 12):
                w.write_float64_array("/truth", 10 + 0.1 * i + 0.02, [float(i)] * 7)


@pytest.mark.parametrize("storage", STORAGES)
def test_nearest_sync_with_jitter_and_lost_samples(tmp_path, storage):
    _sync_bag(tmp_path / "bag", storage)
    frames = read_frames(tmp_path / "bag", BagReadOptions(truth_topic="/truth", sync="nearest", tolerance=0.05))
    assert frames.report.as_dict() == {"images": 20, "matched": 17, "dropped": 3,
                                       "dropped_by_reason": {"no_truth": 3}}
    assert [f.index for f in frames] == [i for i in range(20) if i not in (5, 6, 12)]
    for frame in frames:
        np.testing.assert_array_equal(frame.truth, [float(frame.index)] * 7)
    assert frames.dim_names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]


def test_previous_sync_takes_the_last_sample_before_the_frame(tmp_path):
    _sync_bag(tmp_path / "bag", "sqlite3")
    frames = read_frames(tmp_path / "bag", BagReadOptions(truth_topic="/truth", sync="previous", tolerance=0.1))
    # frame i sees sample i-1 (70..90 ms earlier); 0 has none, 6, 7 and 13 lost theirs
    assert [f.index for f in frames] == [i for i in range(20) if i not in (0, 6, 7, 13)]
    for frame in frames:
        assert frame.truth[0] == frame.index - 1
    assert frames.report.dropped == {"no_truth": 4}


def test_receive_stamps_can_be_chosen_instead_of_header_stamps(tmp_path):
    _sync_bag(tmp_path / "bag", "mcap")
    frames = read_frames(tmp_path / "bag", BagReadOptions(truth_topic="/truth", stamp_source="receive",
                                                          tolerance=0.05))
    # received 0.3 s late, image i now lines up with truth sample i + 3
    assert all(f.truth[0] == f.index + 3 for f in frames)
    assert frames.frames[0].stamp == pytest.approx(10 - 0.008 + 0.3)


def test_instruction_is_the_latest_before_each_frame(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "sqlite3") as w:
        w.write_string(INSTR, 1.02, "first")  # latched message recorded just after the first image
        w.write_string(INSTR, 1.55, "second")
        for i in range(8):
            w.write_image(CAM, 0.9 + 0.1 * i, _img(i, (2, 2, 3)))
    frames = read_frames(path, BagReadOptions(tolerance=0.05))
    # 0.9 is 120 ms before the first instruction (beyond tolerance), 1.0 only 20 ms
    assert frames.report.dropped == {"no_instruction": 1}
    assert [(round(f.stamp, 3), f.instruction) for f in frames] == [
        (1.0, "first"), (1.1, "first"), (1.2, "first"), (1.3, "first"), (1.4, "first"), (1.5, "first"),
        (1.6, "second")]
    given = read_frames(path, BagReadOptions(instruction="wipe the table"))
    assert len(given) == 8 and {f.instruction for f in given} == {"wipe the table"}


def test_stride_and_max_frames(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "mcap") as w:
        for i in range(10):
            w.write_image(CAM, 1.0 + i, _img(i, (2, 2, 3)))
    frames = read_frames(path, BagReadOptions(instruction="x", stride=3, max_frames=3))
    assert [f.index for f in frames] == [0, 3, 6]


# --- ground truth sources -----------------------------------------------------------------------


def test_twist_truth_is_twist_times_dt_plus_gripper(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "mcap", "humble") as w:
        for i in range(5):
            t = 2.0 + 0.2 * i
            w.write_image(CAM, t, _img(i, (2, 2, 3)))
            w.write_twist("/expert", t + 0.005, [0.1 * i, 0.0, -0.05], [0.0, 0.3, 0.0])
            w.write_float64("/grip", t - 0.003, float(i % 2))
    frames = read_frames(path, BagReadOptions(instruction="go", truth_topic="/expert", gripper_topic="/grip", dt=0.25))
    assert frames.dim_names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    expected = [[0.025 * i, 0.0, -0.0125, 0.0, 0.075, 0.0, float(i % 2)] for i in range(5)]
    np.testing.assert_allclose(frames.truths(), expected, atol=1e-15)


def test_action_chunk_truth_uses_the_first_point_and_joint_names(tmp_path):
    path = tmp_path / "bag"
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    with BagWriter(path, "sqlite3", "jazzy") as w:
        for i in range(3):
            w.write_image(CAM, 5.0 + i, _img(i, (2, 2, 3)))
            chunk = np.arange(14, dtype=float).reshape(2, 7) + 100 * i
            w.write_joint_trajectory("/vla/action_chunk", 5.0 + i, names, chunk, dt=0.2)
    frames = read_frames(path, BagReadOptions(instruction="go", truth_topic="/vla/action_chunk", tolerance=0.0))
    assert frames.dim_names == names
    np.testing.assert_array_equal(frames.truths(), [np.arange(7) + 100 * i for i in range(3)])


def test_float64_array_truth_dim_names(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "sqlite3") as w:
        w.write_image(CAM, 1.0, _img(0, (2, 2, 3)))
        w.write_float64_array("/cmd", 1.0, [1.0, 2.0, 3.0])
    frames = read_frames(path, BagReadOptions(instruction="go", truth_topic="/cmd", truth_dim_names=["a", "b", "c"]))
    assert frames.dim_names == ["a", "b", "c"]
    np.testing.assert_array_equal(frames.frames[0].truth, [1.0, 2.0, 3.0])
    assert read_frames(path, BagReadOptions(instruction="go", truth_topic="/cmd")).dim_names == ["a0", "a1", "a2"]
    with pytest.raises(BagError, match="2 truth dim names"):
        read_frames(path, BagReadOptions(instruction="go", truth_topic="/cmd", truth_dim_names=["a", "b"]))


def _pose_bag(path: Path, period: float, duration: float, image_stamps) -> None:
    """End effector moving at 0.1 m/s along x and turning at 0.5 rad/s about base z (roll fixed 0.2)."""
    with BagWriter(path, "mcap", "jazzy") as w:
        for k in range(int(round(duration / period)) + 1):
            t = k * period
            w.write_pose("/eef", t, [0.1 * t, 0.0, 0.5], _quat_zx(0.5 * t, 0.2))
        for i, t in enumerate(image_stamps):
            w.write_image(CAM, t, _img(i, (2, 2, 3)))


def test_pose_truth_is_the_base_frame_delta_over_dt(tmp_path):
    _pose_bag(tmp_path / "bag", 0.01, 3.0, [0.5 + 0.1 * i for i in range(10)])
    frames = read_frames(tmp_path / "bag", BagReadOptions(instruction="go", truth_topic="/eef", dt=0.2,
                                                          tolerance=0.001))
    assert len(frames) == 10
    # over 0.2 s: 0.02 m along x; R_next R_prev^T = Rz(0.1): a pure yaw of 0.1 rad in the base frame
    np.testing.assert_allclose(frames.truths(), [[0.02, 0, 0, 0, 0, 0.1]] * 10, atol=1e-9)


def test_pose_interpolation_versus_nearest(tmp_path):
    stamps = [0.515 + 0.1 * i for i in range(10)]  # between the 30 ms pose samples
    _pose_bag(tmp_path / "bag", 0.03, 3.0, stamps)
    exact = read_frames(tmp_path / "bag", BagReadOptions(instruction="go", truth_topic="/eef", dt=0.2,
                                                         sync="interpolate", tolerance=0.02))
    np.testing.assert_allclose(exact.truths(), [[0.02, 0, 0, 0, 0, 0.1]] * 10, atol=1e-9)
    nearest = read_frames(tmp_path / "bag", BagReadOptions(instruction="go", truth_topic="/eef", dt=0.2,
                                                           sync="nearest", tolerance=0.02))
    # start and end snap to the 30 ms grid, so the span is 0.18 or 0.21 s: dx 0.018 or 0.021, never 0.02
    assert np.max(np.abs(nearest.truths()[:, 0] - 0.02)) > 5e-4


def test_pose_truth_drops_frames_whose_future_pose_is_missing(tmp_path):
    _pose_bag(tmp_path / "bag", 0.01, 1.0, [0.7, 0.8, 0.85, 0.95])
    frames = read_frames(tmp_path / "bag", BagReadOptions(instruction="go", truth_topic="/eef", dt=0.2,
                                                          tolerance=0.02))
    assert [round(f.stamp, 2) for f in frames] == [0.7, 0.8]
    assert frames.report.dropped == {"no_pose_after_dt": 2}


L1, L2 = 0.5, 0.3


def _planar_fk(names, positions):
    """Planar two-link arm in the base x-y plane (independent of the code under test)."""
    assert list(names) == ["shoulder", "elbow"]
    q1, q2 = positions
    c, s = math.cos(q1 + q2), math.sin(q1 + q2)
    transform = np.eye(4)
    transform[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    transform[:3, 3] = [L1 * math.cos(q1) + L2 * c, L1 * math.sin(q1) + L2 * s, 0.0]
    return transform


def test_joint_state_truth_through_a_kinematics_function(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "sqlite3", "humble") as w:
        for k in range(201):
            t = 0.01 * k
            w.write_joint_state("/joint_states", t, ["shoulder", "elbow"], [0.1 * t, 0.2 * t])
        for i in range(5):
            w.write_image(CAM, 0.5 + 0.2 * i, _img(i, (2, 2, 3)))
    frames = read_frames(path, BagReadOptions(instruction="go", truth_topic="/joint_states", dt=0.2,
                                              fk=_planar_fk, tolerance=0.001))
    assert len(frames) == 5

    def tip(t):
        q1, q2 = 0.1 * t, 0.2 * t
        return np.array([L1 * math.cos(q1) + L2 * math.cos(q1 + q2), L1 * math.sin(q1) + L2 * math.sin(q1 + q2), 0])

    for frame in frames:
        t = frame.stamp
        np.testing.assert_allclose(frame.truth[:3], tip(t + 0.2) - tip(t), atol=1e-9)
        np.testing.assert_allclose(frame.truth[3:], [0.0, 0.0, 0.3 * 0.2], atol=1e-9)
    with pytest.raises(BagError, match="kinematics function"):
        read_frames(path, BagReadOptions(instruction="go", truth_topic="/joint_states"))


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture
def small_bag(tmp_path):
    path = tmp_path / "small"
    with BagWriter(path, "sqlite3") as w:
        w.write_string(INSTR, 0.5, "go")
        for i in range(3):
            w.write_image(CAM, 1.0 + i, _img(i, (2, 2, 3)))
            w.write_float64("/grip", 1.0 + i, 1.0)
    return path


def test_missing_bag_path(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        read_frames(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BagError, match="no metadata.yaml"):
        list_topics(tmp_path / "empty_dir")


def test_missing_topic_lists_the_topics_the_bag_has(small_bag):
    with pytest.raises(BagError) as err:
        read_frames(small_bag, BagReadOptions(truth_topic="/vla/eef_delta"))
    text = str(err.value)
    assert "truth topic '/vla/eef_delta' is not in bag" in text
    assert "/camera/image_raw [sensor_msgs/msg/Image] x3" in text
    assert "/vla/instruction [std_msgs/msg/String] x1" in text
    assert "/grip [std_msgs/msg/Float64] x3" in text


def test_topics_of_unsupported_types(small_bag):
    with pytest.raises(BagError, match="image topic '/vla/instruction'.*unsupported message type 'std_msgs/msg/String'"):
        read_frames(small_bag, BagReadOptions(image_topic=INSTR))
    with pytest.raises(BagError, match="truth topic '/vla/instruction'.*holds no numbers"):
        read_frames(small_bag, BagReadOptions(truth_topic=INSTR, instruction="go"))


def test_a_truth_type_without_a_rule_of_its_own_gives_its_numbers(small_bag):
    frames = read_frames(small_bag, BagReadOptions(truth_topic="/grip"))
    assert frames.dim_names == ["data"]
    assert frames.truths().shape == (len(frames), 1)


def test_a_message_type_the_bag_defines_decodes_and_one_it_does_not_is_named(tmp_path):
    from rosbags.rosbag2 import Writer

    path = tmp_path / "custom"
    with Writer(path, version=9) as w:
        conn = w.add_connection("/custom", "my_pkg/msg/Gizmo", msgdef="int32 x", rihs01="RIHS01_" + "0" * 64)
        w.write(conn, 1, b"\x00\x01\x00\x00\x05\x00\x00\x00")
        bare = w.add_connection("/bare", "my_pkg/msg/Bare", msgdef="", rihs01="RIHS01_" + "0" * 64)
        w.write(bare, 2, b"\x00\x01\x00\x00\x05\x00\x00\x00")
    with RosBag(path) as bag:
        assert bag.topics["/custom"].msgtype == "my_pkg/msg/Gizmo"
        assert [m.msg.x for m in bag.messages(["/custom"])] == [5]
        with pytest.raises(BagError, match="'my_pkg/msg/Bare': the bag stores no definition of it and the kilted"):
            list(bag.messages(["/bare"]))
    with pytest.raises(BagError, match="unsupported message type 'my_pkg/msg/Gizmo'"):
        read_frames(path, BagReadOptions(image_topic="/custom"))


def test_ambiguous_or_absent_topics_need_a_choice(tmp_path, small_bag):
    path = tmp_path / "two_cams"
    with BagWriter(path, "mcap") as w:
        w.write_image("/left", 1.0, _img(0, (2, 2, 3)))
        w.write_image("/right", 1.0, _img(1, (2, 2, 3)))
    with pytest.raises(BagError, match=r"2 camera topics \['/left', '/right'\]"):
        read_frames(path, BagReadOptions(instruction="go"))
    with pytest.raises(BagError, match="0 std_msgs/String topics"):
        read_frames(path, BagReadOptions(image_topic="/left"))
    with pytest.raises(BagError, match="unknown type store 'rolling'"):
        read_frames(small_bag, BagReadOptions(typestore="rolling"))


def test_bad_options_are_rejected(small_bag):
    for options, needle in ((BagReadOptions(sync="closest"), "sync must be one of"),
                            (BagReadOptions(tolerance=-1), "tolerance"),
                            (BagReadOptions(dt=float("nan")), "dt must be"),
                            (BagReadOptions(stride=0), "stride"),
                            (BagReadOptions(instruction="  "), "instruction is empty")):
        with pytest.raises(ValueError, match=needle):
            read_frames(small_bag, options)


def _bag_file(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.suffix in (".db3", ".mcap"))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_truncated_bags_give_a_clear_error(tmp_path, storage, keep):
    path = tmp_path / "bag"
    with BagWriter(path, storage) as w:
        w.write_string(INSTR, 0.5, "go")
        for i in range(40):
            w.write_image(CAM, 1.0 + 0.1 * i, _img(i, (32, 32, 3)))
    data_file = _bag_file(path)
    size = os.path.getsize(data_file)
    with open(data_file, "r+b") as handle:
        handle.truncate(int(size * keep))
    with pytest.raises(BagError, match="corrupt|truncated") as err:
        read_frames(path)
    assert str(path) in str(err.value)


def test_garbled_message_bytes_give_a_clear_error(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "mcap") as w:
        w.write_raw(CAM, "sensor_msgs/msg/Image", 1_000_000_000, b"\x00\x01\x00\x00" + b"\xff" * 9)
    with pytest.raises(BagError, match="corrupt or truncated \\(a sensor_msgs/msg/Image on '/camera/image_raw' does not decode\\)"):
        read_frames(path, BagReadOptions(instruction="go"))


def test_damaged_metadata_gives_a_clear_error(small_bag):
    (small_bag / "metadata.yaml").write_text("rosbag2_bagfile_information: [not: a, mapping\n")
    with pytest.raises(BagError, match="corrupt, truncated or unreadable"):
        list_topics(small_bag)


def test_unusable_truth_message_names_topic_and_time(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "sqlite3") as w:
        w.write_image(CAM, 1.0, _img(0, (2, 2, 3)))
        w.write_pose("/eef", 1.0, [0, 0, 0], [0, 0, 0, 0])  # zero quaternion
    with pytest.raises(BagError, match=r"'/eef' received at 1.000000000 s .*zero length"):
        read_frames(path, BagReadOptions(instruction="go", truth_topic="/eef"))


def test_writer_rejects_non_finite_values_and_existing_paths(tmp_path, small_bag):
    with pytest.raises(BagError, match="exists already"):
        BagWriter(small_bag)
    with BagWriter(tmp_path / "new", "mcap") as w:
        with pytest.raises(ValueError, match="linear velocity must be finite"):
            w.write_twist("/t", 1.0, [float("nan"), 0, 0], [0, 0, 0])
        with pytest.raises(ValueError, match="stamp must be a finite"):
            w.write_string("/s", float("inf"), "x")
