"""ONNX export + onnxruntime backend against the torch backend on the tiny checkpoints (float32)."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics

import numpy as np
import pytest
import torch

from openvla_ros.engines import create_engine
from openvla_ros.engines.base import Engine
from openvla_ros.engines.manifest import manifest_differences, read_manifest
from openvla_ros.engines.onnx_engine import OnnxEngine, resolve_providers
from openvla_ros.engines.onnx_export import add_export_onnx_parser, export_onnx
from openvla_ros.vla.checkpoint import Checkpoint

from conftest import random_image

INSTRUCTIONS = ["reach the red cube", "Pick up the blue cube", "open the drawer", "put the carrot on the plate",
                "stack the blocks"]
LOGIT_TOLERANCE = 1e-4  # absolute, float32; measured differences are ~1e-6


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def onnx_engine(tiny_checkpoint, onnx_dir):
    return OnnxEngine(tiny_checkpoint, onnx_dir)


def test_manifest_records_checkpoint_shapes_and_versions(tiny_checkpoint, onnx_dir, onnx_engine):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["checkpoint"]["fingerprint"] == Checkpoint.open(tiny_checkpoint).fingerprint()
    assert manifest["dtype"] == "float32" and manifest["opset"] == 18 and manifest["num_patches"] == 256
    assert manifest["architecture"]["num_hidden_layers"] == 2 and manifest["architecture"]["chunk_len"] == 1
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["versions"]["onnxruntime"] is not None
    # The graphs' declared I/O agrees with the manifest (numbers where static, names where dynamic).
    for name, session in onnx_engine.sessions.items():
        spec = manifest["graphs"][name]
        declared = {i.name: i.shape for i in session.get_inputs()} | {o.name: o.shape for o in session.get_outputs()}
        for io_name, shape in {**spec["inputs"], **spec["outputs"]}.items():
            assert len(declared[io_name]) == len(shape), io_name
            for got, want in zip(declared[io_name], shape):
                if isinstance(want, int):
                    assert got == want, (name, io_name, declared[io_name], shape)
                else:
                    assert isinstance(got, str), (name, io_name, declared[io_name], shape)
    assert manifest["graphs"]["vision"]["outputs"]["image_embeds"] == [1, 256, 64]


def test_tokens_identical_to_torch_on_20_images(onnx_engine, torch_engine):
    assert isinstance(onnx_engine, Engine)
    seen = set()
    for seed in range(20):
        image = random_image(seed)
        instruction = INSTRUCTIONS[seed % len(INSTRUCTIONS)]
        ours = onnx_engine.predict(image, instruction, stamp=3.0)
        reference = torch_engine.predict(image, instruction)
        assert ours.tokens.tolist() == reference.tokens.tolist(), seed
        assert np.array_equal(ours.actions, reference.actions) and ours.stamp == 3.0
        seen.add(tuple(ours.tokens.tolist()))
    assert len(seen) > 1  # the comparison covered different outputs, not one constant answer
    assert {"preprocess", "vision", "prefill", "decode", "total"} <= set(ours.timings_ms)


def test_logits_within_tolerance(onnx_engine, torch_engine):
    image, instruction = random_image(7), "reach the red cube"
    with torch.inference_mode():
        pixel_values, input_ids = torch_engine.prepare(image, instruction)
        embeds = torch_engine.multimodal_embeddings(pixel_values, input_ids)
        lm = torch_engine.model.language_model
        first = lm(inputs_embeds=embeds).logits[0, -1].numpy()
        token = int(first.argmax())
        longer = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        second = lm(inputs_embeds=longer).logits[0, -1].numpy()
    pixels, ids = onnx_engine.prepare(image, instruction)
    image_embeds = onnx_engine.image_embeds(pixels)
    assert np.abs(image_embeds - embeds[:, 1:257].numpy()).max() < LOGIT_TOLERANCE
    logits, keys, values = onnx_engine.prefill(ids, image_embeds)
    assert keys.shape == (2, 1, 4, embeds.shape[1], 16) and values.shape == keys.shape
    assert np.abs(logits[0] - first).max() < LOGIT_TOLERANCE
    step_logits, keys, _ = onnx_engine.sessions["decode"].run(
        None, {"input_ids": np.array([[token]], dtype=np.int64), "past_keys": keys, "past_values": values})
    assert keys.shape[3] == embeds.shape[1] + 1
    assert np.abs(step_logits[0] - second).max() < LOGIT_TOLERANCE


def test_chunk_checkpoint_k4_exported_through_the_cli_parser(tiny_chunk_checkpoint, tmp_path, capsys):
    out = tmp_path / "k4"
    parser = argparse.ArgumentParser()
    add_export_onnx_parser(parser.add_subparsers(dest="command"))
    # --no-optimize: the unoptimised graphs must agree too (and export twice as fast)
    args = parser.parse_args(["onnx", "--checkpoint", str(tiny_chunk_checkpoint), "--out", str(out), "--no-optimize"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["dtype"] == "float32" and printed["opset"] == 18
    engine = create_engine("onnx", tiny_chunk_checkpoint, onnx_dir=out, device="cpu", dtype="float32")
    reference = create_engine("torch", tiny_chunk_checkpoint)
    for seed in range(3):
        image = random_image(40 + seed)
        chunk = engine.predict(image, INSTRUCTIONS[seed])
        assert chunk.actions.shape == (4, 7) and chunk.tokens.shape == (28,)
        assert chunk.tokens.tolist() == reference.predict(image, INSTRUCTIONS[seed]).tokens.tolist()


def test_mismatched_manifest_says_what_differs(tiny_chunk_checkpoint, onnx_dir):
    with pytest.raises(ValueError) as info:
        OnnxEngine(tiny_chunk_checkpoint, onnx_dir)
    message = str(info.value)
    assert "checkpoint fingerprint" in message and "chunk_len: manifest 1, checkpoint 4" in message
    assert manifest_differences(read_manifest(onnx_dir, "onnx"), Checkpoint.open(tiny_chunk_checkpoint))


def test_missing_or_broken_files(tiny_checkpoint, onnx_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / "decode.onnx").unlink()
    with pytest.raises(ValueError, match=r"missing files named in its manifest: \['decode.onnx'\]"):
        OnnxEngine(tiny_checkpoint, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has no manifest.json"):
        OnnxEngine(tiny_checkpoint, broken)
    with pytest.raises(ValueError, match="does not exist"):
        OnnxEngine(tiny_checkpoint, tmp_path / "nowhere")
    (broken / "manifest.json").write_text(json.dumps({"format": "openvla-ros-tensorrt", "manifest_version": 1}))
    with pytest.raises(ValueError, match="expected 'openvla-ros-onnx'"):
        OnnxEngine(tiny_checkpoint, broken)
    with pytest.raises(ValueError, match="--onnx-dir"):
        create_engine("onnx", tiny_checkpoint)
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(tiny_checkpoint, tmp_path / "x", dtype="int4")


def test_provider_selection():
    assert resolve_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["cuda", "cpu"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="TensorrtExecutionProvider"):
        resolve_providers(["tensorrt"], ["CPUExecutionProvider"])


@pytest.mark.bench
def test_bench_onnx_vs_torch(onnx_engine, torch_engine, scene_image):
    """Median per-action latency of both backends on the same inputs (printed; run with -s)."""
    runs = {"onnx": [], "torch": []}
    stages = {"onnx": {}, "torch": {}}
    for i in range(23):
        for name, engine in (("onnx", onnx_engine), ("torch", torch_engine)):
            chunk = engine.predict(scene_image, "reach the red cube")
            if i >= 3:
                runs[name].append(chunk.timings_ms["total"])
                for stage, ms in chunk.timings_ms.items():
                    stages[name].setdefault(stage, []).append(ms)
    result = {name: {stage: round(statistics.median(v), 2) for stage, v in stages[name].items()} for name in stages}
    result["speedup_total"] = round(statistics.median(runs["torch"]) / statistics.median(runs["onnx"]), 2)
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps({"benchmark": "onnx_vs_torch_tiny_cpu", **result}))
    assert result["onnx"]["total"] > 0
