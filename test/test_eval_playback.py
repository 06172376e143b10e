"""Bag playback logic (openvla_ros.eval.playback) and episode recording (eval.recording), no ROS graph.

Playback runs on a manual clock whose `sleep` advances it, so the publish times are exactly the
schedule: bag intervals divided by the rate, offsets skipped, loops back to back.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ManualClock

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import BagError, RosBag, get_ros_typestore, read_frames
from openvla_ros.eval.playback import (BagPlayback, PlaybackOptions, first_field_is_header, read_header_stamp,
                                       with_header_stamp)
from openvla_ros.eval.recording import EpisodeRecorder

IMAGE_STAMPS = [1.0 + 0.1 * i for i in range(6)]  # bag seconds; the instruction is at 0.9


def _write_bag(path, storage="sqlite3"):
    with BagWriter(path, storage) as w:
        w.write_string("/vla/instruction", 0.9, "pick up the screw")
        for i, t in enumerate(IMAGE_STAMPS):
            # header stamp 5 ms before the bag's receive time, as a camera driver would
            w.write_image("/cam", t - 0.005, np.full((4, 6, 3), i, np.uint8), receive_time=t)
            w.write_twist("/expert", t, [i, 0, 0], [0, 0, 0])
    return path


def _play(path, **options):
    clock = ManualClock(100.0)
    now_ns = lambda: int(round(clock() * 1e9)) + 5_000_000_000  # noqa: E731 - a node clock 5 s ahead
    playback = BagPlayback(path, PlaybackOptions(**options), clock=clock, now_ns=now_ns, sleep=clock.advance)
    out = []

    def publish(message):
        out.append((clock() - 100.0, message))
        if len(out) >= 20:
            playback.stop()

    playback.run(publish)
    assert playback.finished.is_set()
    return playback, out


@pytest.mark.ros  # rclpy's own CDR serialisation
def test_header_stamp_is_patched_in_little_and_big_endian_cdr():
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    msg = Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(range(18)))
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = 12, 345, "cam"
    raw = serialize_message(msg)
    assert read_header_stamp(raw) == 12_000_000_345
    patched = deserialize_message(with_header_stamp(raw, 1_700_000_000_123_456_789), Image)
    assert (patched.header.stamp.sec, patched.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert patched.header.frame_id == "cam" and bytes(patched.data) == bytes(range(18)) and patched.step == 9

    store = get_ros_typestore("kilted")
    ros_msg = store.deserialize_cdr(raw, "sensor_msgs/msg/Image")
    big = bytes(store.serialize_cdr(ros_msg, "sensor_msgs/msg/Image", little_endian=False))
    assert read_header_stamp(big) == 12_000_000_345
    back = store.deserialize_cdr(with_header_stamp(big, 7_000_000_008), "sensor_msgs/msg/Image")
    assert (back.header.stamp.sec, back.header.stamp.nanosec, back.width) == (7, 8, 3)
    with pytest.raises(ValueError, match="plain CDR"):
        read_header_stamp(b"\x00\x07\x00\x00" + bytes(8))
    assert first_field_is_header(store, "sensor_msgs/msg/CompressedImage")
    assert not first_field_is_header(store, "std_msgs/msg/String")


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_plays_on_the_bag_timeline_with_stamps_of_now(tmp_path, storage):
    bag = _write_bag(tmp_path / "b", storage)
    playback, out = _play(bag)
    assert sorted(playback.topics) == ["/cam", "/vla/instruction"]  # default: camera + String topics
    assert playback.latched == ["/vla/instruction"]
    topics = [m.topic for _, m in out]
    assert topics == ["/vla/instruction"] + ["/cam"] * 6
    times = [t for t, _ in out]
    np.testing.assert_allclose(times, [0.0] + [0.1 + 0.1 * i for i in range(6)], atol=1e-9)
    store = get_ros_typestore("kilted")
    for i, (t, m) in enumerate(out[1:]):
        assert m.original_stamp_ns == round((IMAGE_STAMPS[i] - 0.005) * 1e9)
        assert m.stamp_ns == round((100.0 + t) * 1e9) + 5_000_000_000  # now, on the node clock
        msg = store.deserialize_cdr(m.data, "sensor_msgs/msg/Image")
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == m.stamp_ns
        assert bytes(msg.data[:3]) == bytes([i] * 3)


def test_rate_offset_shift_keep_and_loop(tmp_path):
    bag = _write_bag(tmp_path / "b")
    # x2 from 0.25 s into the bag (bag start 0.9): images at 1.2 .. 1.5; the instruction of 0.9 first.
    playback, out = _play(bag, topics=["/cam", "/vla/instruction", "/expert"], rate=2.0, start_offset_s=0.25,
                          stamp_mode="shift")
    assert out[0][1].topic == "/vla/instruction" and out[0][0] == 0.0
    cams = [(t, m) for t, m in out if m.topic == "/cam"]
    np.testing.assert_allclose([t for t, _ in cams], [(s - 1.15) / 2 for s in IMAGE_STAMPS[2:]], atol=1e-9)
    start_ns = 105_000_000_000  # now_ns at the start of run()
    for t, m in cams:  # shift: original stamp moved onto the playback clock, at the rate
        assert m.stamp_ns == start_ns + round((m.original_stamp_ns - 1_150_000_000) / 2)
    assert {m.topic for _, m in out} == {"/cam", "/vla/instruction", "/expert"}

    playback, out = _play(bag, topics=["/cam"], stamp_mode="keep", loop=True)
    assert len(out) == 20 and playback.loops_done >= 3  # stopped by the callback
    period = (1.5 - 0.9) + (1.5 - 0.9) / 5  # the bag's span plus one mean interval of the 6 messages played
    times = [t for t, _ in out]
    np.testing.assert_allclose(times[6] - times[0], period, atol=1e-9)
    assert [m.loop for _, m in out[:13]] == [0] * 6 + [1] * 6 + [2]
    assert all(m.stamp_ns == m.original_stamp_ns for _, m in out)  # keep


def test_playback_errors_name_the_problem(tmp_path):
    bag = _write_bag(tmp_path / "b")
    with pytest.raises(BagError, match="/nope.*it has"):
        BagPlayback(bag, PlaybackOptions(topics=["/nope"]))
    with pytest.raises(ValueError, match="rate"):
        BagPlayback(bag, PlaybackOptions(rate=0.0))
    with pytest.raises(ValueError, match="stamp_mode"):
        BagPlayback(bag, PlaybackOptions(stamp_mode="later"))
    with pytest.raises(ValueError, match="beyond"):
        BagPlayback(bag, PlaybackOptions(start_offset_s=5.0))
    with pytest.raises(ValueError, match="latched"):
        BagPlayback(bag, PlaybackOptions(topics=["/cam"], latched_topics=["/vla/instruction"]))


@pytest.mark.ros  # rclpy's own CDR serialisation
def test_episode_recorder_new_bag_per_episode_latched_carry_over_and_bad_messages(tmp_path):
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    def image(i, stamp_ns):
        msg = Image(height=2, width=2, encoding="rgb8", step=6, data=bytes([i] * 12))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
        return serialize_message(msg)

    rec = EpisodeRecorder(tmp_path / "eps", storage="sqlite3", latched_topics=["/vla/instruction"])
    assert not rec.write("/vla/instruction", "std_msgs/String", 1_000_000_000, serialize_message(String(data="go")))
    assert not rec.recording
    first = rec.start()
    for i in range(3):
        assert rec.write("/cam", "sensor_msgs/msg/Image", 2_000_000_000 + i, image(i, 2_000_000_000 + i))
    assert not rec.write("/odd", "my_pkg/msg/Unknown", 2_100_000_000, b"\x00\x01\x00\x00")  # counted, not raised
    assert rec.write("/cam", "sensor_msgs/msg/Image", 2_200_000_000, b"not checked: stored as received")
    summary = rec.stop()
    assert summary.path == first == tmp_path / "eps" / "episode_0000"
    assert summary.counts == {"/vla/instruction": 1, "/cam": 4} and summary.errors == {"/odd": 1}
    second = rec.start()  # the instruction, published once, is carried into the new episode
    rec.write("/cam", "sensor_msgs/msg/Image", 3_000_000_000, image(9, 3_000_000_000))
    rec.close()
    assert second.name == "episode_0001"
    frames = read_frames(second)
    assert len(frames) == 1 and frames.frames[0].instruction == "go" and frames.frames[0].image[0, 0, 0] == 9
    with RosBag(first) as bag:
        assert bag.topics["/cam"].count == 4
    with pytest.raises(ValueError, match="not recording"):
        rec.stop()
    with pytest.raises(ValueError, match="pattern"):
        EpisodeRecorder(tmp_path, name_pattern="ep_{nope}")
    fixed = EpisodeRecorder(tmp_path / "fixed", name_pattern="run")
    fixed.start(), fixed.stop()
    with pytest.raises(ValueError, match="no free name"):
        fixed.start()


@pytest.mark.parametrize("module", ["bag_player", "recorder"])
def test_config_files_list_every_parameter_with_its_default(module):
    import importlib
    from pathlib import Path

    from openvla_ros.nodes.params import load_yaml_parameters, validate_all

    node = importlib.import_module(f"openvla_ros.nodes.{module}")
    values = load_yaml_parameters(Path(__file__).resolve().parents[1] / "config" / f"{module}.yaml", node.NODE_NAME)
    assert set(values) == {s.name for s in node.PARAMS}
    assert validate_all(node.PARAMS, values) == {s.name: s.default for s in node.PARAMS}
