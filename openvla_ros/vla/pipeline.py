"""Everything around the network that every backend shares: image -> pixel values, instruction ->
input ids, tokens -> un-normalised ActionChunk. Backends (torch, onnx, tensorrt) only compute tokens.
"""
from __future__ import annotations

import numpy as np

from ..engines.base import ActionChunk, check_forced_prefix
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

    def stats(self, unnorm_key: str | None):
        """(key, ActionStats) to (un)normalise with: the engine's default key when None."""
        key = self.default_unnorm_key if unnorm_key is None else self.checkpoint.resolve_unnorm_key(unnorm_key)
        stats = self.checkpoint.action_stats(key)
        if stats.dim != self.action_dim:
            raise ValueError(f"statistics {key!r} have {stats.dim} dims, this engine decodes {self.action_dim}")
        return key, stats

    def forced_prefix_tokens(self, forced_prefix, *, unnorm_key: str | None = None) -> np.ndarray:
        """Token ids (P*D,) of P committed actions in dataset units, to force as a chunk's first tokens.

        Validated (0 <= P < K, D dims, finite), normalised with the key's statistics (unmasked dims
        such as the gripper pass through) and binned exactly as training tokenised actions; the
        tokenizer clips to [-1, 1]. An action that was itself decoded maps back to its own token.
        """
        prefix = check_forced_prefix(forced_prefix, self.chunk_len, self.action_dim)
        if prefix.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        _, stats = self.stats(unnorm_key)
        return self.action_tokenizer.encode(stats.normalise(prefix)).reshape(-1)

    def prefix_plan(self, forced_prefix, prefix_soft_bins=None, *, unnorm_key: str | None = None):
        """What a backend decodes for a committed prefix: (forced token ids, token windows).

        Forcing (prefix_soft_bins None): the P*D ids go after the prompt, no windows. Soft
        (prefix_soft_bins = k): nothing forced; the first P*D decoded tokens are restricted to
        +-k bins of the committed ones (`soft_prefix_windows`). No prefix: neither.
        """
        forced = self.forced_prefix_tokens(forced_prefix, unnorm_key=unnorm_key)
        if prefix_soft_bins is None:
            return forced, None
        windows = self.soft_prefix_windows(forced, prefix_soft_bins)
        return np.zeros(0, dtype=np.int64), (windows or None)

    def soft_prefix_windows(self, plan_tokens: np.ndarray, bins) -> list[tuple[int, int]]:
        """For each planned token, the inclusive id range of the action bins within +-`bins` of it:
        decoding restricted to these keeps the new chunk's first steps near the old plan."""
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 0:
            raise ValueError(f"prefix_soft_bins must be an integer >= 0 (bins either side of the plan), got {bins!r}")
        first, last = self.action_tokenizer.first_action_token, self.action_tokenizer.vocab_size - 1
        return [(max(first, int(t) - int(bins)), min(last, int(t) + int(bins))) for t in np.ravel(plan_tokens)]

    def free_tokens(self, forced_tokens: np.ndarray | None = None) -> int:
        """Tokens left to decode after `forced_tokens`: (K - P) x D."""
        return self.n_tokens - (0 if forced_tokens is None else int(np.size(forced_tokens)))

    def to_chunk(self, tokens, *, stamp: float, unnorm_key: str | None, timings_ms: dict,
                 forced_tokens: np.ndarray | None = None) -> ActionChunk:
        """The chunk for decoded `tokens`; after `forced_tokens` (P*D ids) they are the K-P free
        actions, whose timeline starts where the committed ones end (stamp + P*dt)."""
        key, stats = self.stats(unnorm_key)
        forced = np.zeros(0, dtype=np.int64) if forced_tokens is None else np.asarray(forced_tokens, dtype=np.int64).reshape(-1)
        if forced.size % self.action_dim or forced.size >= self.n_tokens:
            raise ValueError(f"{forced.size} forced tokens are not P < {self.chunk_len} whole actions of {self.action_dim} dims")
        forced_steps = forced.size // self.action_dim
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size != self.n_tokens - forced.size:
            raise ValueError(f"expected {self.n_tokens - forced.size} tokens, got {tokens.size}")
        normalised = self.action_tokenizer.decode(tokens).reshape(self.chunk_len - forced_steps, self.action_dim)
        return ActionChunk(actions=stats.unnormalise(normalised), dim_names=self.dim_names, dt=self.dt,
                           stamp=stamp + forced_steps * self.dt, tokens=tokens, normalised=normalised,
                           timings_ms=timings_ms, unnorm_key=key, forced_steps=forced_steps,
                           forced_tokens=forced if forced_steps else None)

    def info(self) -> dict:
        cfg = self.checkpoint.config
        return {"checkpoint": str(self.checkpoint.path), "checkpoint_fingerprint": self.checkpoint.fingerprint(),
                "vision_backbone_id": cfg.vision_backbone_id, "llm_backbone_id": cfg.llm_backbone_id,
                "dims": self.dim_names, "chunk_len": self.chunk_len, "dt": self.dt,
                "unnorm_keys": self.checkpoint.unnorm_keys, "unnorm_key": self.default_unnorm_key,
                "prompt_style": cfg.prompt_style, "center_crop": self.center_crop, "rotate_180": self.rotate_180}
