"""Open-loop metrics (openvla_ros.eval.metrics) against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.eval import metrics

PRED = [[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]]
TRUE = [[1.0, 0.0], [2.0, 5.0], [2.0, 4.0]]
# errors [[0, 2], [1, 0], [-2, -4]]; truth ranges: dim0 2-1 = 1, dim1 5-0 = 5


def test_mae_rmse_l2():
    np.testing.assert_allclose(metrics.mae(PRED, TRUE), [1.0, 2.0])
    np.testing.assert_allclose(metrics.rmse(PRED, TRUE), [math.sqrt(5 / 3), math.sqrt(20 / 3)])
    assert metrics.l2_mean(PRED, TRUE) == pytest.approx((2 + 1 + math.sqrt(20)) / 3)


def test_nrmse_and_accuracy():
    per_dim = [math.sqrt(5 / 3) / 1, math.sqrt(20 / 3) / 5]
    assert metrics.nrmse_per_dim(PRED, TRUE) == pytest.approx(per_dim)
    assert metrics.nrmse(PRED, TRUE) == pytest.approx(sum(per_dim) / 2)
    # caller-given ranges (e.g. q99 - q01 of the checkpoint statistics) replace the truth's
    assert metrics.nrmse_per_dim(PRED, TRUE, ranges=[2.0, 10.0]) == pytest.approx([p / 2 for p in per_dim])
    summary = metrics.action_metrics(PRED, TRUE, ["dx", "dy"])
    assert summary["accuracy"] == pytest.approx(1 - sum(per_dim) / 2)
    assert summary["mae"] == pytest.approx({"dx": 1.0, "dy": 2.0})
    assert summary["gripper_accuracy"] is None and summary["frames"] == 3


def test_constant_truth_dim_has_no_nrmse_and_is_left_out_of_the_mean():
    pred = [[0.0, 1.0], [1.0, 1.0]]
    true = [[0.0, 1.0], [2.0, 1.0]]  # dim1 constant
    assert metrics.nrmse_per_dim(pred, true) == [pytest.approx(math.sqrt(0.5) / 2), None]
    assert metrics.nrmse(pred, true) == pytest.approx(math.sqrt(0.5) / 2)
    assert metrics.nrmse([[1.0]], [[1.0]]) is None


def test_perfect_predictions():
    summary = metrics.action_metrics(TRUE, TRUE, ["dx", "gripper"])
    assert summary["l2_mean"] == 0.0 and summary["nrmse"] == 0.0 and summary["accuracy"] == 1.0
    assert summary["gripper_accuracy"] == 1.0


def test_gripper_accuracy_binarises_at_one_half():
    assert metrics.gripper_accuracy([0.2, 0.7, 0.5], [0.0, 1.0, 0.0]) == pytest.approx(2 / 3)
    summary = metrics.action_metrics([[0.0, 0.2], [0.0, 0.7], [1.0, 0.5]], [[0.0, 0.0], [1.0, 1.0], [0.5, 0.0]],
                                     ["dx", "gripper"])
    assert summary["gripper_accuracy"] == pytest.approx(2 / 3)


def test_latency_percentiles():
    stats = metrics.latency_stats([40.0, 10.0, 30.0, 20.0])
    assert stats == {"p50": 25.0, "p95": pytest.approx(38.5), "mean": 25.0, "max": 40.0, "count": 4}
    assert metrics.latency_stats([])["p50"] is None


def test_repeatability_spread():
    runs = np.array([[[1.0], [1.0], [1.0]], [[0.0], [1.0], [2.0]]])
    rep = metrics.repeatability(runs)
    assert rep["std_mean"] == pytest.approx([math.sqrt(2 / 3) / 2])
    assert rep["spread_max"] == [2.0]
    assert rep["identical_fraction"] == 0.5 and rep["repeats"] == 3 and rep["frames"] == 2
    with pytest.raises(ValueError, match="repeats >= 2"):
        metrics.repeatability(np.zeros((2, 1, 3)))


def test_instruction_sensitivity_per_pair_and_overall():
    result = metrics.instruction_sensitivity({
        ("pick up the screw", "pick up the red screw"): ([[0, 0], [1, 1]], [[3, 4], [1, 1]]),
        ("open", "close"): ([[0, 0]], [[0, 1]]),
    })
    first, second = result["pairs"]
    assert (first["a"], first["l2_mean"], first["l2_max"], first["frames"]) == ("pick up the screw", 2.5, 5.0, 2)
    assert second["l2_mean"] == 1.0
    assert result["l2_mean"] == pytest.approx(1.75)
    assert result["l2_mean_all_frames"] == pytest.approx(2.0)


def test_bad_inputs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match=r"\(2, 2\) and truth \(3, 2\)"):
        metrics.mae([[0, 0], [1, 1]], TRUE)
    with pytest.raises(ValueError, match="predictions contain NaN or inf at rows \\[1\\]"):
        metrics.rmse([[0, 0], [np.nan, 0], [0, 0]], TRUE)
    with pytest.raises(ValueError, match="no frames"):
        metrics.l2_mean(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="3 dim names"):
        metrics.action_metrics(PRED, TRUE, ["a", "b", "c"])


def test_period_errors_are_absolute_deviations_from_the_period_in_ms():
    from openvla_ros.eval.metrics import period_errors_ms

    errors = period_errors_ms([0.0, 0.010, 0.0215, 0.030], 0.010)
    np.testing.assert_allclose(errors, [0.0, 1.5, 1.5], atol=1e-9)
