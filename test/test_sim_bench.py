"""Benchmark (run with `make bench`): IK step time on the Panda and simulated camera frame time."""
from __future__ import annotations

import json
import math

import pytest

from openvla_ros.sim.bench import bench_ik_and_camera


@pytest.mark.bench
def test_bench_ik_and_camera_reports_figures():
    report = bench_ik_and_camera(n_ik_steps=3000, n_frames=10)
    print("\n" + json.dumps(report, indent=2))
    for key in ("ik_step_us_median", "ik_step_us_p99", "camera_frame_ms_median"):
        assert math.isfinite(report[key]) and report[key] > 0
    assert report["ik_step_us_p99"] >= report["ik_step_us_median"]
    assert report["camera_size"] == [224, 224]


def test_bench_counts_with_an_injected_clock():
    ticks = iter(range(10**6))
    report = bench_ik_and_camera(n_ik_steps=5, n_frames=2, clock=lambda: next(ticks) * 1e-6)
    # Every timed call spans exactly one tick of the fake clock: 1 us per IK step, 0.001 ms per frame.
    assert report["ik_step_us_median"] == pytest.approx(1.0)
    assert report["camera_frame_ms_median"] == pytest.approx(1e-3)
    assert report["ik_steps"] == 5 and report["camera_frames"] == 2
