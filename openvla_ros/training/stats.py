"""Action statistics of training data in the official `dataset_statistics.json` schema.

Per dimension: mean, std, min, max, q01, q99 and `mask` (False for the gripper, which is tokenised
as it is). Every consumer of the schema (the reference's `predict_action`, this project's engine)
un-normalises with `0.5 * (n + 1) * (q99 - q01) + q01`, so the `q01`/`q99` fields written hold the
bounds the data was *actually* normalised with:

- ``q01_q99`` (default, as OpenVLA): the 1st/99th percentiles;
- ``min_max``: the minimum/maximum;
- ``mean_std``: mean -/+ one standard deviation (n = (a - mean) / std; values beyond one std clip
  to the end bins, as the reference's tokenizer clips).

With a type other than the default the data's own percentiles are kept as `data_q01`/`data_q99`
and the type as `normalization`, so nothing is lost and the engine needs no change.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..vla.action_tokens import ActionStats

NORMALIZATION_TYPES = ("q01_q99", "min_max", "mean_std")
DEFAULT_NORMALIZATION = "q01_q99"
GRIPPER_NAMES = ("gripper",)
STAT_FIELDS = ("mean", "std", "max", "min", "q01", "q99")


def default_mask(dim_names: Sequence[str]) -> list[bool]:
    """True (normalise) for every dimension except the gripper's."""
    return [str(name).lower() not in GRIPPER_NAMES for name in dim_names]


def action_statistics(actions: np.ndarray, *, mask: Sequence[bool] | None = None, dim_names: Sequence[str] | None = None,
                      normalization: str = DEFAULT_NORMALIZATION) -> dict:
    """The `"action"` entry for (N, D) actions (see the module docstring for `normalization`)."""
    if normalization not in NORMALIZATION_TYPES:
        raise ValueError(f"normalization must be one of {NORMALIZATION_TYPES}, got {normalization!r}")
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"actions must be a non-empty (N, D) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("actions contain NaN or inf")
    if mask is None:
        mask = default_mask(dim_names) if dim_names is not None else [True] * a.shape[1]
    mask = [bool(m) for m in mask]
    if len(mask) != a.shape[1]:
        raise ValueError(f"mask has {len(mask)} entries for {a.shape[1]}-D actions")
    mean, std = a.mean(axis=0), a.std(axis=0)
    q01, q99 = np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0)
    entry = {"mean": mean.tolist(), "std": std.tolist(), "max": a.max(axis=0).tolist(), "min": a.min(axis=0).tolist(),
             "q01": q01.tolist(), "q99": q99.tolist(), "mask": mask}
    if normalization == "min_max":
        entry["q01"], entry["q99"] = entry["min"], entry["max"]
    elif normalization == "mean_std":
        entry["q01"], entry["q99"] = (mean - std).tolist(), (mean + std).tolist()
    if normalization != DEFAULT_NORMALIZATION:
        entry["data_q01"], entry["data_q99"] = q01.tolist(), q99.tolist()
        entry["normalization"] = normalization
    return entry


def dataset_entry(actions: np.ndarray, *, num_trajectories: int, dim_names: Sequence[str] | None = None,
                  mask: Sequence[bool] | None = None, normalization: str = DEFAULT_NORMALIZATION) -> dict:
    """One dataset key's value: action statistics, placeholder proprio statistics, counts."""
    entry = action_statistics(actions, mask=mask, dim_names=dim_names, normalization=normalization)
    dim = len(entry["mean"])
    # The demonstrations carry no proprioception; zeros keep the schema the reference expects.
    proprio = {name: [0.0] * dim for name in STAT_FIELDS}
    return {"action": entry, "proprio": proprio, "num_transitions": int(np.asarray(actions).shape[0]),
            "num_trajectories": int(num_trajectories)}


def write_statistics(path: str | Path, statistics: Mapping[str, dict]) -> Path:
    """Write `{dataset_key: entry}` as dataset_statistics.json."""
    for key, entry in statistics.items():
        if not key or "action" not in entry:
            raise ValueError(f"statistics entry {key!r} must be keyed by a dataset name and hold 'action'")
        ActionStats.from_dict(entry["action"], where=f"statistics[{key!r}]['action']")
    path = Path(path)
    path.write_text(json.dumps(dict(statistics), indent=2) + "\n")
    return path


def stats_for(statistics: Mapping[str, dict]) -> dict[str, ActionStats]:
    """ActionStats (what normalise/unnormalise use) per dataset key."""
    return {key: ActionStats.from_dict(entry["action"], where=f"statistics[{key!r}]['action']")
            for key, entry in statistics.items()}
