"""This engine against a re-run of OpenVLA's own predict_action at the released widths (bench).

The real DINOv2-L + SigLIP-So400M towers, the fused projector and a language model at Llama-2-7B's
width with 2 layers (random weights; OPENVLA_WIDE_2L names a directory that already holds one, else
~2.9 GB are written to a temporary directory: `openvla-ros make-shaped-checkpoint DIR --layers 2`).
Same process, interleaved runs, float32 and bfloat16; figures printed with `-s`, tokens checked,
speed reported, not asserted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from openvla_ros.engines.bench import bench_engine, synthetic_scene
from openvla_ros.engines.torch_engine import TorchEngine

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def wide_two_layers(tmp_path_factory):
    given = os.environ.get("OPENVLA_WIDE_2L")
    if given and (Path(given) / "model.safetensors.index.json").exists():
        return Path(given)
    from openvla_ros.vla.shaped import released_config, write_shaped_checkpoint

    return write_shaped_checkpoint(tmp_path_factory.mktemp("wide") / "wide-2l", released_config(layers=2))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_against_predict_action_at_released_widths(wide_two_layers, dtype):
    engine = TorchEngine(wide_two_layers, dtype=dtype)
    result = bench_engine(engine, synthetic_scene(seed=0), "pick up the blue block", runs=3, warmup=1)
    print(json.dumps({k: result[k] for k in ("ours_ms", "reference_ms", "predict_action_ms", "speedup_vs_predict_action",
                                             "speedup_total", "tokens_identical", "tokens_identical_to_predict_action")}
                     | {"dtype": dtype, "threads": result["torch_threads"]}))
    assert result["predict_action_ms"] > 0 and result["ours_ms"]["total"] > 0
    if dtype == "float32":
        assert result["tokens_identical_to_predict_action"] and result["tokens_identical"]
