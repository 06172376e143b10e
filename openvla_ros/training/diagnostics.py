"""Did the model learn? Held-out error against baselines that ignore the inputs.

On held-out samples, actions are decoded greedily (as the engine decodes: argmax over the whole
vocabulary, one token at a time, from the prompt alone, no teacher forcing; with the centre crop
when training cropped at random, as the exported checkpoint is meant to be run) and compared with the
recorded ones in normalised units (each dimension's q01..q99 mapped to -1..1, as the action bins
are), so every dimension weighs the same whatever its physical scale. Four figures:

- ``model``: the trained model's error;
- ``mean_predictor``: the error of always answering the training actions' mean (per dataset);
- ``shuffled_images``: the model's error when each sample gets another sample's image;
- ``swapped_instructions``: the same with another sample's instruction (None with one instruction).

A model no better than the mean predictor has learned nothing a constant would not give; one whose
error does not grow with shuffled images ignores the image. Both are warned about.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..vla.preprocess import prepare_image, to_pixel_values
from .collate import ActionCollator, TrainSample
from .objective import multimodal_inputs

log = logging.getLogger(__name__)

# "Clearly" better or worse: a model must beat the mean predictor by this factor, and shuffled
# images must raise its error by this factor, or the check warns.
BETTER_THAN_MEAN_RATIO = 0.9
IMAGE_SENSITIVITY_RATIO = 1.1


@dataclass
class LearningCheck:
    samples: int
    model: float
    mean_predictor: float
    shuffled_images: float
    swapped_instructions: float | None
    warnings: list[str]

    def as_dict(self) -> dict:
        return {"samples": self.samples, "model_error": self.model, "mean_predictor_error": self.mean_predictor,
                "shuffled_image_error": self.shuffled_images, "swapped_instruction_error": self.swapped_instructions,
                "units": "mean absolute error of normalised actions (q01..q99 -> -1..1)", "warnings": list(self.warnings)}

    def metrics(self) -> dict:
        """Flat figures for the training log and summary."""
        out = {"heldout_error": self.model, "mean_predictor_error": self.mean_predictor,
               "shuffled_image_error": self.shuffled_images}
        if self.swapped_instructions is not None:
            out["swapped_instruction_error"] = self.swapped_instructions
        return out


def _derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation that moves every index (n >= 2)."""
    order = np.random.default_rng(seed).permutation(n)
    shifted = np.roll(order, 1)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = shifted
    return perm


@torch.no_grad()
def greedy_action_tokens(model, collator: ActionCollator, samples: Sequence[TrainSample], *, batch_size: int = 8,
                         device: str = "cpu", autocast: bool = False, center_crop: bool = False) -> np.ndarray:
    """(N, K*D) token ids decoded greedily from each sample's image and prompt (`center_crop`: the
    crop an engine applies to a model trained with random crops)."""
    n_tokens = collator.chunk_len * np.asarray(samples[0].actions).shape[1]
    causal_lm = model.language_model
    embed = causal_lm.get_input_embeddings()
    out = np.zeros((len(samples), n_tokens), dtype=np.int64)
    # Samples of equal prompt length share a batch: no padding, so the last position is the prompt's end.
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(len(collator.prompt_ids(s.instruction)), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            part = indices[start:start + batch_size]
            ids = torch.tensor([collator.prompt_ids(samples[i].instruction) for i in part], device=device)
            pixels = torch.stack([to_pixel_values(prepare_image(samples[i].image, center_crop=center_crop),
                                                  collator.normalisations)[0] for i in part]).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                embeds, mask, _ = multimodal_inputs(model, pixels, ids, torch.ones_like(ids))
                for t in range(n_tokens):
                    hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
                    token = causal_lm.lm_head(hidden[:, -1]).float().argmax(dim=-1)
                    out[part, t] = token.cpu().numpy()
                    embeds = torch.cat([embeds, embed(token)[:, None].to(embeds.dtype)], dim=1)
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def _errors(tokens: np.ndarray, collator: ActionCollator, samples: Sequence[TrainSample]) -> float:
    """Mean absolute error of decoded tokens against the samples' actions, normalised units, valid steps only."""
    total, count = 0.0, 0
    for row, s in zip(tokens, samples):
        truth = np.asarray(s.actions, dtype=np.float64)
        mask = np.asarray(s.action_mask, dtype=bool)
        predicted = collator.action_tokenizer.decode(row.reshape(truth.shape))
        target = np.clip(collator.stats[s.dataset].normalise(truth), -1.0, 1.0)
        total += float(np.abs(predicted - target)[mask].sum())
        count += int(mask.sum()) * truth.shape[1]
    return total / max(count, 1)


def learning_check(model, collator: ActionCollator, samples: Sequence[TrainSample],
                   train_mean: Mapping[str, np.ndarray], *, batch_size: int = 8, device: str = "cpu",
                   autocast: bool = False, seed: int = 0) -> LearningCheck | None:
    """The four figures of the module docstring on `samples` (None with fewer than 2 samples).

    `train_mean` holds each dataset's mean training action in normalised units (D,).
    """
    if len(samples) < 2:
        return None
    was_training = model.training
    model.eval()
    try:
        decode = lambda items: greedy_action_tokens(model, collator, items, batch_size=batch_size, device=device,
                                                    autocast=autocast, center_crop=collator.crop_jitter)
        model_err = _errors(decode(samples), collator, samples)
        perm = _derangement(len(samples), seed)
        shuffled = [TrainSample(**{**s.__dict__, "image": samples[int(j)].image}) for s, j in zip(samples, perm)]
        shuffled_err = _errors(decode(shuffled), collator, samples)
        swapped_err = None
        if len({s.instruction for s in samples}) > 1:
            swapped = [TrainSample(**{**s.__dict__, "instruction": samples[int(j)].instruction}) for s, j in zip(samples, perm)]
            swapped_err = _errors(decode(swapped), collator, samples)
    finally:
        if was_training:
            model.train()
    total, count = 0.0, 0
    for s in samples:
        truth = np.asarray(s.actions, dtype=np.float64)
        mask = np.asarray(s.action_mask, dtype=bool)
        target = np.clip(collator.stats[s.dataset].normalise(truth), -1.0, 1.0)
        total += float(np.abs(target - train_mean[s.dataset][None, :])[mask].sum())
        count += int(mask.sum()) * truth.shape[1]
    mean_err = total / max(count, 1)
    warnings = []
    if not model_err < BETTER_THAN_MEAN_RATIO * mean_err:
        warnings.append(f"the model is no better than predicting the mean action on held-out data "
                        f"(error {model_err:.4f} vs {mean_err:.4f}): it has not learned the task")
    if not shuffled_err > IMAGE_SENSITIVITY_RATIO * model_err:
        warnings.append(f"the model ignores the image: with images shuffled between held-out samples its error is "
                        f"{shuffled_err:.4f} vs {model_err:.4f}")
    return LearningCheck(samples=len(samples), model=model_err, mean_predictor=mean_err, shuffled_images=shuffled_err,
                         swapped_instructions=swapped_err, warnings=warnings)


def normalised_mean(actions: np.ndarray, stats) -> np.ndarray:
    """Mean of (N, D) actions in normalised units (the constant predictor's answer)."""
    return np.clip(stats.normalise(np.asarray(actions, dtype=np.float64)), -1.0, 1.0).mean(axis=0)
