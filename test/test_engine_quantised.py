"""Quantised backends on this CPU (bnb4/bnb8 through bitsandbytes, int8/int4 through torchao), and
the loading discipline under them: streamed shards, quantised while loading, a memory check first."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from openvla_ros.engines import create_engine
from openvla_ros.engines.bnb_engine import BnbQuantiser, bnb_settings
from openvla_ros.engines.quantise import quantisation_targets
from openvla_ros.engines.torchao_engine import TorchaoQuantiser, torchao_unavailable_reason
from openvla_ros.vla.checkpoint import Checkpoint, CheckpointError
from openvla_ros.vla.loading import (AUTO_FP32_MAX_PARAMS, InsufficientMemoryError, needed_bytes,
                                     read_safetensors_header, resolve_dtype, stream_tensors, tensor_entries,
                                     weight_bytes)
from openvla_ros.vla.model import load_model

from conftest import random_image

QUANTISED_LAYER_TYPES = {"bnb4": "Linear4bit", "bnb8": "Linear8bitLt"}
WEIGHT_TYPES = {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor"}
# Relative error of the language model's logits against float32 on the tiny model (random Gaussian
# weights, the hardest case for 4-bit): measured 0.014-0.019 for 8-bit, 0.20-0.28 for 4-bit.
LOGIT_ERROR_BOUND = {"bnb8": 0.05, "int8": 0.05, "bnb4": 0.4, "int4": 0.4}


@pytest.fixture(scope="module")
def quantised_engines(tiny_checkpoint):
    return {name: create_engine(name, tiny_checkpoint, device="cpu") for name in ("bnb4", "bnb8", "int8", "int4")}


@pytest.mark.parametrize("name", ["bnb4", "bnb8", "int8", "int4"])
def test_quantised_engines_run_on_the_cpu_with_only_the_decoder_linears_quantised(quantised_engines, name):
    engine = quantised_engines[name]
    info = engine.info()
    assert info["engine"] == name and info["device"] == "cpu" and info["quantisation"]["bits"] == int(name[-1])
    lm = engine.model.language_model
    for layer in lm.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            if name in QUANTISED_LAYER_TYPES:
                assert type(proj).__name__ == QUANTISED_LAYER_TYPES[name]
            else:
                assert type(proj.weight).__name__ == WEIGHT_TYPES[name]
    # embedding, head, projector and the towers keep the load dtype (bfloat16 by default)
    assert lm.lm_head.weight.dtype == lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert type(engine.model.projector.fc1) is nn.Linear and engine.model.projector.fc1.weight.dtype == torch.bfloat16
    for seed in range(3):
        chunk = engine.predict(random_image(seed), "reach the red cube")
        assert chunk.actions.shape == (1, 7) and chunk.is_finite and len(chunk.tokens) == 7


@pytest.mark.parametrize("name", ["bnb4", "bnb8", "int8", "int4"])
def test_quantised_logits_stay_close_to_float32_but_are_not_float32(quantised_engines, torch_engine, name):
    engine = quantised_engines[name]
    with torch.inference_mode():
        embeds = torch_engine.multimodal_embeddings(*torch_engine.prepare(random_image(0), "reach the red cube"))
        reference = torch_engine.model.language_model(inputs_embeds=embeds).logits.float()
        logits = engine.model.language_model(inputs_embeds=embeds.to(engine.dtype)).logits.float()
    error = ((logits - reference).norm() / reference.norm()).item()
    assert 1e-4 < error < LOGIT_ERROR_BOUND[name]


def test_int8_keeps_the_torch_decode_loop_and_its_tokens_match_its_own_forward(quantised_engines):
    """torchao weights dispatch through F.linear, so the fast decode loop runs them unchanged."""
    from openvla_ros.engines.bnb_engine import hf_greedy_decode

    engine = quantised_engines["int8"]
    image = random_image(4)
    with torch.inference_mode():
        embeds = engine.multimodal_embeddings(*engine.prepare(image, "reach the red cube"))
        slow = hf_greedy_decode(engine.model.language_model, embeds, engine.pipeline.n_tokens)
    assert engine.predict(image, "reach the red cube").tokens.tolist() == slow


@pytest.mark.parametrize("quantiser_factory", [
    lambda: BnbQuantiser(bnb_settings(4)),
    lambda: TorchaoQuantiser(8, device="cpu"),
], ids=["bnb4", "int8"])
def test_layers_are_quantised_while_loading_so_the_full_precision_model_is_never_held(tiny_checkpoint, quantiser_factory):
    quantiser = quantiser_factory()
    state = {"model": None, "seen": []}
    original = quantiser.quantise

    def watching(module, device):
        # Every other target is either still on the meta device (not read yet) or already quantised.
        model = state["model"]
        weights = [model.get_submodule(n).weight for n in sorted(quantiser.targets_seen)]
        full_precision = [w for w in weights if type(w) is nn.Parameter and w.is_floating_point() and w.device.type != "meta"]
        state["seen"].append(len(full_precision))
        return original(module, device)

    original_targets = quantiser.targets

    def targets(model):
        state["model"] = model
        quantiser.targets_seen = original_targets(model)
        return quantiser.targets_seen

    quantiser.quantise, quantiser.targets = watching, targets
    quantised = []
    model = load_model(Checkpoint.open(tiny_checkpoint), dtype=torch.bfloat16, quantiser=quantiser,
                       on_quantised=quantised.append)
    assert sorted(quantised) == sorted(quantisation_targets(model)) and len(quantised) == 14
    assert state["seen"] == [1] * 14  # only the layer being quantised is in full precision


def test_the_projector_is_quantised_on_request(tiny_checkpoint):
    engine = create_engine("bnb8", tiny_checkpoint, quantise_projector=True)
    assert type(engine.model.projector.fc1).__name__ == "Linear8bitLt" and engine.info()["quantisation"]["projector"]
    assert engine.predict(random_image(0), "reach the red cube").is_finite


def test_torchao_unavailable_reasons():
    assert torchao_unavailable_reason(8, "cpu", ao_installed=True) is None
    message = torchao_unavailable_reason(4, "cuda", ao_installed=False, cuda_available=False)
    assert "int4" in message and "CUDA" in message and "torchao" in message
    with pytest.raises(ValueError, match="int4 group_size must be one of"):
        TorchaoQuantiser(4, device="cpu", group_size=100)


# Loading discipline ------------------------------------------------------------------------------

def test_a_model_that_cannot_fit_fails_before_loading_naming_the_dtype_and_what_to_use(tiny_checkpoint):
    checkpoint = Checkpoint.open(tiny_checkpoint)
    entries = tensor_entries(checkpoint)
    fp32, bf16 = weight_bytes(entries, torch.float32), weight_bytes(entries, torch.bfloat16)
    assert fp32 == 2 * bf16 == 2 * sum(e.numel * 2 for e in entries)  # all floating, stored in fp32
    with pytest.raises(InsufficientMemoryError,
                       match=r"needs ~[0-9.]+ GB in float32, [0-9.]+ GB RAM available: use --dtype bfloat16 or --engine bnb4"):
        load_model(checkpoint, dtype=torch.float32, available_bytes=needed_bytes(fp32) - 1)
    # the same budget holds the bfloat16 model, and a 4-bit one fits in less still
    assert load_model(checkpoint, dtype=torch.bfloat16, available_bytes=needed_bytes(fp32) - 1) is not None
    quantiser = BnbQuantiser(bnb_settings(4))
    targets_bytes = weight_bytes(entries, torch.bfloat16,
                                 lambda e: quantiser.bytes_per_weight(e, e.name.rpartition(".")[0],
                                                                      {n for n in _tiny_targets(checkpoint)}))
    assert targets_bytes < bf16
    with pytest.raises(InsufficientMemoryError, match="as bnb4"):
        create_engine("bnb4", tiny_checkpoint, available_bytes=needed_bytes(targets_bytes) - 1)


def _tiny_targets(checkpoint):
    from accelerate import init_empty_weights

    from openvla_ros.vla.model import OpenVLAModel

    with init_empty_weights(include_buffers=False):
        return quantisation_targets(OpenVLAModel(checkpoint.config))


def test_auto_dtype_is_float32_for_small_models_and_bfloat16_at_7b_scale(tiny_checkpoint, torch_engine):
    checkpoint = Checkpoint.open(tiny_checkpoint)
    assert resolve_dtype("auto", "cpu", checkpoint) == "float32" == torch_engine.dtype_name
    assert resolve_dtype("auto", "cpu", n_params=7_541_237_184) == "bfloat16"
    assert resolve_dtype("auto", "cpu", n_params=AUTO_FP32_MAX_PARAMS - 1) == "float32"
    assert resolve_dtype("float16", "cpu", checkpoint) == "float16"


def test_streamed_tensors_equal_safetensors_own_reader(tiny_checkpoint):
    from safetensors.torch import load_file

    checkpoint = Checkpoint.open(tiny_checkpoint)
    theirs = {}
    for file in checkpoint.weight_files:
        theirs.update(load_file(str(file)))
    ours = {entry.name: tensor for entry, tensor in stream_tensors(tensor_entries(checkpoint))}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name])


def test_loaded_weights_are_assigned_not_copied_and_equal_the_stored_ones(tiny_checkpoint):
    from safetensors.torch import load_file

    checkpoint = Checkpoint.open(tiny_checkpoint)
    model = load_model(checkpoint, dtype=torch.float32)
    stored = {}
    for file in checkpoint.weight_files:
        stored.update(load_file(str(file)))
    state = model.stored_state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in stored.items())
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)  # one buffer per weight, none shared or left on meta
    assert not any(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:6], "shorter than a safetensors header"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length 1000000000 does not fit"),
    (lambda b: b[:-4], "does not match its byte range"),
])
def test_damaged_safetensors_headers_are_named_before_any_weight_is_read(tmp_path, tiny_checkpoint, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(CheckpointError, match=f"model-00001-of-00002.safetensors.*{message}"):
        read_safetensors_header(shard)
    with pytest.raises(CheckpointError, match="model-00001-of-00002"):
        load_model(Checkpoint.open(broken))


def test_an_unknown_stored_dtype_is_named(tmp_path, tiny_checkpoint):
    shard = tmp_path / "odd.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}).encode()
    shard.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(CheckpointError, match=r"odd.safetensors: tensor 'w' has a malformed entry"):
        read_safetensors_header(shard)


def test_the_predict_action_rerun_gives_the_engines_tokens_in_float32(torch_engine, tiny_chunk_checkpoint):
    """The yardstick of the speed benchmark computes what the engine computes, chunked models included."""
    from openvla_ros.engines.reference_predict import reference_predict_tokens

    chunk_engine = create_engine("torch", tiny_chunk_checkpoint)
    for engine, seeds in ((torch_engine, (0, 1, 2)), (chunk_engine, (3,))):
        for seed in seeds:
            image = random_image(seed)
            pixel_values, input_ids = engine.prepare(image, "reach the red cube")
            tokens = reference_predict_tokens(engine.model, pixel_values, input_ids, engine.pipeline.n_tokens)
            assert tokens == engine.predict(image, "reach the red cube").tokens.tolist()
