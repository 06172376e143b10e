"""Open-loop evaluation: run an engine on recorded frames and compare its first action with the truth.

`evaluate` runs any object with the `Engine` protocol over frames (with optional repeats and
instruction pairs); `run_eval` does it for several checkpoints x bags and writes the files of
`report.py` plus one comparison table. This is what ``openvla-ros eval bag`` calls.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .bags import BagReadOptions, read_frames
from .metrics import action_metrics, instruction_sensitivity, latency_stats, repeatability

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Per-frame predictions of one engine on one set of frames, and the statistics derived from them."""

    dim_names: list[str]  # the engine's action dims
    stamps: np.ndarray  # (N,) seconds
    instructions: list[str]
    predictions: np.ndarray  # (N, D) first action of each chunk (first run); NaN rows when non-finite
    latencies_ms: list[float]
    tokens: list[str]  # space-separated token ids per frame ("" when the engine has none)
    truths: np.ndarray | None = None  # (N, Dt) in truth_dim_names order
    truth_dim_names: list[str] | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (pred index, truth index) compared
    non_finite: int = 0  # frames whose prediction had NaN/inf (left out of the metrics)
    repeat_runs: np.ndarray | None = None  # (N, R, D)
    sensitivity: dict | None = None
    engine_info: dict = field(default_factory=dict)

    @property
    def compared_dims(self) -> list[str]:
        return [self.dim_names[p] for p, _ in self.pairs]

    def compared(self) -> tuple[np.ndarray, np.ndarray]:
        """(pred, true) on the compared dims, frames with finite predictions only."""
        if self.truths is None or not self.pairs:
            raise ValueError("no ground truth to compare with")
        pred_idx = [p for p, _ in self.pairs]
        true_idx = [t for _, t in self.pairs]
        finite = np.all(np.isfinite(self.predictions), axis=1)
        return self.predictions[finite][:, pred_idx], self.truths[finite][:, true_idx]

    def summary(self, ranges: Sequence[float] | None = None) -> dict:
        """The `summary.json` content (metrics are None without ground truth)."""
        out: dict = {"frames": int(len(self.stamps)), "dims": list(self.dim_names),
                     "compared_dims": self.compared_dims, "non_finite_predictions": self.non_finite}
        metrics = {"mae": None, "rmse": None, "l2_mean": None, "nrmse_per_dim": None, "nrmse": None,
                   "accuracy": None, "gripper_accuracy": None}
        if self.truths is not None and self.pairs:
            pred, true = self.compared()
            if pred.shape[0]:
                metrics = action_metrics(pred, true, self.compared_dims, ranges=ranges)
                metrics.pop("frames"), metrics.pop("dims")
        out.update(metrics)
        out["latency_ms"] = latency_stats(self.latencies_ms)
        out["repeatability"] = None if self.repeat_runs is None else repeatability(self.repeat_runs)
        out["instruction_sensitivity"] = self.sensitivity
        out["engine"] = dict(self.engine_info)
        return out


def align_dims(engine_dims: Sequence[str], truth_dims: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs (engine index, truth index) to compare.

    By name when every truth dim is an engine dim (a 6-D twist truth against a 7-D action
    compares the 6 it has); positionally when the names differ but the counts agree.
    """
    engine_dims, truth_dims = list(engine_dims), list(truth_dims)
    if all(name in engine_dims for name in truth_dims):
        return [(engine_dims.index(name), i) for i, name in enumerate(truth_dims)]
    if len(engine_dims) == len(truth_dims):
        log.warning("truth dims %s differ from engine dims %s; comparing by position", truth_dims, engine_dims)
        return [(i, i) for i in range(len(truth_dims))]
    raise ValueError(f"cannot compare engine dims {engine_dims} with truth dims {truth_dims}")


def _progress(iterable, total: int | None, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="frame")


def _first_action(chunk) -> np.ndarray:
    return np.asarray(chunk.actions[0], dtype=np.float64)


def _engine_info(engine) -> dict:
    info = engine.info() if hasattr(engine, "info") else {}
    return {"name": getattr(engine, "name", type(engine).__name__), **dict(info)}


def evaluate(engine, frames: Iterable, *, unnorm_key: str | None = None, repeat: int = 1,
             instruction_pairs: Sequence[tuple[str, str]] | None = None,
             truth_dim_names: Sequence[str] | None = None, sensitivity_frames: int | None = None,
             progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> EvalResult:
    """Run `engine` on every frame (`Frame` records, e.g. a `FrameSet`) and collect its first actions.

    - ``repeat`` N > 1 predicts N times per frame (repeatability); the first run is scored.
    - ``instruction_pairs`` [(a, b), ...] predicts each frame with a and with b (sensitivity), on
      the first ``sensitivity_frames`` frames (all when None).
    - ``truth_dim_names`` names the frames' truth dims (taken from a `FrameSet` when omitted).
    - Latency is wall time around ``engine.predict`` measured with ``clock`` (seconds).
    """
    if int(repeat) < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    repeat = int(repeat)
    if truth_dim_names is None:
        truth_dim_names = getattr(frames, "dim_names", None)  # FrameSet / BagFrames know theirs
    dim_names = list(engine.dim_names)
    frame_list = list(frames) if not hasattr(frames, "__len__") else frames
    total = len(frame_list)

    stamps, instructions, predictions, latencies, tokens, truths, runs = [], [], [], [], [], [], []
    non_finite = 0
    for frame in _progress(frame_list, total, progress, f"eval {getattr(engine, 'name', 'engine')}"):
        per_frame = []
        for r in range(repeat):
            start = clock()
            chunk = engine.predict(frame.image, frame.instruction, stamp=frame.stamp, unnorm_key=unnorm_key)
            elapsed_ms = (clock() - start) * 1000.0
            action = _first_action(chunk)
            if action.shape[0] != len(dim_names):
                raise ValueError(f"engine answered {action.shape[0]} dims, it declares {dim_names}")
            per_frame.append(action)
            if r == 0:
                latencies.append(elapsed_ms)
                tokens.append("" if chunk.tokens is None else " ".join(str(int(t)) for t in np.ravel(chunk.tokens)))
        first = per_frame[0]
        if not np.all(np.isfinite(first)):
            non_finite += 1
            log.warning("engine answered a non-finite action at stamp %.6f: %s", frame.stamp, first.tolist())
            first = np.full_like(first, np.nan)
        stamps.append(frame.stamp)
        instructions.append(frame.instruction)
        predictions.append(first)
        truths.append(frame.truth)
        if repeat > 1:
            runs.append(np.stack(per_frame))

    result = EvalResult(
        dim_names=dim_names,
        stamps=np.asarray(stamps, dtype=np.float64),
        instructions=instructions,
        predictions=np.stack(predictions) if predictions else np.zeros((0, len(dim_names))),
        latencies_ms=latencies,
        tokens=tokens,
        non_finite=non_finite,
        engine_info=_engine_info(engine),
    )
    if truths and all(t is not None for t in truths):
        result.truths = np.stack([np.asarray(t, dtype=np.float64) for t in truths])
        names = list(truth_dim_names) if truth_dim_names is not None else list(dim_names)
        if len(names) != result.truths.shape[1]:
            raise ValueError(f"{len(names)} truth dim names {names} for truths of {result.truths.shape[1]} dims")
        result.truth_dim_names = names
        result.pairs = align_dims(dim_names, names)
    if runs:
        stacked = np.stack(runs)
        finite_rows = np.all(np.isfinite(stacked), axis=(1, 2))
        result.repeat_runs = stacked[finite_rows]
    if instruction_pairs:
        result.sensitivity = _sensitivity(engine, frame_list, instruction_pairs, unnorm_key, sensitivity_frames,
                                          progress)
    return result


def _sensitivity(engine, frames, instruction_pairs, unnorm_key, limit, progress) -> dict:
    chosen = list(frames)[: limit if limit is not None else None]
    if not chosen:
        raise ValueError("no frames for the instruction-sensitivity experiment")
    pair_actions = {}
    for a, b in instruction_pairs:
        if not (str(a).strip() and str(b).strip()):
            raise ValueError(f"instruction pair ({a!r}, {b!r}) has an empty instruction")
        with_a, with_b = [], []
        for frame in _progress(chosen, len(chosen), progress, f"pair {a!r} / {b!r}"):
            with_a.append(_first_action(engine.predict(frame.image, a, stamp=frame.stamp, unnorm_key=unnorm_key)))
            with_b.append(_first_action(engine.predict(frame.image, b, stamp=frame.stamp, unnorm_key=unnorm_key)))
        pair_actions[(a, b)] = (np.stack(with_a), np.stack(with_b))
    return instruction_sensitivity(pair_actions)


def load_instruction_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Instruction pairs from a file: JSON ``[["a", "b"], ...]`` or one ``a | b`` (or tab-separated) pair per line.

    Blank lines and lines starting with ``#`` are ignored.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instruction pairs file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"instruction pairs file {str(path)!r} is not valid JSON: {exc}") from exc
        pairs = []
        for entry in data:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise ValueError(f"instruction pair {entry!r} in {str(path)!r} is not two strings")
            pairs.append((entry[0].strip(), entry[1].strip()))
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split("|")
            if len(parts) != 2:
                raise ValueError(f"{str(path)!r} line {number}: expected 'a | b', got {line!r}")
            pairs.append((parts[0].strip(), parts[1].strip()))
    for a, b in pairs:
        if not a or not b:
            raise ValueError(f"instruction pair ({a!r}, {b!r}) in {str(path)!r} has an empty instruction")
    if not pairs:
        raise ValueError(f"instruction pairs file {str(path)!r} holds no pairs")
    return pairs


@dataclass
class EvalOptions:
    """Options of `run_eval` (the flags of ``openvla-ros eval bag`` besides checkpoints, bags, out)."""

    bag: BagReadOptions = field(default_factory=BagReadOptions)  # dt None: the engine's dt
    unnorm_key: str | None = None
    repeat: int = 1
    instruction_pairs: Sequence[tuple[str, str]] | None = None
    sensitivity_frames: int | None = None
    nrmse_ranges: Sequence[float] | None = None  # None: truth max - min per bag
    plots: bool = True


def _label(value, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(value)).name or str(value)).strip("_") or "item"
    label, n = base, 2
    while label in used:
        label, n = f"{base}-{n}", n + 1
    used.add(label)
    return label


def run_eval(engine_factory: Callable[[object], object], checkpoints: Sequence, bags: Sequence[str | Path],
             options: EvalOptions | None, out_dir: str | Path, *, progress: bool = True,
             clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Evaluate every checkpoint on every bag; write per-run files and a comparison table.

    ``engine_factory(checkpoint) -> Engine`` builds an engine per checkpoint (closed afterwards
    when it has ``close()``). With one checkpoint and one bag the files go straight into
    `out_dir`; otherwise into ``out_dir/<checkpoint>__<bag>/``. ``comparison.md`` and
    ``comparison.json`` in `out_dir` hold one row per (bag, checkpoint). Returns those rows.
    """
    from .report import write_comparison, write_outputs

    options = options or EvalOptions()
    if not checkpoints:
        raise ValueError("no checkpoints to evaluate")
    if not bags:
        raise ValueError("no bags to evaluate on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    single = len(checkpoints) == 1 and len(bags) == 1
    ckpt_labels_used, bag_labels_used = set(), set()
    bag_labels = [_label(b, bag_labels_used) for b in bags]
    rows = []
    for checkpoint in checkpoints:
        ckpt_label = _label(checkpoint, ckpt_labels_used)
        engine = engine_factory(checkpoint)
        try:
            for bag, bag_label in zip(bags, bag_labels):
                bag_options = options.bag
                if bag_options.dt is None:
                    bag_options = replace(bag_options, dt=float(engine.dt))
                frames = read_frames(bag, bag_options)
                if not len(frames):
                    raise ValueError(f"bag {str(bag)!r} gave no frames: {frames.report.as_dict()}")
                result = evaluate(engine, frames, unnorm_key=options.unnorm_key, repeat=options.repeat,
                                  instruction_pairs=options.instruction_pairs,
                                  sensitivity_frames=options.sensitivity_frames, progress=progress, clock=clock)
                summary = result.summary(options.nrmse_ranges)
                summary.update({"checkpoint": str(checkpoint), "bag": str(bag), "sync": frames.report.as_dict(),
                                "image_topic": frames.image_topic, "truth_topic": frames.truth_topic,
                                "dt": bag_options.dt, "unnorm_key": options.unnorm_key})
                run_dir = out_dir if single else out_dir / f"{ckpt_label}__{bag_label}"
                write_outputs(result, summary, run_dir, plots=options.plots)
                rows.append({"checkpoint": ckpt_label, "bag": bag_label, "dir": str(run_dir), **{
                    key: summary[key] for key in ("frames", "l2_mean", "nrmse", "accuracy", "gripper_accuracy")},
                    "latency_p50_ms": summary["latency_ms"]["p50"], "latency_p95_ms": summary["latency_ms"]["p95"],
                    "matched": summary["sync"]["matched"], "dropped": summary["sync"]["dropped"]})
        finally:
            close = getattr(engine, "close", None)
            if callable(close):
                close()
    write_comparison(rows, out_dir)
    return rows
