"""Open-loop evaluation (openvla_ros.eval.open_loop + report) with a small deterministic engine.

The engine reads the frame number from the image's top-left pixel and answers a fixed table row
(plus an optional offset), so the expected metrics follow from the table by hand.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from openvla_ros.engines.base import ActionChunk
from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.eval.bags import BagReadOptions, read_frames
from openvla_ros.eval.open_loop import EvalOptions, evaluate, load_instruction_pairs, run_eval
from openvla_ros.vla.constants import DEFAULT_ACTION_DIM_NAMES

DIMS = list(DEFAULT_ACTION_DIM_NAMES)
N_FRAMES = 12
TABLE = np.column_stack([
    np.random.default_rng(7).uniform(-0.05, 0.05, size=(N_FRAMES, 6)),
    (np.arange(N_FRAMES) % 3 == 0).astype(float),  # gripper 1, 0, 0, 1, ...
])


class TableEngine:
    """Deterministic engine: TABLE[image[0, 0, 0]] + offset, dx + gain * len(instruction), dyaw + jitter per call."""

    dim_names = DIMS
    dt = 0.2
    chunk_len = 2

    def __init__(self, name="table", offset=None, instruction_gain=0.0, jitter=0.0, nan_frames=()):
        self.name = name
        self.offset = np.zeros(7) if offset is None else np.asarray(offset, dtype=float)
        self.instruction_gain = instruction_gain
        self.jitter = jitter
        self.nan_frames = set(nan_frames)
        self.calls = 0
        self.closed = False

    def predict(self, image, instruction, *, stamp=0.0, unnorm_key=None):
        index = int(image[0, 0, 0])
        action = TABLE[index] + self.offset
        action[0] += self.instruction_gain * len(instruction)
        action[5] += self.jitter * (self.calls % 3)
        self.calls += 1
        if index in self.nan_frames:
            action[2] = np.nan
        return ActionChunk(actions=np.stack([action, action + 1.0]), dim_names=DIMS, dt=self.dt, stamp=stamp,
                           tokens=np.array([31000 + index, 31100]), unnorm_key=unnorm_key)

    def info(self):
        return {"checkpoint": self.name, "device": "cpu"}

    def close(self):
        self.closed = True


def _frame_image(i: int) -> np.ndarray:
    image = np.random.default_rng(i).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image[0, 0, 0] = i
    return image


def _write_bag(path, storage="sqlite3", typestore="humble"):
    with BagWriter(path, storage, typestore) as w:
        w.write_string("/vla/instruction", 0.9, "pick up the screw")
        for i in range(N_FRAMES):
            t = 1.0 + 0.2 * i
            w.write_image("/camera/image_raw", t, _frame_image(i))
            w.write_joint_trajectory("/vla/action_chunk", t, DIMS, [TABLE[i], TABLE[i] * 2], dt=0.2)
    return path


OPTIONS = BagReadOptions(truth_topic="/vla/action_chunk", tolerance=0.0)


class StepClock:
    """Advances 5 ms per reading, so every predict() measures exactly 5 ms."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 0.005
        return self.now


def test_exact_predictions_score_perfectly_and_files_are_written(tmp_path):
    bag = _write_bag(tmp_path / "bag")
    out = tmp_path / "out"
    engines = []

    def factory(checkpoint):
        engines.append(TableEngine(name=str(checkpoint)))
        return engines[-1]

    rows = run_eval(factory, ["ckpt-a"], [bag], EvalOptions(bag=OPTIONS), out, progress=False, clock=StepClock())
    assert engines[0].closed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == N_FRAMES
    assert summary["mae"] == {d: 0.0 for d in DIMS} and summary["rmse"] == {d: 0.0 for d in DIMS}
    assert summary["l2_mean"] == 0.0 and summary["nrmse"] == 0.0 and summary["accuracy"] == 1.0
    assert summary["gripper_accuracy"] == 1.0
    assert summary["latency_ms"]["p50"] == pytest.approx(5.0) and summary["latency_ms"]["p95"] == pytest.approx(5.0)
    assert summary["engine"] == {"name": "ckpt-a", "checkpoint": "ckpt-a", "device": "cpu"}
    assert summary["checkpoint"] == "ckpt-a" and summary["bag"] == str(bag)
    assert summary["sync"] == {"images": N_FRAMES, "matched": N_FRAMES, "dropped": 0, "dropped_by_reason": {}}
    assert summary["dt"] == 0.2  # taken from the engine

    with (out / "predictions.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == N_FRAMES
    assert list(table[0])[:3] == ["stamp", "instruction", "pred_dx"]
    for i, row in enumerate(table):
        assert float(row["stamp"]) == pytest.approx(1.0 + 0.2 * i)
        assert [float(row[f"pred_{d}"]) for d in DIMS] == TABLE[i].tolist()
        assert [float(row[f"true_{d}"]) for d in DIMS] == TABLE[i].tolist()
        assert row["tokens"] == f"{31000 + i} 31100" and float(row["latency_ms"]) == pytest.approx(5.0)

    report = (out / "report.md").read_text()
    for png in ("pred_vs_true.png", "error_histograms.png", "latency.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| accuracy (1 - NRMSE) | 1 |" in report
    assert rows[0]["accuracy"] == 1.0 and (out / "comparison.md").exists()


@pytest.mark.parametrize("storage,typestore", [("sqlite3", "humble"), ("mcap", "jazzy")])
def test_known_offset_gives_hand_computed_metrics(tmp_path, storage, typestore):
    frames = read_frames(_write_bag(tmp_path / "bag", storage, typestore), OPTIONS)
    offset = np.array([0.01, -0.02, 0.0, 0.0, 0.0, 0.03, 0.0])
    result = evaluate(TableEngine(offset=offset), frames, progress=False)
    summary = result.summary()
    assert summary["mae"] == pytest.approx(dict(zip(DIMS, np.abs(offset))), abs=1e-15)
    assert summary["rmse"] == pytest.approx(dict(zip(DIMS, np.abs(offset))), abs=1e-15)
    assert summary["l2_mean"] == pytest.approx(math.sqrt(0.01 ** 2 + 0.02 ** 2 + 0.03 ** 2))
    ranges = TABLE.max(axis=0) - TABLE.min(axis=0)
    expected_nrmse = float(np.mean(np.abs(offset) / ranges))
    assert summary["nrmse"] == pytest.approx(expected_nrmse)
    assert summary["accuracy"] == pytest.approx(1 - expected_nrmse)
    assert summary["gripper_accuracy"] == 1.0
    np.testing.assert_allclose(result.predictions, TABLE + offset)


def test_gripper_offset_flips_the_binarised_state_on_closed_frames(tmp_path):
    frames = read_frames(_write_bag(tmp_path / "bag"), OPTIONS)
    result = evaluate(TableEngine(offset=[0, 0, 0, 0, 0, 0, 0.6]), frames, progress=False)
    # truth 0 -> 0.6 reads open (wrong), truth 1 -> 1.6 still open (right): 4 of 12 right
    assert result.summary()["gripper_accuracy"] == pytest.approx(4 / 12)


def test_six_dim_twist_truth_is_compared_on_its_own_dims(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "mcap") as w:
        for i in range(N_FRAMES):
            t = 1.0 + 0.2 * i
            w.write_image("/camera/image_raw", t, _frame_image(i))
            w.write_twist("/expert", t, TABLE[i, :3] / 0.2, TABLE[i, 3:6] / 0.2)
    frames = read_frames(path, BagReadOptions(instruction="go", truth_topic="/expert", dt=0.2, tolerance=0.0))
    result = evaluate(TableEngine(offset=[0, 0, 0, 0, 0, 0, 5.0]), frames, progress=False)
    assert result.compared_dims == DIMS[:6]
    summary = result.summary()
    assert summary["l2_mean"] == pytest.approx(0.0, abs=1e-15) and summary["gripper_accuracy"] is None


def test_repeatability_and_instruction_sensitivity(tmp_path):
    frames = read_frames(_write_bag(tmp_path / "bag"), OPTIONS)
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("# a | b\npick up the screw | pick up the red screw\nopen\tclose it\n")
    pairs = load_instruction_pairs(pairs_file)
    assert pairs == [("pick up the screw", "pick up the red screw"), ("open", "close it")]
    engine = TableEngine(instruction_gain=0.001, jitter=0.01)
    result = evaluate(engine, frames, repeat=3, instruction_pairs=pairs, sensitivity_frames=5, progress=False)
    summary = result.summary()
    rep = summary["repeatability"]
    # runs of a frame add 0, 0.01, 0.02 to dyaw: std 0.01*sqrt(2/3), spread 0.02
    assert rep["std_mean"] == pytest.approx([0, 0, 0, 0, 0, 0.01 * math.sqrt(2 / 3), 0], abs=1e-12)
    assert rep["spread_max"] == pytest.approx([0, 0, 0, 0, 0, 0.02, 0], abs=1e-12)
    assert rep["identical_fraction"] == 0.0 and rep["repeats"] == 3
    # first runs carry no jitter; dx carries 0.001 * len("pick up the screw") = 0.017
    assert summary["mae"]["dx"] == pytest.approx(0.017) and summary["mae"]["dyaw"] == pytest.approx(0.0, abs=1e-15)
    sens = summary["instruction_sensitivity"]
    # dx differs by 0.001 * (length difference); dyaw jitter differs between the two calls too
    first, second = sens["pairs"]
    assert first["frames"] == 5 and second["frames"] == 5
    calls_before = 3 * N_FRAMES
    expected = []
    for pair_index, (a, b) in enumerate(pairs):
        distances = []
        for f in range(5):
            call_a = calls_before + pair_index * 10 + 2 * f
            d_jitter = 0.01 * ((call_a + 1) % 3 - call_a % 3)
            distances.append(math.hypot(0.001 * (len(b) - len(a)), d_jitter))
        expected.append(np.mean(distances))
    assert first["l2_mean"] == pytest.approx(expected[0]) and second["l2_mean"] == pytest.approx(expected[1])
    assert sens["l2_mean"] == pytest.approx(np.mean(expected))


def test_instruction_pairs_json_and_bad_files(tmp_path):
    good = tmp_path / "pairs.json"
    good.write_text(json.dumps([["a b", "c"], [" x ", "y"]]))
    assert load_instruction_pairs(good) == [("a b", "c"), ("x", "y")]
    bad = tmp_path / "bad.txt"
    bad.write_text("only one instruction\n")
    with pytest.raises(ValueError, match="line 1: expected 'a | b'"):
        load_instruction_pairs(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_instruction_pairs(tmp_path / "missing.txt")


def test_non_finite_predictions_are_counted_and_left_out(tmp_path):
    frames = read_frames(_write_bag(tmp_path / "bag"), OPTIONS)
    result = evaluate(TableEngine(nan_frames={2, 5}), frames, progress=False)
    summary = result.summary()
    assert summary["non_finite_predictions"] == 2 and summary["l2_mean"] == 0.0
    assert np.isnan(result.predictions[2]).all()


def test_several_checkpoints_and_bags_give_one_comparison_table(tmp_path):
    bags = [_write_bag(tmp_path / "lab", "sqlite3", "humble"), _write_bag(tmp_path / "kitchen", "mcap", "jazzy")]
    offsets = {"base": np.zeros(7), "tuned": np.array([0.03, 0, 0, 0, 0, 0, 0])}
    engines = []

    def factory(checkpoint):
        engines.append(TableEngine(name=checkpoint, offset=offsets[checkpoint]))
        return engines[-1]

    rows = run_eval(factory, ["base", "tuned"], bags, EvalOptions(bag=OPTIONS, plots=False), tmp_path / "out",
                    progress=False)
    assert [(r["checkpoint"], r["bag"]) for r in rows] == [
        ("base", "lab"), ("base", "kitchen"), ("tuned", "lab"), ("tuned", "kitchen")]
    assert all(e.closed for e in engines)
    for row in rows:
        assert row["l2_mean"] == pytest.approx(0.0 if row["checkpoint"] == "base" else 0.03, abs=1e-15)
        assert (tmp_path / "out" / f"{row['checkpoint']}__{row['bag']}" / "summary.json").exists()
    table = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| bag | checkpoint | frames | L2 mean |")
    body = table[4:]
    assert [line.split(" | ")[:2] for line in body] == [
        ["| kitchen", "base"], ["| kitchen", "tuned"], ["| lab", "base"], ["| lab", "tuned"]]
    assert "| 0.03 |" in body[1]
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())[3]["l2_mean"] == pytest.approx(0.03)


def test_engine_dims_that_cannot_match_the_truth(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path, "sqlite3") as w:
        w.write_image("/camera/image_raw", 1.0, _frame_image(0))
        w.write_float64_array("/cmd", 1.0, [0.0, 0.0, 0.0])
    frames = read_frames(path, BagReadOptions(instruction="go", truth_topic="/cmd", truth_dim_names=["x", "y", "z"]))
    with pytest.raises(ValueError, match=r"cannot compare engine dims .* with truth dims \['x', 'y', 'z'\]"):
        evaluate(TableEngine(), frames, progress=False)
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        evaluate(TableEngine(), frames, repeat=0, progress=False)


def test_streamed_frames_match_frames_in_memory_and_plots_cope_with_constant_errors(tmp_path):
    from openvla_ros.eval.bags import BagFrames
    from openvla_ros.eval.report import write_outputs

    bag = _write_bag(tmp_path / "bag", "mcap", "jazzy")
    offset = [0.01, 0, 0, 0, 0, 0, 0]  # errors equal up to rounding: a histogram of ~zero width
    streamed = evaluate(TableEngine(offset=offset), BagFrames(bag, OPTIONS), progress=False)
    in_memory = evaluate(TableEngine(offset=offset), read_frames(bag, OPTIONS), progress=False)
    np.testing.assert_array_equal(streamed.predictions, in_memory.predictions)
    np.testing.assert_array_equal(streamed.truths, in_memory.truths)
    assert streamed.truth_dim_names == DIMS
    written = write_outputs(streamed, streamed.summary(), tmp_path / "out")
    assert written["plot_errors"].read_bytes()[:4] == b"\x89PNG"
