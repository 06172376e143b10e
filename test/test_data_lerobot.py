"""LeRobotDataset v3.0 (and v2.1) reading, on datasets written here with pyarrow and a real H.264 encoder (PyAV).

Episodes share one data file and one mp4, as v3.0 packs them; each frame's colour encodes its
episode and step, so a frame taken from the wrong place in the video is caught.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from openvla_ros.data.lerobot import (
    EpisodeToWrite,
    LeRobotDataset,
    LeRobotError,
    VideoWriter,
    write_lerobot_dataset,
)
from openvla_ros.training.data import EpisodeReadOptions, cache_dataset, find_episode_sources

NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
LENGTHS = [6, 4, 5]


def _colour(e, i):
    return np.array([40 + 30 * i, 200 - 40 * e, 90], dtype=np.uint8)


def _episodes(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for e, n in enumerate(LENGTHS):
        images = [np.broadcast_to(_colour(e, i), (32, 48, 3)).copy() for i in range(n)]
        out.append(EpisodeToWrite(images=images, actions=rng.normal(size=(n, 7)),
                                  task=["pick the red cup", "open the drawer"][e % 2], states=rng.normal(size=(n, 3))))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "demo"
    eps = _episodes()
    write_lerobot_dataset(root, eps, fps=10, action_names=NAMES, state_names=["s0", "s1", "s2"])
    return root, eps


def test_a_v3_dataset_reads_every_episode_from_shared_files(dataset):
    root, eps = dataset
    ds = LeRobotDataset(root)
    assert ds.version == "v3.0" and ds.dt == pytest.approx(0.1) and ds.cameras == ["observation.images.main"]
    assert [e.length for e in ds.episodes] == LENGTHS
    assert len({e.data_file for e in ds.episodes}) == 1  # many episodes per file
    assert ds.names("action") == NAMES
    for e, ep in enumerate(eps):
        frames = ds.frames(e)
        np.testing.assert_allclose(frames.actions, ep.actions, atol=1e-6)  # float32 on disk
        np.testing.assert_allclose(frames.states, ep.states, atol=1e-6)
        assert frames.instructions == [ep.task] * LENGTHS[e]
        images = list(frames.images)
        assert len(images) == LENGTHS[e]
        for i, image in enumerate(images):  # the right frame, in RGB order (R, G and B all differ)
            np.testing.assert_allclose(image.reshape(-1, 3).mean(0), _colour(e, i), atol=6)


def test_stats_json_holds_the_datasets_statistics(dataset):
    root, eps = dataset
    stats = LeRobotDataset(root).stats()
    actions = np.concatenate([e.actions for e in eps])
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), atol=1e-9)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), atol=1e-9)


def test_training_caches_one_episode_per_lerobot_episode_with_fps_as_dt(dataset, tmp_path):
    root, eps = dataset
    sources = find_episode_sources([root])
    assert [s.episode for s in sources] == [0, 1, 2]
    ds = cache_dataset("lr", [root], EpisodeReadOptions(), tmp_path / "cache")
    assert ds.dt == pytest.approx(0.1) and ds.dim_names == NAMES
    assert [len(e) for e in ds.episodes] == LENGTHS
    assert ds.episodes[1].instructions[0] == "open the drawer"
    np.testing.assert_allclose(ds.episodes[2].actions, eps[2].actions, atol=1e-6)
    mean = np.asarray(ds.episodes[0].images[3], dtype=np.float64).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, _colour(0, 3), atol=6)  # resized to 224 px, still RGB


def test_a_v21_dataset_with_one_file_per_episode_reads_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "v21"
    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "fps": 5, "chunks_size": 1000,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.images.top": {"dtype": "video", "shape": [32, 48, 3]},
                         "action": {"dtype": "float32", "shape": [2], "names": {"motors": ["a", "b"]}}}}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "wave"}) + "\n")
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": ["wave"], "length": 3}) + "\n" for e in range(2)))
    for e in range(2):
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"action": [[float(e), float(i)] for i in range(3)],
                                 "timestamp": [i / 5 for i in range(3)], "frame_index": list(range(3)),
                                 "episode_index": [e] * 3, "index": list(range(3 * e, 3 * e + 3)),
                                 "task_index": [0] * 3}), path)
        video = VideoWriter(root / f"videos/chunk-000/observation.images.top/episode_{e:06d}.mp4", 5)
        for i in range(3):
            video.add(np.broadcast_to(_colour(e, i), (32, 48, 3)))
        video.close()
    ds = LeRobotDataset(root)
    assert ds.names("action") == ["a", "b"]
    frames = ds.frames(1)
    np.testing.assert_allclose(frames.actions, [[1, 0], [1, 1], [1, 2]])
    images = list(frames.images)
    np.testing.assert_allclose(images[2].reshape(-1, 3).mean(0), _colour(1, 2), atol=6)


def test_bad_lerobot_input_is_named(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(LeRobotError, match="no camera 'wrist'"):
        LeRobotDataset(root).frames(0, camera="wrist")
    with pytest.raises(LeRobotError, match="no feature 'effort'"):
        LeRobotDataset(root).frames(0, action_key="effort")
    with pytest.raises(LeRobotError, match="no episode 9"):
        LeRobotDataset(root).frames(9)
    bad = tmp_path / "bad"
    (bad / "meta").mkdir(parents=True)
    (bad / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v1.6", "fps": 10}))
    with pytest.raises(LeRobotError, match="codebase_version 'v1.6'"):
        LeRobotDataset(bad)
