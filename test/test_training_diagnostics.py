"""The learning check (openvla_ros.training.diagnostics) on the tiny checkpoint's untrained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openvla_ros.training.collate import ActionCollator, TrainSample
from openvla_ros.training.diagnostics import _derangement, greedy_action_tokens, learning_check, normalised_mean
from openvla_ros.training.stats import dataset_entry, stats_for
from openvla_ros.vla.checkpoint import Checkpoint
from openvla_ros.vla.model import load_model

from conftest import random_image


def _setup(tiny_checkpoint, n=6, same_image=False, seed=0):
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, size=(n, 7))
    stats = stats_for({"d": dataset_entry(actions, num_trajectories=1)})
    ckpt = Checkpoint.open(tiny_checkpoint)
    collator = ActionCollator(ckpt, stats, 1)
    image = random_image(1)
    samples = [TrainSample(image if same_image else random_image(10 + i), "reach the cube", actions[i][None],
                           np.ones(1, bool), "d") for i in range(n)]
    return load_model(ckpt), collator, samples, {"d": normalised_mean(actions, stats["d"])}


def test_greedy_tokens_match_the_engines_tokens(tiny_checkpoint, torch_engine):
    model, collator, samples, _ = _setup(tiny_checkpoint, n=3)
    tokens = greedy_action_tokens(model, collator, samples, batch_size=2)
    for row, sample in zip(tokens, samples):
        np.testing.assert_array_equal(row, torch_engine.predict(sample.image, sample.instruction).tokens.reshape(-1))


def test_an_untrained_model_is_no_better_than_the_mean_and_is_warned_about(tiny_checkpoint):
    model, collator, samples, mean = _setup(tiny_checkpoint)
    check = learning_check(model, collator, samples, mean)
    assert check.model >= check.mean_predictor
    assert any("no better than predicting the mean" in w for w in check.warnings)
    assert check.swapped_instructions is None  # one instruction: nothing to swap
    assert set(check.metrics()) == {"heldout_error", "mean_predictor_error", "shuffled_image_error"}


def test_a_model_that_cannot_tell_images_apart_is_warned_about(tiny_checkpoint):
    model, collator, samples, mean = _setup(tiny_checkpoint, same_image=True)
    check = learning_check(model, collator, samples, mean)
    assert check.shuffled_images == check.model  # every sample has the same image: shuffling changes nothing
    assert any("ignores the image" in w for w in check.warnings)


def test_the_shuffle_moves_every_sample():
    for n in (2, 3, 10, 64):
        perm = _derangement(n, seed=n)
        assert sorted(perm.tolist()) == list(range(n)) and np.all(perm != np.arange(n))


def test_tracker_and_device_options_are_checked_before_training(tmp_path):
    import importlib.util

    from openvla_ros.training.trainer import DatasetConfig, TrainConfig, resolve_device

    config = TrainConfig(out_dir=str(tmp_path), datasets=[DatasetConfig("d", [str(tmp_path)])], from_scratch=True,
                         lora_rank=0, train_parts=["vision_backbone", "projector", "language_model"])
    assert config.device == "auto" and config.report_to == ["tensorboard"]
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"report_to \['mlflow'\]"):
        TrainConfig(**{**config.__dict__, "report_to": ["mlflow"]}).validated()
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="needs the wandb package"):
            TrainConfig(**{**config.__dict__, "report_to": ["wandb"]}).validated()
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda"):
        TrainConfig(**{**config.__dict__, "device": "tpu"}).validated()
