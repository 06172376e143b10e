"""The OpenVLA training forward: multimodal sequence as the engine builds it, loss on action tokens only.

The model sees `[BOS] + P projected patches + the rest of the ids` (exactly
`TorchEngine.multimodal_embeddings`), so labels get -100 for the P patch positions, inserted after
the first one. Position i's logits predict label i + 1; only positions whose next label is not -100
(the action tokens and EOS) go through the LM head, which keeps the 32k-vocabulary logits small.

With `bin_sigma` > 0 an action token's target is not one-hot but a Gaussian over the neighbouring
action bins (its mass on each bin's interval, sigma in bins): the 256 bins are ordered values, and a
prediction one bin off is nearly right, which plain cross-entropy cannot tell from a wild miss
(histogram loss with Gaussian smoothing, "HL-Gauss", Imani & White 2018; Farebrother et al. 2024).
The two end bins (saturated values) stay one-hot. Only the training target changes: the
checkpoint and its argmax decoding stay OpenVLA's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .collate import IGNORE_INDEX


def multimodal_inputs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor | None = None):
    """(input embeddings, attention mask, labels) of the multimodal sequence [B, 1 + P + T - 1]."""
    # Same construction as TorchEngine.multimodal_embeddings (image right after BOS).
    patches = model.projector(model.vision_backbone(pixel_values))
    text = model.language_model.get_input_embeddings()(input_ids)
    embeds = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
    batch, n_patches = patches.shape[:2]
    ones = torch.ones((batch, n_patches), dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
    if labels is None:
        return embeds, mask, None
    ignore = torch.full((batch, n_patches), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    return embeds, mask, torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)


def gaussian_bin_targets(target_ids: torch.Tensor, first_id: int, n_ids: int, sigma: float) -> torch.Tensor:
    """[N, n_ids] target distributions over the action ids first_id .. first_id + n_ids - 1.

    Each row is a Gaussian of std `sigma` (in bins) centred on its target id, integrated over every
    bin's interval and renormalised over the ids that exist (a target near either end keeps its mass).
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of bins, got {sigma!r}")
    ids = torch.arange(first_id, first_id + n_ids, device=target_ids.device, dtype=torch.float64)
    centre = target_ids.to(torch.float64)[:, None]
    scale = sigma * math.sqrt(2.0)
    mass = 0.5 * (torch.erf((ids + 0.5 - centre) / scale) - torch.erf((ids - 0.5 - centre) / scale))
    return (mass / mass.sum(dim=1, keepdim=True)).float()


def action_token_loss(logits: torch.Tensor, target_ids: torch.Tensor, action_ids: tuple[int, int] | None = None,
                      bin_sigma: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of [N, vocab] logits against N target ids; with `bin_sigma` > 0 the
    targets strictly inside `action_ids` (first id, number of ids) are `gaussian_bin_targets`."""
    if not bin_sigma:
        return F.cross_entropy(logits, target_ids, reduction="sum")
    first, n_ids = action_ids
    log_probs = F.log_softmax(logits, dim=-1)
    per_label = -log_probs.gather(1, target_ids[:, None])[:, 0]
    # The two end ids stay one-hot: a value there is saturated (clipped at q01/q99, a binary gripper, a
    # constant dimension), not an ordered value with neighbours. Smoothing them too let the tiny demo
    # model emit a rotation's end token where the gripper's belongs in 6-19% of its actions, shifting
    # every later dimension by one (none with one-hot targets).
    smoothed = (target_ids > first) & (target_ids < first + n_ids - 1)
    if bool(smoothed.any()):
        soft = gaussian_bin_targets(target_ids[smoothed], first, n_ids, bin_sigma)
        per_label = per_label.clone()
        per_label[smoothed] = -(soft * log_probs[smoothed, first:first + n_ids]).sum(dim=1)
    return per_label.sum()


class ActionObjective(nn.Module):
    """forward(batch tensors) -> (summed cross-entropy, predicted ids, target ids) at the labelled positions.

    `model` is an OpenVLAModel (LoRA layers may be injected into it). Wrapping this module in
    DistributedDataParallel makes the whole training forward go through DDP. `action_ids`
    (first id, number of ids) and `bin_sigma` > 0 turn on Gaussian targets for the action tokens
    (see the module docstring); other labels (EOS) stay one-hot.
    """

    def __init__(self, model, action_ids: tuple[int, int] | None = None, bin_sigma: float = 0.0):
        super().__init__()
        if not (isinstance(bin_sigma, (int, float)) and math.isfinite(bin_sigma) and bin_sigma >= 0):
            raise ValueError(f"bin_sigma must be a number >= 0 (bins), got {bin_sigma!r}")
        if bin_sigma and action_ids is None:
            raise ValueError("bin_sigma > 0 needs action_ids (first action token id, number of action ids)")
        self.model = model
        self.action_ids = None if action_ids is None else (int(action_ids[0]), int(action_ids[1]))
        self.bin_sigma = float(bin_sigma)

    def forward(self, pixel_values, input_ids, attention_mask, labels):
        embeds, mask, mm_labels = multimodal_inputs(self.model, pixel_values, input_ids, attention_mask, labels)
        causal_lm = self.model.language_model
        hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        targets = mm_labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = causal_lm.lm_head(hidden[:, :-1][selected]).float()
        target_ids = targets[selected]
        loss_sum = action_token_loss(logits, target_ids, self.action_ids, self.bin_sigma)
        return loss_sum, logits.argmax(dim=-1), target_ids, selected
