"""Action statistics (openvla_ros.training.stats) against values computed by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from openvla_ros.training import stats as S
from openvla_ros.vla.checkpoint import Checkpoint
from openvla_ros.vla.tiny import write_tiny_checkpoint

# Two dims and a gripper, four transitions.
ACTIONS = np.array([[0.0, 10.0, 0.0], [1.0, 20.0, 1.0], [2.0, 30.0, 0.0], [3.0, 40.0, 1.0]])
NAMES = ["dx", "dy", "gripper"]


def test_statistics_match_hand_computed_values():
    entry = S.action_statistics(ACTIONS, dim_names=NAMES)
    assert entry["mean"] == [1.5, 25.0, 0.5]
    # Population std: sqrt(mean of squared deviations) = sqrt((2.25+0.25+0.25+2.25)/4).
    np.testing.assert_allclose(entry["std"], [math.sqrt(1.25), 10 * math.sqrt(1.25), 0.5])
    assert entry["min"] == [0.0, 10.0, 0.0] and entry["max"] == [3.0, 40.0, 1.0]
    # Linear interpolation between order statistics: rank 0.01 * 3 = 0.03 and 0.99 * 3 = 2.97.
    np.testing.assert_allclose(entry["q01"], [0.03, 10.3, 0.0])
    np.testing.assert_allclose(entry["q99"], [2.97, 39.7, 1.0])
    assert entry["mask"] == [True, True, False]
    assert "normalization" not in entry


@pytest.mark.parametrize("kind, lo, hi", [
    ("min_max", [0.0, 10.0, 0.0], [3.0, 40.0, 1.0]),
    ("mean_std", [1.5 - math.sqrt(1.25), 25 - 10 * math.sqrt(1.25), 0.0], [1.5 + math.sqrt(1.25), 25 + 10 * math.sqrt(1.25), 1.0]),
])
def test_other_normalisations_store_their_bounds_where_unnormalisation_reads_them(kind, lo, hi):
    entry = S.action_statistics(ACTIONS, dim_names=NAMES, normalization=kind)
    np.testing.assert_allclose(entry["q01"], lo)
    np.testing.assert_allclose(entry["q99"], hi)
    np.testing.assert_allclose(entry["data_q01"], [0.03, 10.3, 0.0])
    assert entry["normalization"] == kind
    stats = S.stats_for({"d": {"action": entry}})["d"]
    # The bounds map to -1 and +1 (normalised dims); the gripper passes through.
    np.testing.assert_allclose(stats.normalise(np.array([lo[0], hi[1], 1.0])), [-1.0, 1.0, 1.0])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="normalization"):
        S.action_statistics(ACTIONS, normalization="zscore")
    with pytest.raises(ValueError, match="NaN"):
        S.action_statistics(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="non-empty"):
        S.action_statistics(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="mask has 2 entries"):
        S.action_statistics(ACTIONS, mask=[True, False])


def test_several_datasets_each_get_their_own_key_and_the_engine_reads_them(tmp_path):
    stats = {
        "red": S.dataset_entry(ACTIONS, num_trajectories=2, dim_names=NAMES),
        "blue": S.dataset_entry(ACTIONS * [2, 1, 1], num_trajectories=1, dim_names=NAMES),
    }
    ckpt_dir = write_tiny_checkpoint(tmp_path / "ck", seed=0)
    S.write_statistics(ckpt_dir / "dataset_statistics.json", stats)
    raw = json.loads((ckpt_dir / "dataset_statistics.json").read_text())
    assert raw["red"]["num_transitions"] == 4 and raw["red"]["num_trajectories"] == 2
    assert set(raw["red"]["proprio"]) == {"mean", "std", "max", "min", "q01", "q99"}
    ckpt = Checkpoint.open(ckpt_dir)
    assert ckpt.unnorm_keys == ["blue", "red"]
    np.testing.assert_allclose(ckpt.action_stats("blue").q99, [5.94, 39.7, 1.0])
    np.testing.assert_array_equal(ckpt.action_stats("red").mask, [True, True, False])
