"""Benchmarks (``-m bench``): bag reading throughput next to engine throughput on the tiny checkpoint.

Reading must never be the bottleneck of an evaluation: compare the two frames/s figures printed.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import BagReadOptions, read_frames
from openvla_ros.eval.open_loop import evaluate

N_FRAMES = 300


def _bench_bag(path, storage, compressed=False):
    rng = np.random.default_rng(0)
    with BagWriter(path, storage, "jazzy") as w:
        w.write_string("/vla/instruction", 0.0, "pick up the red block")
        for i in range(N_FRAMES):
            t = 1.0 + i / 30
            image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
            if compressed:
                w.write_compressed_image("/camera/image_raw/compressed", t, image, codec="jpeg")
            else:
                w.write_image("/camera/image_raw", t, image)
            w.write_twist("/expert", t, [0.1, 0, 0], [0, 0, 0.2])
    return path


@pytest.mark.bench
@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize("compressed", [False, True])
def test_bag_reading_throughput(tmp_path, storage, compressed):
    path = _bench_bag(tmp_path / "bag", storage, compressed)
    start = time.perf_counter()
    frames = read_frames(path, BagReadOptions(truth_topic="/expert", dt=0.2))
    elapsed = time.perf_counter() - start
    assert len(frames) == N_FRAMES
    kind = "jpeg" if compressed else "rgb8"
    print(f"\nbag reading {storage} 224x224 {kind}: {N_FRAMES / elapsed:.0f} frames/s")


@pytest.mark.bench
def test_engine_throughput_on_a_bag(tmp_path, torch_engine):
    path = _bench_bag(tmp_path / "bag", "mcap")
    frames = read_frames(path, BagReadOptions(truth_topic="/expert", dt=torch_engine.dt, max_frames=20))
    start = time.perf_counter()
    result = evaluate(torch_engine, frames, progress=False)
    elapsed = time.perf_counter() - start
    assert result.predictions.shape == (20, len(torch_engine.dim_names))
    latency = result.summary()["latency_ms"]
    print(f"\ntiny torch engine over a bag: {20 / elapsed:.1f} frames/s, "
          f"latency p50 {latency['p50']:.1f} ms p95 {latency['p95']:.1f} ms")
