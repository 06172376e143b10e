"""RLDS / Open X-Embodiment reading without TensorFlow, on tfrecord files written here (the
`tfrecord` package's writer) with a TFDS-style features.json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from openvla_ros.data.rlds import (
    RldsDataset,
    RldsEpisodeToWrite,
    RldsError,
    load_key_mapping,
    parse_features_json,
    write_rlds_episodes,
)
from openvla_ros.training.data import EpisodeReadOptions, cache_dataset

LENGTHS = [5, 3, 4]


def _colour(e, i):
    return np.array([200 - 30 * i, 60 + 40 * e, 20], dtype=np.uint8)


def _episodes(seed=0, camera="image"):
    rng = np.random.default_rng(seed)
    return [RldsEpisodeToWrite(images=[np.broadcast_to(_colour(e, i), (24, 32, 3)).copy() for i in range(n)],
                               actions=rng.normal(size=(n, 7)), instruction=f"put block {e} in the bowl", camera=camera)
            for e, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def rlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds") / "toy_dataset" / "1.0.0"
    eps = _episodes()
    write_rlds_episodes(root, "toy_dataset", eps, shards=2)
    return root, eps


def test_episodes_read_from_tfrecord_shards_in_file_order(rlds):
    root, eps = rlds
    ds = RldsDataset(root)
    assert ds.num_episodes == 3 and len(ds.files) == 2 and ds.cameras == ["observation/image"]
    for e, ep in enumerate(eps):
        steps = ds.episode(e)
        np.testing.assert_allclose(steps.actions, ep.actions, atol=1e-6)
        assert steps.instructions == [ep.instruction] * LENGTHS[e]
        for i, image in enumerate(steps.images):  # standard JPEGs decode in RGB order
            np.testing.assert_allclose(image.reshape(-1, 3).mean(0), _colour(e, i), atol=6)


def test_features_json_flattens_to_step_keys(rlds):
    root, _ = rlds
    specs = parse_features_json(json.loads((root / "features.json").read_text()))
    assert specs["steps/observation/image"].kind == "image"
    assert specs["steps/observation/image"].shape == (24, 32, 3)
    assert specs["steps/observation/image"].encoding == "jpeg"
    assert specs["steps/action"].shape == (7,)
    assert specs["steps/language_instruction"].kind == "text"


def test_a_yaml_key_mapping_picks_camera_and_concatenated_action_parts(tmp_path):
    root = tmp_path / "rt1ish" / "0.1.0"
    eps = _episodes(camera="rgb")
    for ep in eps:  # RT-1 style: the action is a dict of parts
        n = len(ep.images)
        ep.extra = {"steps/action_parts/world_vector": (ep.actions[:, :3].reshape(-1).tolist(), "float"),
                    "steps/action_parts/gripper": (ep.actions[:, 6].tolist(), "float")}
    write_rlds_episodes(root, "rt1ish", eps)
    tree = json.loads((root / "features.json").read_text())
    steps = tree["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]
    tensor = "tensorflow_datasets.core.features.tensor_feature.Tensor"
    steps["action_parts"] = {"featuresDict": {"features": {
        "world_vector": {"pythonClassName": tensor, "tensor": {"shape": {"dimensions": ["3"]}, "dtype": "float32"}},
        "gripper": {"pythonClassName": tensor, "tensor": {"shape": {}, "dtype": "float32"}}}}}
    (root / "features.json").write_text(json.dumps(tree))
    config = tmp_path / "oxe.yaml"
    config.write_text("rt1ish:\n  image: rgb\n  action: [action_parts/world_vector, action_parts/gripper]\n"
                      "  action_dim_names: [x, y, z, gripper]\n  dt: 0.333\n")
    mapping = load_key_mapping(config, root)
    ds = RldsDataset(root, mapping)
    assert ds.action_dim == 4
    np.testing.assert_allclose(ds.episode(1).actions, eps[1].actions[:, [0, 1, 2, 6]], atol=1e-6)
    cached = cache_dataset("rt1", [root], EpisodeReadOptions(rlds_config=str(config),
                                                             action_dim_names=["x", "y", "z", "gripper"]),
                           tmp_path / "cache")
    assert cached.dt == pytest.approx(0.333) and cached.dim_names == ["x", "y", "z", "gripper"]
    assert [len(e) for e in cached.episodes] == LENGTHS


def test_training_caches_rlds_episodes_in_rgb(rlds, tmp_path):
    root, eps = rlds
    ds = cache_dataset("toy", [root], EpisodeReadOptions(dt=0.2), tmp_path / "cache")
    assert [len(e) for e in ds.episodes] == LENGTHS
    assert ds.episodes[0].instructions[0] == "put block 0 in the bowl"
    mean = np.asarray(ds.episodes[2].images[1], dtype=np.float64).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, _colour(2, 1), atol=6)


def test_bad_rlds_input_is_named(rlds, tmp_path):
    root, _ = rlds
    with pytest.raises(RldsError, match="no image feature steps/observation/wrist"):
        RldsDataset(root, camera="wrist")
    with pytest.raises(RldsError, match="no episode 7"):
        RldsDataset(root).episode(7)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "features.json").write_text((root / "features.json").read_text())
    data = (root / "toy_dataset-train.tfrecord-00000-of-00002").read_bytes()
    (cut / "toy-train.tfrecord-00000-of-00001").write_bytes(data[:-10])
    with pytest.raises(RldsError, match="truncated"):
        RldsDataset(cut)
    config = tmp_path / "bad.yaml"
    config.write_text("image: image\ncolour: red\n")
    with pytest.raises(RldsError, match="unknown keys \\['colour'\\]"):
        load_key_mapping(config)
