"""Benchmarks (`make bench`): engine decode loop vs generate(), and the control stream through ROS.

They print their JSON figures; the asserts check that the measurement happened and that tokens
match, never a speed (speed targets are reported, not asserted).
"""
import json

import pytest

pytestmark = pytest.mark.bench


def test_bench_engine(torch_engine, scene_image):
    from openvla_ros.engines.bench import bench_engine

    result = bench_engine(torch_engine, scene_image, "reach the red cube", runs=20, warmup=3)
    print(json.dumps({k: result[k] for k in ("ours_ms", "reference_ms", "speedup_lm", "speedup_total", "tokens_identical")}))
    assert result["tokens_identical"]
    assert result["ours_ms"]["lm"] > 0 and result["reference_ms"]["lm"] > 0


def test_bench_control(tiny_checkpoint):
    from openvla_ros.nodes.bench_control import bench_control

    result = bench_control(checkpoint=tiny_checkpoint, rate=100.0, seconds=5.0)
    print(json.dumps(result))
    assert result["commands"] > 100
    assert result["chunks"] > 0 and result["e2e_latency_ms_p50"] is not None
