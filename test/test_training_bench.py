"""Training benchmark (openvla_ros.training.bench, `openvla-ros bench train`).

The bench-marked test measures for real (`make bench`); the others run in CI: two steps per run
with an injected clock, so the arithmetic of the figures is checked exactly, and the CLI wiring.
"""
from __future__ import annotations

import json
import math

import pytest

from openvla_ros import cli
from openvla_ros.training import bench as B

RUN_KEYS = {"num_workers", "samples_per_s", "step_ms_p50", "step_ms_p95", "warmup_step_ms", "final_loss", "wall_s",
            "peak_rss_mb"}


def _check_run(run: dict, workers: int) -> None:
    assert RUN_KEYS <= run.keys() and run["num_workers"] == workers
    for key in RUN_KEYS - {"num_workers"}:
        assert math.isfinite(run[key]) and run[key] > 0, (key, run[key])
    assert run["step_ms_p95"] >= run["step_ms_p50"]
    assert ("worker_peak_rss_mb" in run) == (workers > 0)


def test_bench_train_figures_with_an_injected_clock(tmp_path):
    ticks = iter(range(10 ** 6))
    report = B.bench_train(steps=2, batch_size=2, lora_rank=4, num_workers=1, episodes=2, frames=3, device="cpu",
                           work_dir=tmp_path, clock=lambda: next(ticks) * 0.01)
    _check_run(report, 1)
    _check_run(report["reference"], 0)
    # Each step spans exactly one 10 ms tick of the fake clock (nothing else reads it inside a step).
    for run in (report, report["reference"]):
        assert run["step_ms_p50"] == pytest.approx(10.0) and run["step_ms_p95"] == pytest.approx(10.0)
        assert run["samples_per_s"] == pytest.approx(2 / 0.01)
    assert report["ratio"] == pytest.approx(1.0)
    assert report["ratio_of"] == "samples_per_s with num_workers=1 / with num_workers=0"
    assert "num_workers=0" in report["reference"]["description"]
    assert report["losses_identical"] is True  # same seed: the workers build the very same batches
    assert report["final_loss"] == report["reference"]["final_loss"]
    assert (report["mode"], report["lora_rank"], report["steps"], report["batch_size"]) == ("lora", 4, 2, 2)
    assert report["device"] == "cpu" and "cuda_max_memory_allocated_mb" not in report
    json.dumps(report)  # the CLI prints it as JSON
    assert (tmp_path / "measured" / "config.json").exists()  # both runs exported a checkpoint
    assert (tmp_path / "reference" / "config.json").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 1}, "steps must be >= 2"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"lora_rank": 0}, "lora_rank must be >= 1"),
    ({"num_workers": 0}, "num_workers must be >= 1"),
])
def test_bench_train_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        B.bench_train(**kwargs)


def test_bench_train_command_passes_its_flags(monkeypatch, capsys):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return {"benchmark": "train"}

    monkeypatch.setattr(B, "bench_train", fake)
    assert cli.main(["bench", "train", "--steps", "5", "--batch-size", "3", "--full", "--num-workers", "4", "--json"]) == 0
    assert calls == [{"steps": 5, "batch_size": 3, "lora_rank": 32, "full": True, "num_workers": 4, "device": None}]
    assert json.loads(capsys.readouterr().out) == {"benchmark": "train"}
    with pytest.raises(SystemExit):
        cli.main(["bench", "train", "--full", "--lora-rank", "8"])
    assert cli.main(["bench", "train", "--threads", "-1"]) == 2
    assert "--threads must be >= 0, got -1" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["bench", "train", "--steps", "1"]) == 2
    assert "openvla-ros: error: steps must be >= 2 (a warm-up step and one timed), got 1" in capsys.readouterr().err


@pytest.mark.bench
def test_bench_train_reports_figures(capsys):
    assert cli.main(["bench", "train", "--steps", "6", "--batch-size", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print("\n" + json.dumps(report, indent=2))
    _check_run(report, 2)
    _check_run(report["reference"], 0)
    assert report["steps"] == 6 and report["warmup_steps"] == 1 and report["batch_size"] == 4
    assert report["losses_identical"] is True
    assert 0.05 < report["ratio"] < 20  # a real ratio of two real throughputs, not a placeholder
    assert report["ratio"] == pytest.approx(report["samples_per_s"] / report["reference"]["samples_per_s"])
    assert report["peak_rss_mb"] > 100  # torch alone is more than that
