"""Open-loop metrics comparing predicted actions with ground truth, plus latency, repeatability and
instruction-sensitivity statistics.

Definitions (arrays are (N frames, D dims), dataset units):

- ``mae[d] = mean(|pred - true|)``, ``rmse[d] = sqrt(mean((pred - true)^2))``.
- ``l2_mean = mean over frames of ||pred - true||_2`` (over all dims).
- ``nrmse[d] = rmse[d] / range[d]`` where ``range[d] = max(true[:, d]) - min(true[:, d])`` over the
  evaluated frames (or a caller-given range, e.g. q99 - q01 of the checkpoint's statistics).
  Dims whose range is zero (a constant truth) have no NRMSE (None) and are left out of the mean.
  ``nrmse = mean of nrmse[d]`` and ``accuracy = 1 - nrmse``, the score NanoLLM reports for OpenVLA.
- ``gripper_accuracy``: fraction of frames where pred and truth fall on the same side of 0.5
  (values >= 0.5 count as open).
- Latency: p50 / p95 (linear-interpolated percentiles) of milliseconds per prediction.
- Repeatability: N predictions on the same frame; per dim the standard deviation across runs
  (population, ddof=0) averaged over frames, and the largest max-min spread seen.
- Instruction sensitivity: for instruction pairs (a, b), the L2 distance between the actions
  predicted on the same frames with a and with b; mean per pair and over all pairs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

GRIPPER_THRESHOLD = 0.5


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"predictions {p.shape} and truth {t.shape} must be equal (N, D) shapes")
    if p.shape[0] == 0:
        raise ValueError("no frames to score")
    for name, values in (("predictions", p), ("truth", t)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} contain NaN or inf at rows {sorted(set(np.argwhere(~np.isfinite(values))[:, 0].tolist()))}")
    return p, t


def mae(pred, true) -> np.ndarray:
    p, t = _pair(pred, true)
    return np.mean(np.abs(p - t), axis=0)


def rmse(pred, true) -> np.ndarray:
    p, t = _pair(pred, true)
    return np.sqrt(np.mean((p - t) ** 2, axis=0))


def l2_mean(pred, true) -> float:
    p, t = _pair(pred, true)
    return float(np.mean(np.linalg.norm(p - t, axis=1)))


def truth_range(true) -> np.ndarray:
    """max - min of the truth per dim."""
    t = np.asarray(true, dtype=np.float64)
    return np.max(t, axis=0) - np.min(t, axis=0)


def nrmse_per_dim(pred, true, ranges=None) -> list[float | None]:
    """RMSE / range per dim; None where the range is zero."""
    p, t = _pair(pred, true)
    r = truth_range(t) if ranges is None else np.asarray(ranges, dtype=np.float64).reshape(-1)
    if r.shape[0] != p.shape[1]:
        raise ValueError(f"{r.shape[0]} ranges for {p.shape[1]} dims")
    if np.any(~np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"ranges must be finite and >= 0, got {r.tolist()}")
    errors = rmse(p, t)
    return [float(e / width) if width > 0 else None for e, width in zip(errors, r)]


def nrmse(pred, true, ranges=None) -> float | None:
    """Mean NRMSE over the dims that have one; None when no dim does."""
    values = [v for v in nrmse_per_dim(pred, true, ranges) if v is not None]
    return float(np.mean(values)) if values else None


def gripper_accuracy(pred_gripper, true_gripper, threshold: float = GRIPPER_THRESHOLD) -> float:
    p, t = _pair(pred_gripper, true_gripper)
    return float(np.mean((p >= threshold) == (t >= threshold)))


def period_errors_ms(times_s: Sequence[float], period_s: float) -> np.ndarray:
    """|interval - period| in ms for each pair of consecutive times (seconds) of a periodic stream."""
    diffs = np.diff(np.asarray(times_s, dtype=np.float64))
    return np.abs(diffs - period_s) * 1e3


def latency_stats(latencies_ms: Sequence[float]) -> dict:
    """p50, p95, mean and max of latencies in ms (None values when there are none)."""
    values = np.asarray([v for v in latencies_ms if v is not None], dtype=np.float64)
    if values.size == 0:
        return {"p50": None, "p95": None, "mean": None, "max": None, "count": 0}
    if not np.all(np.isfinite(values)):
        raise ValueError("latencies contain NaN or inf")
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "mean": float(values.mean()), "max": float(values.max()), "count": int(values.size)}


def repeatability(runs) -> dict:
    """Spread of repeated predictions; `runs` is (frames, repeats, dims)."""
    r = np.asarray(runs, dtype=np.float64)
    if r.ndim != 3 or r.shape[0] == 0 or r.shape[1] < 2:
        raise ValueError(f"repeatability needs (frames, repeats >= 2, dims) predictions, got shape {r.shape}")
    std = np.std(r, axis=1)  # (frames, dims)
    spread = np.max(r, axis=1) - np.min(r, axis=1)
    return {
        "repeats": int(r.shape[1]),
        "frames": int(r.shape[0]),
        "std_mean": std.mean(axis=0).tolist(),
        "spread_max": spread.max(axis=0).tolist(),
        "std_mean_overall": float(std.mean()),
        "identical_fraction": float(np.mean(np.all(spread == 0, axis=1))),
    }


def instruction_sensitivity(pair_actions: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> dict:
    """L2 distance between actions for instruction pairs on the same frames.

    `pair_actions[(a, b)] = (actions_with_a, actions_with_b)`, each (frames, dims).
    """
    if not pair_actions:
        raise ValueError("no instruction pairs given")
    pairs = []
    all_distances = []
    for (a, b), (with_a, with_b) in pair_actions.items():
        pa, pb = _pair(with_a, with_b)
        distances = np.linalg.norm(pa - pb, axis=1)
        all_distances.append(distances)
        pairs.append({"a": a, "b": b, "frames": int(distances.size), "l2_mean": float(distances.mean()),
                      "l2_max": float(distances.max())})
    return {"pairs": pairs, "l2_mean": float(np.mean([p["l2_mean"] for p in pairs])),
            "l2_mean_all_frames": float(np.concatenate(all_distances).mean())}


def action_metrics(pred, true, dim_names: Sequence[str], gripper_dim: str | None = "gripper",
                   ranges=None) -> dict:
    """All per-frame metrics in the `summary.json` layout."""
    p, t = _pair(pred, true)
    if len(dim_names) != p.shape[1]:
        raise ValueError(f"{len(dim_names)} dim names {list(dim_names)} for {p.shape[1]} dims")
    names = list(dim_names)
    per_dim_nrmse = nrmse_per_dim(p, t, ranges)
    mean_nrmse = nrmse(p, t, ranges)
    summary = {
        "frames": int(p.shape[0]),
        "dims": names,
        "mae": dict(zip(names, mae(p, t).tolist())),
        "rmse": dict(zip(names, rmse(p, t).tolist())),
        "l2_mean": l2_mean(p, t),
        "nrmse_per_dim": dict(zip(names, per_dim_nrmse)),
        "nrmse": mean_nrmse,
        "accuracy": None if mean_nrmse is None else 1.0 - mean_nrmse,
        "gripper_accuracy": None,
    }
    if gripper_dim is not None and gripper_dim in names:
        g = names.index(gripper_dim)
        summary["gripper_accuracy"] = gripper_accuracy(p[:, g], t[:, g])
    return summary

