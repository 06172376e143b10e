"""Action <-> token mapping and (un)normalisation, as the released OpenVLA defines them.

Actions are normalised to [-1, 1] with the dataset's q01/q99, discretised into 256 uniform bins and
mapped onto the last 256 ids of the text vocabulary (`vocab_size - digit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .constants import N_ACTION_BINS


class ActionTokenizer:
    """Maps normalised actions in [-1, 1] to token ids and back.

    `vocab_size` is the text vocabulary the bins count down from: for a checkpoint it is
    `text_config.vocab_size - pad_to_multiple_of` (32000 for Llama 2).
    """

    def __init__(self, vocab_size: int, n_bins: int = N_ACTION_BINS):
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        if vocab_size <= n_bins:
            raise ValueError(f"vocab_size {vocab_size} must exceed n_bins {n_bins}")
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.bins = np.linspace(-1.0, 1.0, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def first_action_token(self) -> int:
        """Smallest id an action can be encoded to."""
        return self.vocab_size - self.n_bins

    def encode(self, normalised: np.ndarray) -> np.ndarray:
        """Token ids for normalised actions (values outside [-1, 1] are clipped first)."""
        values = np.asarray(normalised, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"cannot tokenise non-finite actions: {values}")
        digits = np.digitize(np.clip(values, -1.0, 1.0), self.bins)  # in [1, n_bins]
        return (self.vocab_size - digits).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Normalised actions (bin centres) for token ids; ids outside the action range clip to the ends."""
        ids = np.asarray(token_ids, dtype=np.int64)
        index = np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[index]


@dataclass(frozen=True)
class ActionStats:
    """Per-dimension statistics of one dataset key (`norm_stats[key]["action"]`)."""

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_dict(cls, stats: Mapping, where: str = "action statistics") -> "ActionStats":
        for field in ("q01", "q99"):
            if field not in stats:
                raise ValueError(f"{where} lacks {field!r} (has {sorted(stats)})")
        q01 = np.asarray(stats["q01"], dtype=np.float64)
        q99 = np.asarray(stats["q99"], dtype=np.float64)
        mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        if not (q01.shape == q99.shape == mask.shape) or q01.ndim != 1 or q01.size == 0:
            raise ValueError(
                f"{where}: q01 {q01.shape}, q99 {q99.shape} and mask {mask.shape} must be equal non-empty 1-D shapes"
            )
        for name, values in (("q01", q01), ("q99", q99)):
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{where}: {name} must be finite, got {values.tolist()}")
        inverted = np.flatnonzero(q01 > q99)
        if inverted.size:
            i = int(inverted[0])
            raise ValueError(f"{where}: q01 must not exceed q99, but dim {i} has q01 {q01[i]:.6g} > q99 {q99[i]:.6g}")
        return cls(q01=q01, q99=q99, mask=mask)

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    def unnormalise(self, normalised: np.ndarray) -> np.ndarray:
        """Map [-1, 1] values back to dataset units where the mask is true (last axis = dims)."""
        n = np.asarray(normalised, dtype=np.float64)
        if n.shape[-1] != self.dim:
            raise ValueError(f"action has {n.shape[-1]} dims, statistics have {self.dim}")
        scaled = 0.5 * (n + 1.0) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, scaled, n)

    def normalise(self, actions: np.ndarray) -> np.ndarray:
        """Inverse of `unnormalise` (clipped to [-1, 1]) where the mask is true; used for training."""
        a = np.asarray(actions, dtype=np.float64)
        if a.shape[-1] != self.dim:
            raise ValueError(f"action has {a.shape[-1]} dims, statistics have {self.dim}")
        span = np.where(self.q99 - self.q01 == 0, 1.0, self.q99 - self.q01)
        n = np.clip(2.0 * (a - self.q01) / span - 1.0, -1.0, 1.0)
        return np.where(self.mask, n, a)


def select_unnorm_key(norm_stats: Mapping, unnorm_key: str | None) -> str:
    """Resolve the dataset key to un-normalise with; errors list the keys the checkpoint has."""
    keys = sorted(norm_stats)
    if not keys:
        raise ValueError("checkpoint has no normalisation statistics (norm_stats / dataset_statistics.json)")
    if unnorm_key is None:
        if len(keys) != 1:
            raise ValueError(f"checkpoint has statistics for several datasets; pass an unnorm_key, one of {keys}")
        return keys[0]
    if unnorm_key not in norm_stats:
        raise ValueError(f"unknown unnorm_key {unnorm_key!r}; the checkpoint has {keys}")
    return unnorm_key


def action_stats(norm_stats: Mapping, key: str) -> ActionStats:
    entry = norm_stats[key]
    if not isinstance(entry, Mapping) or not isinstance(entry.get("action"), Mapping):
        raise ValueError(f"statistics for {key!r} have no 'action' object (got {entry!r:.80})")
    if "action" not in entry:
        raise ValueError(f"statistics for {key!r} have no 'action' entry (has {sorted(entry)})")
    return ActionStats.from_dict(entry["action"], where=f"statistics[{key!r}]['action']")


def default_dim_names(dim: int, names: Sequence[str] | None = None) -> list[str]:
    from .constants import DEFAULT_ACTION_DIM_NAMES

    if names is not None:
        names = list(names)
        if len(names) != dim:
            raise ValueError(f"{len(names)} action dim names {names} for {dim} dims")
        return names
    if dim == len(DEFAULT_ACTION_DIM_NAMES):
        return list(DEFAULT_ACTION_DIM_NAMES)
    return [f"a{i}" for i in range(dim)]
