import numpy as np
import pytest

from openvla_ros.vla.action_tokens import ActionStats, ActionTokenizer, select_unnorm_key


def test_released_model_layout():
    tok = ActionTokenizer(32000)
    assert tok.first_action_token == 31744
    # -1 lands in the first bin (digit 1 -> 31999), +1 in the last (digit 256 -> 31744)
    assert tok.encode(np.array([-1.0, 1.0])).tolist() == [31999, 31744]


def test_round_trip_within_half_bin():
    tok = ActionTokenizer(32000)
    values = np.linspace(-0.999, 0.999, 1001)
    decoded = tok.decode(tok.encode(values))
    width = 2.0 / 255
    assert np.max(np.abs(decoded - values)) <= width + 1e-12
    # bin centres map to themselves exactly
    assert np.allclose(tok.decode(tok.encode(tok.bin_centers)), tok.bin_centers)


def test_edges_and_outside_values():
    tok = ActionTokenizer(32000)
    bins = np.linspace(-1, 1, 256)
    # exactly on an inner edge: digitize puts the edge in the upper bin
    edge = bins[100]
    assert tok.encode(np.array([edge]))[0] == 32000 - 101
    # outside [-1, 1] clips to the ends
    assert tok.encode(np.array([-5.0, 7.0])).tolist() == tok.encode(np.array([-1.0, 1.0])).tolist()
    # token ids beyond the action range decode to the end bins, never out of range
    assert tok.decode(np.array([32000, 31000])).tolist() == [tok.bin_centers[0], tok.bin_centers[-1]]
    with pytest.raises(ValueError, match="non-finite"):
        tok.encode(np.array([np.nan]))


def test_unnormalise_with_mask():
    stats = ActionStats.from_dict({"q01": [-1.0, 0.0, 5.0], "q99": [1.0, 2.0, 9.0], "mask": [True, True, False]})
    out = stats.unnormalise(np.array([0.5, -1.0, 0.25]))
    assert out.tolist() == [0.5, 0.0, 0.25]  # 0.5*(1.5)*2-1, q01, masked dim untouched
    back = stats.normalise(out)
    assert np.allclose(back, [0.5, -1.0, 0.25])
    with pytest.raises(ValueError, match="action has 4 dims, statistics have 3"):
        stats.unnormalise(np.zeros(4))


def test_unnorm_key_errors_list_keys():
    stats = {"bridge_orig": {}, "fractal": {}}
    with pytest.raises(ValueError, match=r"'nope'.*\['bridge_orig', 'fractal'\]"):
        select_unnorm_key(stats, "nope")
    with pytest.raises(ValueError, match="several datasets"):
        select_unnorm_key(stats, None)
    assert select_unnorm_key({"only": {}}, None) == "only"
