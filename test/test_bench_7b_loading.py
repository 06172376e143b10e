"""Loading a checkpoint of the released 7B's shape (random bf16 weights, ~15 GB on disk) on this machine.

Marked `bench` (not in the default suite): it writes ~15 GB, unless OPENVLA_7B_SHAPED names a
directory that already holds one (`openvla-ros make-shaped-checkpoint DIR`). Each measurement runs in a
fresh child process (`openvla-ros bench load`); figures are printed with `-s`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from openvla_ros.engines.load_bench import measure_load
from openvla_ros.vla.loading import available_memory_bytes

pytestmark = pytest.mark.bench

WEIGHTS_BYTES_7B = 15_082_474_368  # 7,541,237,184 parameters in bf16
BF16_PEAK_OVER_WEIGHTS = 1.15


@pytest.fixture(scope="module")
def shaped_7b(tmp_path_factory):
    given = os.environ.get("OPENVLA_7B_SHAPED")
    if given and (Path(given) / "model.safetensors.index.json").exists():
        return Path(given)
    from openvla_ros.vla.shaped import write_shaped_checkpoint

    out = tmp_path_factory.mktemp("shaped-7b")
    if shutil.disk_usage(out).free < 17e9:
        pytest.skip("writing a 7B-shaped checkpoint needs ~16 GB of free disk")
    return write_shaped_checkpoint(out / "openvla-7b-shaped")


def test_7b_shape_loads_in_bfloat16_with_no_second_copy_of_the_weights(shaped_7b):
    if available_memory_bytes("cpu") < 17e9:
        pytest.skip("needs ~17 GB of available RAM for 15 GB of bf16 weights")
    result = measure_load(shaped_7b, engine="torch", dtype="auto")
    print(json.dumps(result))
    assert result["loaded"] and result["dtype"] == "bfloat16" and result["weight_bytes"] == WEIGHTS_BYTES_7B
    assert result["peak_over_weights"] <= BF16_PEAK_OVER_WEIGHTS


def test_7b_shape_in_float32_is_refused_before_allocating_on_a_machine_without_30_gb(shaped_7b):
    if available_memory_bytes("cpu") > 32e9:
        pytest.skip("this machine has room for float32")
    result = measure_load(shaped_7b, engine="torch", dtype="float32")
    print(json.dumps(result))
    assert not result["loaded"]
    assert "GB in float32" in result["error"] and "use --dtype bfloat16 or --engine bnb4" in result["error"]
    assert (result["peak_rss_mb"] - result["baseline_rss_mb"]) < 1024  # refused before reading weights
