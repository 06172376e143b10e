"""The generator of released-shape checkpoints: the 7B's names and sizes, small widths for the tests."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from openvla_ros.engines import create_engine
from openvla_ros.vla.checkpoint import Checkpoint
from openvla_ros.vla.loading import tensor_entries, weight_bytes
from openvla_ros.vla.shaped import (RELEASED_MAX_SHARD_BYTES, plan_shards, reduced_config, released_config,
                                    shaped_tensor, stored_tensor_specs, write_shaped_checkpoint)

RELEASED_PARAMS = 7_541_237_184  # openvla-7b's parameter count


def _pattern(name: str) -> str:
    return re.sub(r"\.(blocks|layers)\.\d+\.", r".\1.#.", name)


@pytest.fixture(scope="module")
def reduced_checkpoint(tmp_path_factory):
    # Small shards, so the reduced model is split over several files as the 7B is.
    return write_shaped_checkpoint(tmp_path_factory.mktemp("shaped") / "reduced", reduced_config(),
                                   max_shard_bytes=300_000)


def test_the_released_shape_has_the_7b_parameter_count_bytes_and_three_shards():
    specs = stored_tensor_specs(released_config())
    counts = {name: int(np.prod(shape)) for name, shape in specs}
    assert sum(counts.values()) == RELEASED_PARAMS
    assert counts["language_model.model.embed_tokens.weight"] == 32064 * 4096
    assert sum(1 for name in counts if name.endswith("mlp.down_proj.weight")) == 32
    assert dict(specs)["language_model.model.layers.0.mlp.gate_proj.weight"] == (11008, 4096)
    assert dict(specs)["projector.fc1.weight"] == (4 * 2176, 2176)  # DINOv2-L 1024 + SigLIP 1152 channels
    assert len(plan_shards(specs, 2, RELEASED_MAX_SHARD_BYTES)) == 3  # 15.1 GB of bf16


def test_the_reduced_checkpoint_has_the_released_names_at_small_widths(reduced_checkpoint):
    checkpoint = Checkpoint.open(reduced_checkpoint)
    entries = tensor_entries(checkpoint)
    released = {_pattern(name) for name, _ in stored_tensor_specs(released_config())}
    assert {_pattern(e.name) for e in entries} == released
    assert len(checkpoint.weight_files) > 2 and all(e.dtype == torch.bfloat16 for e in entries)
    index = json.loads((reduced_checkpoint / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == weight_bytes(entries, torch.bfloat16)
    assert sorted(index["weight_map"]) == sorted(e.name for e in entries)


def test_the_written_shards_are_safetensors_holding_the_drawn_tensors(reduced_checkpoint):
    from safetensors.torch import load_file

    checkpoint = Checkpoint.open(reduced_checkpoint)
    stored = {}
    for file in checkpoint.weight_files:
        stored.update(load_file(str(file)))  # the reference reader accepts our files
    cfg = checkpoint.config
    for name in ("language_model.lm_head.weight", "projector.fc1.weight", "vision_backbone.featurizer.blocks.0.ls1.scale_factor",
                 "language_model.model.norm.weight", "projector.fc2.bias"):
        drawn = shaped_tensor(name, tuple(stored[name].shape), seed=0, action_vocab_size=cfg.action_vocab_size,
                              n_bins=cfg.n_action_bins)
        assert torch.equal(stored[name], drawn), name
    assert stored["language_model.model.norm.weight"].eq(1).all() and stored["projector.fc2.bias"].eq(0).all()
    assert 0.015 < stored["projector.fc1.weight"].float().std().item() < 0.025


def test_the_reduced_checkpoint_loads_in_every_local_engine_and_gives_actions(reduced_checkpoint):
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    reference = create_engine("torch", reduced_checkpoint)
    assert reference.info()["dtype"] == "float32"  # auto: a small model
    tokens = reference.predict(image, "pick up the screw").tokens
    # the head favours the 256 action tokens (ids 256..511 of the reduced 512-piece vocabulary)
    assert len(tokens) == 7 and all(256 <= t < 512 for t in tokens.tolist())
    for name in ("bnb4", "int8"):
        assert create_engine(name, reduced_checkpoint).predict(image, "pick up the screw").is_finite


def test_cli_writes_a_reduced_checkpoint_and_measures_its_load_in_a_child(tmp_path, capsys):
    from openvla_ros.cli import main

    assert main(["make-shaped-checkpoint", str(tmp_path / "r"), "--reduced"]) == 0
    capsys.readouterr()
    assert main(["bench", "load", "--checkpoint", str(tmp_path / "r"), "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loaded"] and result["dtype"] == "bfloat16" and result["engine_dtype"] == "bfloat16"
    assert result["weight_bytes"] == weight_bytes(tensor_entries(Checkpoint.open(tmp_path / "r")), torch.bfloat16)
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0
    assert main(["make-shaped-checkpoint", str(tmp_path / "x"), "--layers", "1"]) == 2
    assert "--layers must be >= 2, got 1" in capsys.readouterr().err
