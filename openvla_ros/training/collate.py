"""Training samples -> model inputs, token-exact with inference.

`input_ids` = the engine's prompt ids (`PromptTokenizer`: BOS + prompt + the space piece) followed
by the K x D action tokens and EOS; `labels` are -100 everywhere except the action tokens (of valid
chunk steps) and EOS. `pixel_values` come from the engine's own preprocessing; with augmentation
the image first gets the reference's random crop of 90% of the area (square, resized back) and
colour jitter, drawn from a per-sample seed so runs, resumes and DDP ranks see the same pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..vla.action_tokens import ActionStats, ActionTokenizer
from ..vla.backbones import backbone_specs
from ..vla.checkpoint import Checkpoint
from ..vla.constants import CENTER_CROP_AREA, IMAGE_SIZE
from ..vla.preprocess import prepare_image, to_pixel_values
from ..vla.tokenizer import PromptTokenizer

IGNORE_INDEX = -100

# Colour jitter of the reference's fine-tuning augmentation (brightness delta, contrast/saturation
# factor ranges, hue shift).
JITTER_BRIGHTNESS = 0.2
JITTER_CONTRAST = (0.8, 1.2)
JITTER_SATURATION = (0.8, 1.2)
JITTER_HUE = 0.05


@dataclass
class TrainSample:
    """One training example: the image at step t and the K actions from t on (dataset units)."""

    image: np.ndarray  # HxWx3 uint8 RGB
    instruction: str
    actions: np.ndarray  # (K, D)
    action_mask: np.ndarray  # (K,) bool: False = padding past the episode's end
    dataset: str  # statistics key
    aug_seed: int | None = None  # None: no augmentation


def augment_image(image: np.ndarray, seed: int, crop_area: float = CENTER_CROP_AREA):
    """Random square crop of `crop_area` of the area, resized back, then colour jitter (PIL image)."""
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(seed)
    pil = prepare_image(image)
    width, height = pil.size
    side_w, side_h = round(width * math.sqrt(crop_area)), round(height * math.sqrt(crop_area))
    left = int(rng.integers(0, width - side_w + 1))
    top = int(rng.integers(0, height - side_h + 1))
    pil = pil.crop((left, top, left + side_w, top + side_h)).resize((width, height), Image.Resampling.BICUBIC)
    # Jitter in a random order, as torchvision's ColorJitter does.
    ops = [
        lambda im: TF.adjust_brightness(im, float(rng.uniform(1 - JITTER_BRIGHTNESS, 1 + JITTER_BRIGHTNESS))),
        lambda im: TF.adjust_contrast(im, float(rng.uniform(*JITTER_CONTRAST))),
        lambda im: TF.adjust_saturation(im, float(rng.uniform(*JITTER_SATURATION))),
        lambda im: TF.adjust_hue(im, float(rng.uniform(-JITTER_HUE, JITTER_HUE))),
    ]
    for i in rng.permutation(len(ops)):
        pil = ops[i](pil)
    return pil


def shift_image(image: np.ndarray, seed: int, max_shift_px: int) -> np.ndarray:
    """The image translated by a random whole number of pixels in [-max_shift_px, max_shift_px] per axis.

    The border is extended by repeating the edge pixels (as the random-shift augmentation of
    image-based control learning does). A translation keeps where things are relative to each
    other (the hand and the target), which is what a reaching action depends on, while the crop of
    the reference augmentation also changes the scale.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be HxWxC, got shape {image.shape}")
    if not isinstance(max_shift_px, (int, np.integer)) or not 0 <= max_shift_px < min(image.shape[:2]):
        raise ValueError(f"max_shift_px must be an integer in [0, {min(image.shape[:2]) - 1}], got {max_shift_px!r}")
    if max_shift_px == 0:
        return image
    rng = np.random.default_rng([int(seed), 7])
    dy, dx = (int(v) for v in rng.integers(-max_shift_px, max_shift_px + 1, size=2))
    s = int(max_shift_px)
    padded = np.pad(image, ((s, s), (s, s), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return np.ascontiguousarray(padded[s - dy:s - dy + h, s - dx:s - dx + w])


class ActionCollator:
    """Encodes TrainSamples for one checkpoint (tokenizer, prompt style, vocabulary, backbones)."""

    def __init__(self, checkpoint: Checkpoint, stats: Mapping[str, ActionStats], chunk_len: int = 1, *,
                 crop_jitter: bool = True, shift_px: int = 0):
        """`crop_jitter` and `shift_px`: the augmentations of samples with an `aug_seed`."""
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        if not isinstance(shift_px, (int, np.integer)) or shift_px < 0:
            raise ValueError(f"shift_px must be an integer >= 0, got {shift_px!r}")
        self.crop_jitter, self.shift_px = bool(crop_jitter), int(shift_px)
        cfg = checkpoint.config
        self.checkpoint = checkpoint
        self.prompt_style = cfg.prompt_style
        self.tokenizer = PromptTokenizer(checkpoint.path)
        self.action_tokenizer = ActionTokenizer(cfg.action_vocab_size, cfg.n_action_bins)
        self.normalisations = [s.normalisation for s in backbone_specs(cfg.vision_backbone_id, cfg.use_fused_vision_backbone)]
        self.stats = dict(stats)
        self.chunk_len = int(chunk_len)
        self.pad_token_id = cfg.pad_token_id
        self.eos_token_id = int(cfg.text_config.get("eos_token_id", 2))
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, instruction: str) -> list[int]:
        """Exactly what the engine feeds for this instruction."""
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            ids = self._prompt_cache[instruction] = self.tokenizer.input_ids(instruction, self.prompt_style)
        return list(ids)

    def action_token_ids(self, sample: TrainSample) -> np.ndarray:
        """(K, D) token ids of the sample's normalised actions."""
        if sample.dataset not in self.stats:
            raise ValueError(f"sample of dataset {sample.dataset!r} has no statistics; known: {sorted(self.stats)}")
        actions = np.asarray(sample.actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] != self.chunk_len:
            raise ValueError(f"sample has actions of shape {actions.shape}, expected ({self.chunk_len}, D)")
        return self.action_tokenizer.encode(self.stats[sample.dataset].normalise(actions))

    def pixel_values(self, sample: TrainSample) -> torch.Tensor:
        image = sample.image
        if sample.aug_seed is not None and self.shift_px:
            image = shift_image(image, sample.aug_seed, self.shift_px)
        if sample.aug_seed is None or not self.crop_jitter:
            pil = prepare_image(image)
        else:
            pil = augment_image(image, sample.aug_seed)
        return to_pixel_values(pil, self.normalisations)[0]

    def encode(self, sample: TrainSample) -> dict:
        prompt = self.prompt_ids(sample.instruction)
        tokens = self.action_token_ids(sample)  # (K, D)
        mask = np.asarray(sample.action_mask, dtype=bool).reshape(-1)
        if mask.shape[0] != self.chunk_len:
            raise ValueError(f"action_mask has {mask.shape[0]} entries for a chunk of {self.chunk_len}")
        action_labels = np.where(mask[:, None], tokens, IGNORE_INDEX).reshape(-1)
        input_ids = prompt + tokens.reshape(-1).tolist() + [self.eos_token_id]
        labels = [IGNORE_INDEX] * len(prompt) + action_labels.tolist() + [self.eos_token_id]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": self.pixel_values(sample),
                "prompt_len": len(prompt)}

    def __call__(self, samples: Sequence[TrainSample]) -> dict:
        """Batch: right-padded input_ids/labels/attention_mask, pixel_values, and the raw actions."""
        encoded = [self.encode(s) for s in samples]
        length = max(len(e["input_ids"]) for e in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention[i, :n] = 1
        return {
            "input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "pixel_values": torch.stack([e["pixel_values"] for e in encoded]),
            "prompt_len": torch.tensor([e["prompt_len"] for e in encoded]),
            "actions": torch.tensor(np.stack([np.asarray(s.actions, dtype=np.float64) for s in samples])),
            "action_mask": torch.tensor(np.stack([np.asarray(s.action_mask, dtype=bool) for s in samples])),
            "datasets": [s.dataset for s in samples],
        }
