"""bnb4/bnb8 and TensorRT backends: their CPU-side logic here; the GPU paths when CUDA is present."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from openvla_ros.engines import create_engine
from openvla_ros.engines.bnb_engine import (bnb_settings, bnb_unavailable_reason, hf_greedy_decode,
                                            quantisable_linears, quantised_weight_bytes)
from openvla_ros.engines.manifest import read_manifest, write_manifest
from openvla_ros.engines.onnx_export import export_onnx
from openvla_ros.engines.tensorrt_engine import (TensorRTEngine, buffer_plan, build_trt, check_precision,
                                                 count_qdq_nodes, shape_profiles, tensorrt_unavailable_reason,
                                                 trt_manifest)
from openvla_ros.vla.checkpoint import Checkpoint

from conftest import random_image

HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# bitsandbytes ------------------------------------------------------------------------------------
def test_bnb_settings():
    assert bnb_settings(4) == {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert bnb_settings(8, int8_threshold=0.0)["int8_threshold"] == 0.0
    for kwargs, message in [({"bits": 3}, "bits must be 4 or 8"), ({"bits": 4, "quant_type": "int4"}, "quant_type"),
                            ({"bits": 8, "int8_threshold": float("nan")}, "int8_threshold"),
                            ({"bits": 4, "compute_dtype": "float64"}, "dtype")]:
        with pytest.raises(ValueError, match=message):
            bnb_settings(kwargs.pop("bits"), **kwargs)


def test_bnb_unavailable_reasons_name_what_is_missing_for_the_device():
    assert bnb_unavailable_reason("cpu", cuda_available=False, bnb_installed=True) is None
    assert bnb_unavailable_reason("cuda", cuda_available=True, bnb_installed=True) is None
    no_gpu = bnb_unavailable_reason("cuda:0", cuda_available=False, bnb_installed=True)
    assert "CUDA" in no_gpu and "'cuda:0'" in no_gpu and "--device cpu" in no_gpu and "bitsandbytes package" not in no_gpu
    no_package = bnb_unavailable_reason("cpu", cuda_available=False, bnb_installed=False)
    assert "bitsandbytes" in no_package and "CUDA" not in no_package


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("name", ["bnb4", "bnb8"])
def test_bnb_engine_on_a_cuda_device_without_cuda_says_so(tiny_checkpoint, name):
    with pytest.raises(ValueError, match="CUDA GPU for device 'cuda'"):
        create_engine(name, tiny_checkpoint, device="cuda")


def test_quantised_layers_and_sizes(torch_engine):
    lm = torch_engine.model.language_model
    names = quantisable_linears(lm)
    per_layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert sorted(names) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in per_layer)
    # tiny LM: hidden 64, MLP 128, 2 layers, vocab 576: 2 x (4*64*64 + 3*64*128) quantised weights,
    # embedding + head (2*576*64) and 5 norms of 64 kept in bf16.
    quantised, kept = 2 * (4 * 64 * 64 + 3 * 64 * 128), 2 * 576 * 64 + 5 * 64
    assert quantised_weight_bytes(lm, 4) == {"bf16_bytes": 2 * (quantised + kept),
                                             "quantised_bytes": quantised // 2 + 4 * (quantised // 64) + 2 * kept}
    assert quantised_weight_bytes(lm, 8)["quantised_bytes"] == quantised + 4 * (2 * (4 * 64 + 2 * 128 + 64)) + 2 * kept


def test_hf_greedy_decode_equals_our_decode_loop(torch_engine, tiny_chunk_checkpoint):
    """The decode path of the bnb engines (module forwards + HF cache), checked on CPU in float32."""
    chunk_engine = create_engine("torch", tiny_chunk_checkpoint)
    for engine, seeds in ((torch_engine, (0, 1, 2)), (chunk_engine, (3,))):
        for seed in seeds:
            image = random_image(seed)
            with torch.inference_mode():
                embeds = engine.multimodal_embeddings(*engine.prepare(image, "reach the red cube"))
            tokens = hf_greedy_decode(engine.model.language_model, embeds, engine.pipeline.n_tokens)
            assert tokens == engine.predict(image, "reach the red cube").tokens.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("name", ["bnb4", "bnb8"])
def test_bnb_engine_on_gpu(tiny_checkpoint, name):
    engine = create_engine(name, tiny_checkpoint, device="cuda")
    assert engine.info()["device"] == "cuda"
    chunk = engine.predict(random_image(0), "reach the red cube")
    assert chunk.actions.shape == (1, 7) and chunk.is_finite and engine.info()["quantisation"]["bits"] == int(name[-1])
    assert type(engine.model.language_model.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")


# TensorRT ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_only_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-vision") / "tiny"
    export_onnx(tiny_checkpoint, out, graphs=("vision",), optimize=False)
    return out


def test_precision_rules(vision_only_export):
    assert check_precision("fp16", (8, 6), 0) == ("FP16",)
    assert check_precision("bf16", (9, 0), 0) == ("BF16",)
    assert check_precision("fp8", (9, 0), 12) == ("FP8", "FP16")
    with pytest.raises(ValueError, match="compute capability >= 8.0, this one is 7.5"):
        check_precision("bf16", (7, 5), 0)
    with pytest.raises(ValueError, match="QuantizeLinear"):
        check_precision("int8", (9, 0), count_qdq_nodes(vision_only_export / "vision.onnx"))
    with pytest.raises(ValueError, match="unknown precision"):
        check_precision("int4", (9, 0), 0)


def test_qdq_nodes_are_counted(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    onnx.save(helper.make_model(graph), tmp_path / "q.onnx")
    assert count_qdq_nodes(tmp_path / "q.onnx") == 2


def test_shape_profiles_and_buffer_plan(vision_only_export):
    manifest = read_manifest(vision_only_export, "onnx")
    profiles = shape_profiles(manifest, 7, max_prompt_tokens=128, opt_prompt_tokens=32)
    assert profiles["prefill"] == {"input_ids": ((1, 2), (1, 32), (1, 128))}
    # tiny: 2 layers, 4 KV heads, head dim 16, 256 patches; 7 tokens: caches of 2+256 .. 128+256+5
    assert profiles["decode"]["past_keys"] == ((2, 1, 4, 258, 16), (2, 1, 4, 291, 16), (2, 1, 4, 389, 16))
    assert profiles["decode"]["past_values"] == profiles["decode"]["past_keys"]
    plan = buffer_plan(manifest, profiles)
    assert plan["kv_keys_a"]["shape"] == [2, 1, 4, 390, 16]  # the last step writes 389 + 1
    assert plan["kv_keys_a"]["bytes"] == 2 * 4 * 390 * 16 * 4
    assert plan["pixel_values"]["shape"] == [1, 6, 224, 224] and plan["image_embeds"]["shape"] == [1, 256, 64]
    assert plan["logits"] == {"shape": [1, 576], "dtype": "float32", "bytes": 576 * 4}
    assert plan["prompt_ids"] == {"shape": [1, 128], "dtype": "int64", "bytes": 1024}
    with pytest.raises(ValueError, match="exceed the model's 2048 positions"):
        shape_profiles(manifest, 7, max_prompt_tokens=1800)
    with pytest.raises(ValueError, match="opt_prompt_tokens"):
        shape_profiles(manifest, 7, max_prompt_tokens=16, opt_prompt_tokens=32)


def test_tensorrt_unavailable_reasons():
    assert tensorrt_unavailable_reason(cuda_available=True, trt_installed=True) is None
    message = tensorrt_unavailable_reason(cuda_available=False, trt_installed=False)
    assert "CUDA" in message and "tensorrt" in message


def test_tensorrt_manifest_checks_and_missing_gpu(tiny_checkpoint, tiny_chunk_checkpoint, vision_only_export, tmp_path):
    manifest = read_manifest(vision_only_export, "onnx")
    profiles = {"vision": {}}
    trt_dir = tmp_path / "trt"
    trt_dir.mkdir()
    (trt_dir / "vision.plan").write_bytes(b"not a real plan")
    written = trt_manifest(manifest, Checkpoint.open(tiny_checkpoint), precision="fp16", profiles=profiles,
                           plans={"vision": "vision.plan"}, gpu={"name": "none"})
    write_manifest(trt_dir, written)
    stored = json.loads((trt_dir / "manifest.json").read_text())
    assert stored["format"] == "openvla-ros-tensorrt" and stored["precision"] == "fp16"
    assert stored["onnx_fingerprint"] == manifest["checkpoint"]["fingerprint"]
    with pytest.raises(ValueError, match="chunk_len: manifest 1, checkpoint 4"):
        TensorRTEngine(tiny_chunk_checkpoint, trt_dir)
    with pytest.raises(ValueError, match="--trt-dir"):
        create_engine("tensorrt", tiny_checkpoint)
    if not (HAS_CUDA and HAS_TRT):
        with pytest.raises(ValueError, match="TensorRT needs"):
            TensorRTEngine(tiny_checkpoint, trt_dir)
        with pytest.raises(ValueError, match="TensorRT needs"):
            build_trt(tiny_checkpoint, vision_only_export, tmp_path / "built")
    with pytest.raises(ValueError, match="chunk_len"):
        build_trt(tiny_chunk_checkpoint, vision_only_export, tmp_path / "built")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs CUDA and tensorrt")
def test_tensorrt_fp32_tokens_equal_torch(tiny_checkpoint, torch_engine, tmp_path):
    export_onnx(tiny_checkpoint, tmp_path / "onnx")
    build_trt(tiny_checkpoint, tmp_path / "onnx", tmp_path / "trt", precision="fp32", max_prompt_tokens=64)
    engine = create_engine("tensorrt", tiny_checkpoint, trt_dir=tmp_path / "trt")
    for seed in range(5):
        image = random_image(seed)
        assert engine.predict(image, "reach the red cube").tokens.tolist() == \
            torch_engine.predict(image, "reach the red cube").tokens.tolist()
