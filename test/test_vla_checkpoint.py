import json
import shutil

import pytest
import torch

from openvla_ros.engines.torch_engine import TorchEngine
from openvla_ros.vla.checkpoint import Checkpoint, CheckpointError
from openvla_ros.vla.model import VisionBackbone, load_model
from openvla_ros.vla.backbones import backbone_specs
from openvla_ros.vla.tiny import write_weights

from conftest import random_image


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_official_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "tokenizer.json", "tokenizer_config.json", "dataset_statistics.json", "preprocessor_config.json"} <= names
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert any(k.endswith("ls1.scale_factor") for k in keys) and not any(k.endswith(".gamma") for k in keys)
    assert {"projector.fc1.weight", "projector.fc3.bias", "language_model.lm_head.weight"} <= keys
    assert any(k.startswith("vision_backbone.fused_featurizer.attn_pool.") for k in keys)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["text_config"]["vocab_size"] - config["pad_to_multiple_of"] == config["pad_token_id"]


def test_deterministic_per_seed(tmp_path, tiny_checkpoint):
    from openvla_ros.vla.tiny import write_tiny_checkpoint

    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    other = write_tiny_checkpoint(tmp_path / "other", seed=5)
    assert (other / "model-00001-of-00002.safetensors").read_bytes() != (again / "model-00001-of-00002.safetensors").read_bytes()


def test_features_are_second_to_last_block_patches(torch_engine):
    # Independent path: timm's own get_intermediate_layers as the reference calls it.
    backbone = torch_engine.model.vision_backbone
    x = torch.randn(1, 3, 224, 224)
    for vit in (backbone.featurizer, backbone.fused_featurizer):
        (ref,) = vit.get_intermediate_layers(x, n={len(vit.blocks) - 2})
        ours = VisionBackbone._patch_features(vit, x)
        assert ours.shape == (1, 256, vit.embed_dim)
        assert torch.equal(ours, ref)


def test_single_file_weights_give_same_tokens(tmp_path, tiny_checkpoint, torch_engine):
    single = copy_ckpt(tiny_checkpoint, tmp_path / "single")
    state = dict(Checkpoint.open(single).iter_tensors())
    write_weights(single, state, shards=1)
    assert (single / "model.safetensors").exists() and not (single / "model.safetensors.index.json").exists()
    image = random_image(0)
    assert TorchEngine(single).predict(image, "reach").tokens.tolist() == torch_engine.predict(image, "reach").tokens.tolist()


def test_missing_and_unexpected_weights_are_listed(tmp_path, tiny_checkpoint):
    bad = copy_ckpt(tiny_checkpoint, tmp_path / "bad")
    state = dict(Checkpoint.open(bad).iter_tensors())
    del state["projector.fc2.bias"]
    state["projector.fc9.weight"] = torch.zeros(2)
    write_weights(bad, state, shards=1)
    with pytest.raises(CheckpointError, match=r"missing weights \(1\): projector\.fc2\.bias.*unexpected weights \(1\): projector\.fc9\.weight"):
        load_model(Checkpoint.open(bad))


def test_shape_mismatch_is_named(tmp_path, tiny_checkpoint):
    bad = copy_ckpt(tiny_checkpoint, tmp_path / "bad")
    state = dict(Checkpoint.open(bad).iter_tensors())
    state["projector.fc3.bias"] = torch.zeros(3)
    write_weights(bad, state, shards=1)
    with pytest.raises(CheckpointError, match=r"projector\.fc3\.bias has shape \(3,\)"):
        load_model(Checkpoint.open(bad))


def test_missing_files(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")
    for name, message in [("config.json", "missing file .*config.json"),
                          ("model-00002-of-00002.safetensors", "missing.*model-00002-of-00002"),
                          ("tokenizer.json", "no tokenizer")]:
        broken = copy_ckpt(tiny_checkpoint, tmp_path / name.replace(".", "_"))
        (broken / name).unlink()
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(broken)


def test_corrupt_safetensors_names_the_file(tmp_path, tiny_checkpoint):
    broken = copy_ckpt(tiny_checkpoint, tmp_path / "corrupt")
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read weights file .*model-00001-of-00002"):
        load_model(Checkpoint.open(broken))


def test_bad_config_values(tmp_path, tiny_checkpoint):
    broken = copy_ckpt(tiny_checkpoint, tmp_path / "cfg")
    config = json.loads((broken / "config.json").read_text())
    config["vision_backbone_id"] = "resnet-50"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown vision_backbone_id 'resnet-50'"):
        load_model(Checkpoint.open(broken))
    config["model_type"] = "llava"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'llava'"):
        Checkpoint.open(broken)


def test_dataset_statistics_override_norm_stats(tmp_path, tiny_checkpoint):
    ck = copy_ckpt(tiny_checkpoint, tmp_path / "stats")
    stats = json.loads((ck / "dataset_statistics.json").read_text())
    stats["my_robot"] = stats.pop("tiny_demo")
    (ck / "dataset_statistics.json").write_text(json.dumps(stats))
    assert Checkpoint.open(ck).unnorm_keys == ["my_robot"]
    (ck / "dataset_statistics.json").unlink()
    assert Checkpoint.open(ck).unnorm_keys == ["tiny_demo"]  # falls back to config.json norm_stats


def test_unknown_unnorm_key(torch_engine):
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'bridge_orig'; the checkpoint has \['tiny_demo'\]"):
        torch_engine.predict(random_image(1), "reach", unnorm_key="bridge_orig")


def test_a_text_config_that_leaves_llama_sizes_out_gets_llamaconfigs_defaults_as_the_released_one_does():
    # openvla-7b's config.json gives only vocab_size and pad_token_id in text_config.
    from transformers import LlamaConfig

    from openvla_ros.vla.checkpoint import CheckpointConfig, llm_parameter_count
    from openvla_ros.vla.shaped import released_config

    config = CheckpointConfig.from_dict(released_config())
    reference = LlamaConfig(**released_config()["text_config"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert config.text_config[key] == getattr(reference, key), key
    # Llama 2 7B has 6,738,415,616 parameters; the padded vocabulary adds 64 rows to the embedding and head.
    assert llm_parameter_count(config.text_config) == 6_738_415_616 + 2 * 64 * 4096
