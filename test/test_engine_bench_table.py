"""`bench engine --engine ...`: every backend on the same images, one row each (tiny checkpoint, CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openvla_ros.cli import main
from openvla_ros.engines.base import ActionChunk
from openvla_ros.engines.bench import (agreement, bench_backends, bench_inputs, check_and_warm, format_backends_table,
                                      interleaved_latencies)

from conftest import ManualClock


def test_cli_bench_torch_onnx_remote_bnb4(tiny_checkpoint, capsys):
    # onnx gets no --onnx-dir, so this also covers the export to a temporary directory.
    code = main(["bench", "engine", "--checkpoint", str(tiny_checkpoint), "--engine", "torch", "onnx", "remote", "bnb4",
                 "--runs", "2", "--warmup", "0", "--images", "2", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(tiny_checkpoint) and result["device"] == "cpu" and result["runs"] == 2
    rows = {row["engine"]: row for row in result["rows"]}
    assert [row["engine"] for row in result["rows"]] == ["torch", "onnx", "remote", "bnb4"]
    for name in ("torch", "onnx", "remote"):
        row = rows[name]
        assert row["available"] is True, row
        assert row["tokens_identical_to_torch_fp32"] is True, name
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"]
        assert row["tokens_per_action"] == 7 and row["tokens_per_s"] == pytest.approx(7 / (row["latency_ms_p50"] / 1e3))
        assert row["samples"] == 2 and row["rss_after_load_mb"] > 0 and row["peak_rss_mb"] > 0
        assert row["ratio_vs_torch"] == pytest.approx(rows["torch"]["latency_ms_p50"] / row["latency_ms_p50"])
    assert rows["torch"]["ratio_vs_torch"] == 1.0 and rows["torch"]["rss_increase_over_torch_mb"] == 0.0
    assert any("ru_maxrss" in note for note in result["notes"])
    if torch.cuda.is_available():
        assert rows["torch"]["gpu_peak_mb"] is None or rows["torch"]["gpu_peak_mb"] >= 0
    else:
        assert rows["torch"]["gpu_peak_mb"] is None
    # bitsandbytes runs on this CPU: a full row, quantised, its tokens compared with fp32's
    bnb = rows["bnb4"]
    assert bnb["available"] is True and bnb["device"] == "cpu" and bnb["tokens_per_action"] == 7
    assert isinstance(bnb["tokens_identical_to_torch_fp32"], bool) and bnb["latency_ms_p50"] > 0
    # 2 images x 3 instructions (the default extra two); fp32 backends agree exactly
    assert result["images"] == 6 and len(result["instructions"]) == 3
    for name in ("torch", "onnx", "remote"):
        assert rows[name]["token_agreement"] == 1.0 and rows[name]["mean_bin_distance"] == 0.0
        assert rows[name]["action_l2"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= bnb["token_agreement"] <= 1.0 and bnb["mean_bin_distance"] >= 0.0 and bnb["action_l2"] >= 0.0
    assert (bnb["token_agreement"] == 1.0) == bnb["tokens_identical_to_torch_fp32"] == (bnb["mean_bin_distance"] == 0.0)
    table = format_backends_table(result)
    assert table.splitlines()[0].startswith("engine") and "remote" in table


class _FakeEngine:
    """Answers tokens 0..6 (plus `shift` on the all-ones image), taking `step_s` on the fake clock per call."""

    def __init__(self, name, log, clock, step_s, shift=0):
        self.name, self.log, self.clock, self.step_s, self.shift = name, log, clock, step_s, shift

    def predict(self, image, instruction):
        self.log.append((self.name, int(image[0, 0, 0])))
        self.clock.advance(self.step_s)
        tokens = np.arange(7) + (self.shift if image[0, 0, 0] == 1 else 0)
        return ActionChunk(actions=np.zeros((1, 7)), dim_names=list("abcdefg"), dt=0.1, tokens=tokens)


IMAGES = [(np.zeros((4, 4, 3), np.uint8), "x"), (np.ones((4, 4, 3), np.uint8), "x")]
REFERENCE = [list(range(7)), list(range(7))]


def test_check_and_warm_checks_every_image():
    log, clock = [], ManualClock()
    shifted = _FakeEngine("shifted", log, clock, 0.01, shift=1)
    assert check_and_warm(shifted, IMAGES, warmup=1, reference_tokens=REFERENCE) == {
        "tokens_identical": False, "tokens_per_action": 7}
    assert log == [("shifted", 0), ("shifted", 1), ("shifted", 0)]
    same = _FakeEngine("same", [], clock, 0.01)
    assert check_and_warm(same, IMAGES, warmup=0, reference_tokens=REFERENCE)["tokens_identical"] is True


def test_agreement_counts_identical_tokens_bin_distance_and_action_error():
    def chunk(tokens, actions):
        return ActionChunk(actions=np.array([actions], float), dim_names=["a", "b"], dt=0.1, tokens=np.array(tokens),
                           normalised=np.array([actions], float) / 10)

    ours = [chunk([10, 20], [0.0, 3.0]), chunk([30, 40], [1.0, 1.0])]
    reference = [chunk([10, 22], [0.0, 0.0]), chunk([31, 40], [1.0, 5.0])]
    figures = agreement(ours, reference)
    assert figures["token_agreement"] == 0.5 and figures["mean_bin_distance"] == 0.75  # (0 + 2 + 1 + 0) / 4
    assert figures["action_l2"] == pytest.approx(3.5) and figures["normalised_l2"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="3 tokens against 4"):
        agreement([chunk([1, 2], [0, 0]), ActionChunk(actions=np.zeros((1, 1)), dim_names=["a"], dt=0.1, tokens=np.array([3]))],
                  reference)


def test_bench_inputs_pair_every_image_with_every_instruction():
    inputs = bench_inputs(2, ["reach", "push"])
    assert [text for _, text in inputs] == ["reach", "push", "reach", "push"]
    assert np.array_equal(inputs[0][0], inputs[1][0]) and not np.array_equal(inputs[0][0], inputs[2][0])
    with pytest.raises(ValueError, match="at least one instruction"):
        bench_inputs(1, [])


def test_interleaved_latencies_alternate_engines_and_time_each():
    log, clock = [], ManualClock()
    engines = {"a": _FakeEngine("a", log, clock, 0.010), "b": _FakeEngine("b", log, clock, 0.030, shift=1)}
    stats = interleaved_latencies(engines, IMAGES, runs=3, reference_tokens=REFERENCE, clock=clock)
    assert log == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 0), ("b", 0)]
    assert stats["a"]["latency_ms_p50"] == pytest.approx(10.0) and stats["b"]["latency_ms_p95"] == pytest.approx(30.0)
    assert stats["a"]["samples"] == 3 and stats["a"]["tokens_identical"] is True
    assert stats["b"]["tokens_identical"] is False  # wrong tokens on the second image during timed runs
    with pytest.raises(ValueError, match="runs must be >= 1, got 0"):
        interleaved_latencies(engines, IMAGES, runs=0, reference_tokens=REFERENCE)


def test_bench_backends_rejects_unknown_engine_and_bad_inputs(tiny_checkpoint):
    with pytest.raises(ValueError, match="'nope'"):
        bench_backends(tiny_checkpoint, ["nope"], inputs=bench_inputs(1, "x"))
    with pytest.raises(ValueError, match="images must be >= 1, got 0"):
        bench_inputs(0, "x")


def test_gpu_check_writes_one_json_with_every_part(tmp_path):
    """The GPU check's plumbing, run on the CPU (on a CUDA machine scripts/gpu_check.sh runs it whole)."""
    from openvla_ros.engines.gpu_check import run_gpu_check

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA machine"):
            run_gpu_check(tmp_path / "x.json", device="cuda")
    report = run_gpu_check(tmp_path / "check.json", device="cpu", wide=False, tests=False, engines=["torch", "int8"],
                           runs=2, workdir=tmp_path / "work", progress=lambda line: None)
    stored = json.loads((tmp_path / "check.json").read_text())
    assert stored["ok"] is True and stored == json.loads(json.dumps(report))
    rows = stored["parts"]["tiny_backends"]["rows"]
    assert sorted(rows) == ["int8", "torch"] and rows["torch"]["dtype"] == "bfloat16"
    assert rows["int8"]["available"] and 0.0 <= rows["int8"]["token_agreement"] <= 1.0
