"""Training episodes (openvla_ros.training.data): bag and HDF5 sources, shard cache, split, chunk masks."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from PIL import Image

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.training import data as D
from openvla_ros.training.data import EpisodeError, EpisodeReadOptions

CAM, ACT, POSE, INSTR = "/camera/image_raw", "/act", "/eef_pose", "/vla/instruction"


def _img(seed, shape=(30, 40, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _resized(image):
    return np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC))


def write_hdf5(path, images, actions, language="Pick up the Screw", camera="cam_high"):
    with h5py.File(path, "w") as f:
        f.create_dataset(f"observations/images/{camera}", data=np.asarray(images, dtype=np.uint8))
        f.create_dataset("action", data=np.asarray(actions))
        f.create_dataset("observations/qpos", data=np.zeros((len(actions), 7)))
        if language is not None:
            f.create_dataset("language_raw", data=[language.encode()])


def test_hdf5_episode_is_read_resized_and_stamped_at_dt(tmp_path):
    images = [_img(i) for i in range(3)]
    actions = np.arange(21, dtype=np.float64).reshape(3, 7) / 100
    write_hdf5(tmp_path / "ep0.hdf5", images, actions)
    ep = D.read_episode(tmp_path / "ep0.hdf5", EpisodeReadOptions(dt=0.1))
    assert ep.name == "ep0" and len(ep) == 3
    np.testing.assert_array_equal(ep.actions, actions)
    assert ep.instructions == ["Pick up the Screw"] * 3
    np.testing.assert_allclose(ep.stamps, [0.0, 0.1, 0.2])
    assert ep.dim_names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    np.testing.assert_array_equal(ep.images[1], _resized(images[1]))


def test_hdf5_with_several_cameras_needs_a_choice(tmp_path):
    path = tmp_path / "ep.h5"
    with h5py.File(path, "w") as f:
        for cam in ("left", "right"):
            f.create_dataset(f"observations/images/{cam}", data=np.stack([_img(1), _img(2)]))
        f.create_dataset("action", data=np.zeros((2, 7)))
        f.create_dataset("language_raw", data=[b"wave"])
    with pytest.raises(EpisodeError, match=r"cameras \['left', 'right'\]"):
        D.read_episode(path, EpisodeReadOptions())
    ep = D.read_episode(path, EpisodeReadOptions(camera="right", instruction="fixed text"))
    np.testing.assert_array_equal(ep.images[0], _resized(_img(1)))
    assert ep.instructions == ["fixed text", "fixed text"]


@pytest.mark.parametrize("case, message", [
    ("empty", "has no frames"),
    ("nan", r"non-finite action values \(first at step 1, dim 2"),
    ("mismatch", "mismatched lengths: 3 images, 2 actions"),
])
def test_bad_hdf5_episodes_are_rejected_naming_the_episode(tmp_path, case, message):
    path = tmp_path / f"bad_{case}.hdf5"
    if case == "empty":
        write_hdf5(path, np.zeros((0, 30, 40, 3), np.uint8), np.zeros((0, 7)))
    elif case == "nan":
        actions = np.zeros((3, 7))
        actions[1, 2] = np.nan
        write_hdf5(path, [_img(i) for i in range(3)], actions)
    else:
        write_hdf5(path, [_img(i) for i in range(3)], np.zeros((2, 7)))
    with pytest.raises(EpisodeError, match=message) as info:
        D.read_episode(path, EpisodeReadOptions())
    assert f"bad_{case}" in str(info.value)


def _write_bag(path, n=4, pose=False, period=0.2):
    truths = []
    with BagWriter(path) as w:
        w.write_string(INSTR, 0.99, "Reach the Red cube")
        for t in range(n):
            stamp = 1.0 + period * t
            w.write_image(CAM, stamp, _img(10 + t))
            if pose:
                w.write_pose(POSE, stamp, [0.1 * t ** 2, 0.0, 0.5], [0, 0, math.sin(0.05 * t), math.cos(0.05 * t)])
            else:
                action = np.array([t, -t, 0.5 * t, 0, 0, 0, t % 2], dtype=np.float64) / 100
                w.write_float64_array(ACT, stamp, action)
                truths.append(action)
    return truths


def test_bag_episode_with_a_command_topic(tmp_path):
    truths = _write_bag(tmp_path / "ep_a")
    ep = D.read_episode(tmp_path / "ep_a", EpisodeReadOptions(action_topic=ACT))
    np.testing.assert_allclose(ep.actions, np.stack(truths))
    assert ep.instructions == ["Reach the Red cube"] * 4
    np.testing.assert_allclose(ep.stamps, [1.0, 1.2, 1.4, 1.6])
    np.testing.assert_array_equal(ep.images[2], _resized(_img(12)))


def test_bag_episode_from_pose_deltas(tmp_path):
    _write_bag(tmp_path / "ep_p", n=4, pose=True)
    ep = D.read_episode(tmp_path / "ep_p", EpisodeReadOptions(action_topic=POSE, dt=0.2))
    # The last image has no pose dt later, so 3 steps; x moves 0.1*((t+1)^2 - t^2), yaw turns 0.1 rad per step.
    assert len(ep) == 3 and ep.dim_names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw"]
    np.testing.assert_allclose(ep.actions[:, 0], [0.1, 0.3, 0.5], atol=1e-12)
    np.testing.assert_allclose(ep.actions[:, 5], [0.1, 0.1, 0.1], atol=1e-12)
    np.testing.assert_allclose(ep.actions[:, 1:5], 0.0, atol=1e-12)


def test_bag_without_action_topic_or_frames_is_rejected(tmp_path):
    _write_bag(tmp_path / "ep_b")
    with pytest.raises(EpisodeError, match="needs an action topic"):
        D.read_episode(tmp_path / "ep_b", EpisodeReadOptions())
    with BagWriter(tmp_path / "ep_empty") as w:
        w.write_string(INSTR, 1.0, "wave")
        w.write_image(CAM, 1.0, _img(1))
        w.write_float64_array(ACT, 5.0, np.zeros(7))  # far from the only image
    with pytest.raises(EpisodeError, match="'ep_empty'.*has no frames with an action"):
        D.read_episode(tmp_path / "ep_empty", EpisodeReadOptions(action_topic=ACT))


def test_cache_writes_shards_once_and_reuses_them(tmp_path, monkeypatch):
    for e in range(2):
        _write_bag(tmp_path / "bags" / f"ep{e}")
    options = EpisodeReadOptions(action_topic=ACT)
    first = D.cache_dataset("demo", [tmp_path / "bags"], options, tmp_path / "cache")
    assert [e.name for e in first.episodes] == ["ep0", "ep1"] and first.num_transitions == 8
    assert first.episodes[0].images.shape == (4, 224, 224, 3)
    assert isinstance(first.episodes[0].images, np.memmap)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an unchanged episode was decoded again")

    monkeypatch.setattr(D, "read_episode", no_decoding)
    again = D.cache_dataset("demo", [tmp_path / "bags"], options, tmp_path / "cache")
    np.testing.assert_array_equal(again.actions(), first.actions())
    # Other read options are another cache entry.
    with pytest.raises(AssertionError, match="decoded again"):
        D.cache_dataset("demo", [tmp_path / "bags"], EpisodeReadOptions(action_topic=ACT, dt=0.1), tmp_path / "cache")


def test_split_is_by_episode_seeded_and_keeps_training_data():
    train, val = D.split_episodes(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert D.split_episodes(10, 0.2, seed=3) == (train, val)
    assert D.split_episodes(10, 0.2, seed=4) != (train, val)
    assert D.split_episodes(2, 0.1, seed=0)[1] != []  # a positive fraction gives at least one
    assert D.split_episodes(1, 0.5, seed=0) == ([0], [])
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_episodes(4, 1.0, seed=0)


def test_chunk_indices_follow_dt_and_mask_the_episode_end():
    stamps = np.arange(5) * 0.1  # camera at 10 Hz, actions every 0.2 s
    index, mask = D.chunk_indices(stamps, 0.2, 3)
    np.testing.assert_array_equal(index, [[0, 2, 4], [1, 3, 4], [2, 4, 4], [3, 4, 4], [4, 4, 4]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    index, mask = D.chunk_indices(np.array([0.0, 0.2, 0.4]), 0.2, 1)
    np.testing.assert_array_equal(index, [[0], [1], [2]])
    assert mask.all()
