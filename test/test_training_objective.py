"""Gaussian action-bin targets (training/objective.py): the loss knows that neighbouring bins are close."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openvla_ros.training.objective import action_token_loss, gaussian_bin_targets

FIRST, N_IDS, VOCAB = 256, 256, 512  # the tiny tokenizer's layout: the last 256 ids are the bins


def test_gaussian_targets_are_distributions_peaked_on_the_target_and_kept_whole_at_the_ends():
    targets = gaussian_bin_targets(torch.tensor([FIRST + 100, FIRST, FIRST + N_IDS - 1]), FIRST, N_IDS, 2.0)
    assert targets.shape == (3, N_IDS)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(3))
    assert targets.argmax(dim=1).tolist() == [100, 0, N_IDS - 1]
    # Symmetric around the target, and about the normal density's shape (sigma 2: the next bin ~0.88x).
    row = targets[0]
    torch.testing.assert_close(row[95:100].flip(0), row[101:106])
    assert 0.85 < float(row[101] / row[100]) < 0.9
    assert float(row[100 + 10]) < 1e-5
    # At an end the mass that would fall outside the ids is renormalised onto those that exist.
    assert float(targets[1, 0]) > float(row[100])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            gaussian_bin_targets(torch.tensor([FIRST]), FIRST, N_IDS, bad)


def _peaked_logits(ids, n_rows):
    logits = torch.zeros(n_rows, VOCAB)
    logits[torch.arange(n_rows), torch.as_tensor(ids)] = 8.0
    return logits


def test_near_miss_costs_less_than_a_far_miss_only_with_gaussian_targets():
    target = torch.tensor([FIRST + 128])
    near, far = _peaked_logits([FIRST + 129], 1), _peaked_logits([FIRST + 200], 1)
    one_hot = [float(action_token_loss(x, target)) for x in (near, far)]
    assert one_hot[0] == pytest.approx(one_hot[1])  # plain cross-entropy: a miss is a miss
    smoothed = [float(action_token_loss(x, target, (FIRST, N_IDS), 3.0)) for x in (near, far)]
    assert smoothed[0] < smoothed[1] - 1.0


def test_saturated_end_ids_stay_one_hot():
    """The first and last action ids (clipped values, binary gripper, constant dimensions) are not smoothed."""
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    ends = torch.tensor([FIRST, FIRST + N_IDS - 1, FIRST + 1])
    smoothed = action_token_loss(logits, ends, (FIRST, N_IDS), 3.0)
    log_probs = F.log_softmax(logits, dim=-1)
    inner = gaussian_bin_targets(ends[2:], FIRST, N_IDS, 3.0)
    expected = -log_probs[0, FIRST] - log_probs[1, FIRST + N_IDS - 1] - (inner * log_probs[2:, FIRST:]).sum()
    torch.testing.assert_close(smoothed, expected)


def test_sigma_zero_is_plain_cross_entropy_and_non_action_labels_stay_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    eos = 2
    ids = torch.tensor([FIRST + 10, FIRST + 250, eos, FIRST + 3, eos])  # none at an end id
    torch.testing.assert_close(action_token_loss(logits, ids), F.cross_entropy(logits, ids, reduction="sum"))
    smoothed = action_token_loss(logits, ids, (FIRST, N_IDS), 2.0)
    log_probs = F.log_softmax(logits, dim=-1)
    soft = gaussian_bin_targets(ids[[0, 1, 3]], FIRST, N_IDS, 2.0)
    expected = -(soft * log_probs[[0, 1, 3], FIRST:]).sum() - log_probs[[2, 4], eos].sum()
    torch.testing.assert_close(smoothed, expected)
    # Gradients reach the logits of the neighbouring bins, not only the target's.
    logits.requires_grad_(True)
    action_token_loss(logits[:1], ids[:1], (FIRST, N_IDS), 2.0).backward()
    assert float(logits.grad[0, FIRST + 11]) < 0 and float(logits.grad[0, FIRST + 9]) < 0
