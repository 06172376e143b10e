"""`openvla-ros convert` between formats, and the round trip bags -> LeRobot -> training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openvla_ros.cli import main
from openvla_ros.data.lerobot import LeRobotDataset
from openvla_ros.data.rlds import RldsEpisodeToWrite, write_rlds_episodes
from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import BagReadOptions, read_frames

NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


def _colour(e, i):
    return np.array([30 + 25 * i, 180 - 50 * e, 100], dtype=np.uint8)


def _write_bags(root, n_episodes=3, n=6, size=(30, 40)):
    rng = np.random.default_rng(0)
    actions = []
    for e in range(n_episodes):
        a = rng.uniform(-1, 1, size=(n, 7))
        actions.append(a)
        with BagWriter(root / f"ep{e}", "mcap") as w:
            w.write_string("/vla/instruction", 0.95, f"task {e}")
            for i in range(n):
                t = 1.0 + 0.2 * i
                w.write_image("/cam", t, np.broadcast_to(_colour(e, i), (*size, 3)).copy(), encoding="bgr8")
                w.write_float64_array("/cmd", t, a[i])
    return actions


def test_bags_convert_to_a_lerobot_dataset_with_their_frames_actions_and_tasks(tmp_path, capsys):
    actions = _write_bags(tmp_path / "bags")
    code = main(["convert", str(tmp_path / "bags"), "--to", "lerobot", "--out", str(tmp_path / "lr"),
                 "--action-topic", "/cmd", "--action-dims", ",".join(NAMES), "--dt", "0.2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 3 and result["frames"] == 18 and result["fps"] == pytest.approx(5.0)
    ds = LeRobotDataset(tmp_path / "lr")
    assert ds.version == "v3.0" and ds.fps == pytest.approx(5.0) and ds.names("action") == NAMES
    for e in range(3):
        frames = ds.frames(e)
        np.testing.assert_allclose(frames.actions, actions[e], atol=1e-6)
        assert frames.instructions == [f"task {e}"] * 6
        for i, image in enumerate(frames.images):
            assert image.shape == (30, 40, 3)
            np.testing.assert_allclose(image.reshape(-1, 3).mean(0), _colour(e, i), atol=6)


def test_rlds_and_lerobot_convert_to_bags_that_eval_reads_back(tmp_path, capsys):
    rng = np.random.default_rng(1)
    eps = [RldsEpisodeToWrite(images=[np.broadcast_to(_colour(e, i), (24, 32, 3)).copy() for i in range(4)],
                              actions=rng.normal(size=(4, 7)), instruction=f"stack {e}") for e in range(2)]
    write_rlds_episodes(tmp_path / "rlds", "toy", eps)
    assert main(["convert", str(tmp_path / "rlds"), "--to", "bags", "--out", str(tmp_path / "bags"),
                 "--action-dims", ",".join(NAMES), "--dt", "0.25"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["bags"]) == 2
    frames = read_frames(result["bags"][1], BagReadOptions(truth_topic="/dataset/action", dt=0.25))
    assert frames.dim_names == NAMES and len(frames) == 4
    np.testing.assert_allclose(frames.truths(), eps[1].actions, atol=1e-6)
    assert frames.frames[0].instruction == "stack 1"
    assert frames.frames[3].stamp - frames.frames[0].stamp == pytest.approx(0.75)
    np.testing.assert_allclose(frames.frames[2].image.reshape(-1, 3).mean(0), _colour(1, 2), atol=6)

    # ... and a LeRobot dataset made from those bags converts back to the same frames.
    assert main(["convert", *result["bags"], "--to", "lerobot", "--out", str(tmp_path / "lr"),
                 "--action-topic", "/dataset/action", "--dt", "0.25"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "lr"), "--to", "bags", "--out", str(tmp_path / "again")]) == 0
    again = json.loads(capsys.readouterr().out)
    back = read_frames(again["bags"][0], BagReadOptions(truth_topic="/dataset/action", dt=0.25))
    np.testing.assert_allclose(back.truths(), eps[0].actions, atol=1e-5)


def test_convert_errors_name_the_problem(tmp_path, capsys):
    _write_bags(tmp_path / "bags", n_episodes=1)
    assert main(["convert", str(tmp_path / "bags"), "--to", "lerobot", "--out", str(tmp_path / "lr")]) == 2
    assert "needs an action topic" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), "--to", "bags", "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bags_to_lerobot_to_training_round_trip(tmp_path, tiny_checkpoint, capsys):
    from openvla_ros.training.data import EpisodeReadOptions
    from openvla_ros.training.trainer import DatasetConfig, TrainConfig, run_training
    from openvla_ros.vla import constants as C

    actions = _write_bags(tmp_path / "bags", n_episodes=3, n=5, size=(32, 32))
    assert main(["convert", str(tmp_path / "bags"), "--to", "lerobot", "--out", str(tmp_path / "lr"),
                 "--action-topic", "/cmd", "--action-dims", ",".join(NAMES)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    result = run_training(TrainConfig(
        out_dir=str(out), datasets=[DatasetConfig(name="converted", paths=[str(tmp_path / "lr")],
                                                  read=EpisodeReadOptions())],
        base_checkpoint=str(tiny_checkpoint), steps=2, batch_size=2, val_fraction=0.34, eval_every=2,
        progress=False, lora_rank=4))
    assert result.steps == 2 and np.isfinite(result.final_loss)
    assert any((out / "tensorboard").iterdir())  # on by default when installed
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["learning_check"]["samples"] == 5  # the held-out episode's frames
    run = json.loads((out / "run_config.json").read_text())
    assert run["config"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    config = json.loads((out / "config.json").read_text())
    stats = config["norm_stats"]["converted"]["action"]
    assert config[C.CONFIG_KEY_DIM_NAMES] == NAMES
    train_eps = json.loads((out / "run_config.json").read_text())["train_episodes"][0]
    seen = np.concatenate([actions[e] for e in train_eps])
    np.testing.assert_allclose(stats["q99"], np.quantile(seen, 0.99, axis=0), atol=1e-5)
    assert config[C.CONFIG_KEY_DT] == pytest.approx(0.2)  # the LeRobot dataset's fps, from the bags' dt
