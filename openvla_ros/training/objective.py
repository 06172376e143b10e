"""The OpenVLA training forward: multimodal sequence as the engine builds it, loss on action tokens only.

The model sees `[BOS] + P projected patches + the rest of the ids` (exactly
`TorchEngine.multimodal_embeddings`), so labels get -100 for the P patch positions, inserted after
the first one. Position i's logits predict label i + 1; only positions whose next label is not -100
(the action tokens and EOS) go through the LM head, which keeps the 32k-vocabulary logits small.
"""
from __future__ import annotations

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


class ActionObjective(nn.Module):
    """forward(batch tensors) -> (summed cross-entropy, predicted ids, target ids) at the labelled positions.

    `model` is an OpenVLAModel (LoRA layers may be injected into it). Wrapping this module in
    DistributedDataParallel makes the whole training forward go through DDP.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask, labels):
        embeds, mask, mm_labels = multimodal_inputs(self.model, pixel_values, input_ids, attention_mask, labels)
        causal_lm = self.model.language_model
        hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        targets = mm_labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = causal_lm.lm_head(hidden[:, :-1][selected]).float()
        target_ids = targets[selected]
        loss_sum = F.cross_entropy(logits, target_ids, reduction="sum")
        return loss_sum, logits.argmax(dim=-1), target_ids, selected
