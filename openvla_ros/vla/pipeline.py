"""Everything around the network that every backend shares: image -> pixel values, instruction ->
input ids, tokens -> un-normalised ActionChunk. Backends (torch, onnx, tensorrt) only compute tokens.
"""
from __future__ import annotations

import numpy as np

from ..engines.base import ActionChunk
from .action_tokens import ActionTokenizer
from .backbones import backbone_specs
from .checkpoint import Checkpoint
from .preprocess import prepare_image, to_pixel_values
from .tokenizer import PromptTokenizer


class OpenVLAPipeline:
    """Pre- and post-processing for one checkpoint, exactly as the reference does them."""

    def __init__(self, checkpoint: Checkpoint, *, unnorm_key: str | None = None,
                 center_crop: bool = False, rotate_180: bool = False):
        self.checkpoint = checkpoint
        cfg = checkpoint.config
        self.normalisations = [s.normalisation for s in backbone_specs(cfg.vision_backbone_id, cfg.use_fused_vision_backbone)]
        self.tokenizer = PromptTokenizer(checkpoint.path)
        self.action_tokenizer = ActionTokenizer(cfg.action_vocab_size, cfg.n_action_bins)
        self.default_unnorm_key = checkpoint.resolve_unnorm_key(unnorm_key)
        self.action_dim = checkpoint.action_stats(self.default_unnorm_key).dim
        self.dim_names = checkpoint.dim_names(self.action_dim)
        self.chunk_len = cfg.chunk_len
        self.dt = cfg.control_period_s
        self.center_crop = center_crop
        self.rotate_180 = rotate_180

    @property
    def n_tokens(self) -> int:
        """Tokens decoded per call: K actions x D dims."""
        return self.chunk_len * self.action_dim

    def pixel_values(self, image: np.ndarray):
        pil = prepare_image(image, center_crop=self.center_crop, rotate_180=self.rotate_180)
        return to_pixel_values(pil, self.normalisations)

    def input_ids(self, instruction: str) -> list[int]:
        return self.tokenizer.input_ids(instruction, self.checkpoint.config.prompt_style)

    def to_chunk(self, tokens, *, stamp: float, unnorm_key: str | None, timings_ms: dict) -> ActionChunk:
        key = self.default_unnorm_key if unnorm_key is None else self.checkpoint.resolve_unnorm_key(unnorm_key)
        stats = self.checkpoint.action_stats(key)
        if stats.dim != self.action_dim:
            raise ValueError(f"statistics {key!r} have {stats.dim} dims, this engine decodes {self.action_dim}")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} tokens, got {tokens.size}")
        normalised = self.action_tokenizer.decode(tokens).reshape(self.chunk_len, self.action_dim)
        return ActionChunk(actions=stats.unnormalise(normalised), dim_names=self.dim_names, dt=self.dt,
                           stamp=stamp, tokens=tokens, normalised=normalised, timings_ms=timings_ms,
                           unnorm_key=key)

    def info(self) -> dict:
        cfg = self.checkpoint.config
        return {"checkpoint": str(self.checkpoint.path), "checkpoint_fingerprint": self.checkpoint.fingerprint(),
                "vision_backbone_id": cfg.vision_backbone_id, "llm_backbone_id": cfg.llm_backbone_id,
                "dims": self.dim_names, "chunk_len": self.chunk_len, "dt": self.dt,
                "unnorm_keys": self.checkpoint.unnorm_keys, "unnorm_key": self.default_unnorm_key,
                "prompt_style": cfg.prompt_style, "center_crop": self.center_crop, "rotate_180": self.rotate_180}
