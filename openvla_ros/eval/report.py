"""Evaluation outputs: predictions.csv, summary.json, report.md with PNG plots, comparison tables.

Plots use matplotlib's object API on an Agg canvas created inside each function, so importing
this module selects no backend and touches no global pyplot state.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

PREDICTIONS_CSV = "predictions.csv"
SUMMARY_JSON = "summary.json"
REPORT_MD = "report.md"
COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
PLOT_PREDICTIONS = "pred_vs_true.png"
PLOT_ERRORS = "error_histograms.png"
PLOT_LATENCY = "latency.png"

COMPARISON_COLUMNS = (
    ("bag", "bag"), ("checkpoint", "checkpoint"), ("frames", "frames"), ("l2_mean", "L2 mean"),
    ("nrmse", "NRMSE"), ("accuracy", "accuracy"), ("gripper_accuracy", "gripper acc."),
    ("latency_p50_ms", "p50 ms"), ("latency_p95_ms", "p95 ms"), ("matched", "matched"), ("dropped", "dropped"),
)


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def histogram(ax, values: np.ndarray, color: str) -> None:
    """ax.hist that also copes with (nearly) constant values, where 30 finite bins do not fit."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):
        centre = 0.5 * (lo + hi)
        half = max(abs(centre) * 0.05, 1e-6)
        ax.hist(values, bins=1, range=(centre - half, centre + half), color=color, alpha=0.8)
    else:
        ax.hist(values, bins=30, color=color, alpha=0.8)


def write_predictions_csv(result, path: str | Path) -> Path:
    """One row per frame: stamp, instruction, pred_<dim>..., true_<dim>..., tokens, latency_ms."""
    path = Path(path)
    truth_names = result.truth_dim_names or []
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stamp", "instruction"] + [f"pred_{d}" for d in result.dim_names]
                        + [f"true_{d}" for d in truth_names] + ["tokens", "latency_ms"])
        for i, stamp in enumerate(result.stamps):
            truth = [] if result.truths is None else [repr(float(v)) for v in result.truths[i]]
            writer.writerow([f"{stamp:.9f}", result.instructions[i]]
                            + [repr(float(v)) for v in result.predictions[i]] + truth
                            + [result.tokens[i], f"{result.latencies_ms[i]:.3f}"])
    return path


def json_ready(value):
    """`value` with numpy scalars/arrays, Paths and non-finite floats (-> None) made JSON-serialisable."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary_json(summary: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(json_ready(summary), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def plot_predictions(result, path: str | Path) -> Path | None:
    """Predicted and true value of each compared dim over time (one panel per dim)."""
    if result.truths is None or not result.pairs:
        return None
    t = result.stamps - (result.stamps[0] if len(result.stamps) else 0.0)
    n = len(result.pairs)
    figure = new_figure(10, 1.8 * n + 0.6)
    axes = figure.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (p, q) in zip(axes, result.pairs):
        ax.plot(t, result.truths[:, q], label="true", color="black", linewidth=1.2)
        ax.plot(t, result.predictions[:, p], label="predicted", color="tab:orange", linewidth=1.0)
        ax.set_ylabel(result.dim_names[p])
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("time since first frame (s)")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_error_histograms(result, path: str | Path) -> Path | None:
    """Histogram of (predicted - true) per compared dim."""
    if result.truths is None or not result.pairs:
        return None
    pred, true = result.compared()
    if pred.shape[0] == 0:
        return None
    errors = pred - true
    n = errors.shape[1]
    cols = min(4, n)
    rows = -(-n // cols)
    figure = new_figure(3.2 * cols, 2.6 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_visible(False)
            continue
        histogram(ax, errors[:, i], "tab:blue")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{result.compared_dims[i]} error", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_latency(result, path: str | Path) -> Path | None:
    """Histogram of per-frame latency with p50/p95 marked."""
    values = np.asarray(result.latencies_ms, dtype=np.float64)
    if values.size == 0:
        return None
    figure = new_figure(6, 3.2)
    ax = figure.subplots()
    histogram(ax, values, "tab:green")
    for q, style in ((50, "-"), (95, "--")):
        ax.axvline(np.percentile(values, q), color="black", linestyle=style, label=f"p{q}")
    ax.set_xlabel("latency per prediction (ms)")
    ax.set_ylabel("frames")
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_markdown(summary: dict, plots: dict[str, Path | None]) -> str:
    """The text of report.md for one (checkpoint, bag) run."""
    engine = summary.get("engine", {})
    lines = ["# Open-loop evaluation", ""]
    for key, label in (("checkpoint", "Checkpoint"), ("bag", "Bag"), ("image_topic", "Image topic"),
                       ("truth_topic", "Truth topic"), ("dt", "dt (s)"), ("unnorm_key", "Unnorm key")):
        if summary.get(key) is not None:
            lines.append(f"- {label}: `{summary[key]}`")
    if engine:
        lines.append(f"- Engine: `{engine.get('name', '?')}`")
    sync = summary.get("sync")
    if sync:
        lines.append(f"- Frames: {sync['matched']} matched of {sync['images']} images "
                     f"({sync['dropped']} dropped: {sync.get('dropped_by_reason', {})})")
    lines += ["", "## Summary", "",
              markdown_table(["metric", "value"], [
                  ["frames", summary.get("frames")], ["L2 mean", summary.get("l2_mean")],
                  ["NRMSE", summary.get("nrmse")], ["accuracy (1 - NRMSE)", summary.get("accuracy")],
                  ["gripper accuracy", summary.get("gripper_accuracy")],
                  ["latency p50 (ms)", summary["latency_ms"]["p50"]],
                  ["latency p95 (ms)", summary["latency_ms"]["p95"]],
                  ["non-finite predictions", summary.get("non_finite_predictions")],
              ])]
    if summary.get("mae"):
        dims = list(summary["mae"])
        lines += ["## Per dimension", "", markdown_table(
            ["dim", "MAE", "RMSE", "NRMSE"],
            [[d, summary["mae"][d], summary["rmse"][d], summary["nrmse_per_dim"][d]] for d in dims])]
    rep = summary.get("repeatability")
    if rep:
        lines += ["## Repeatability", "",
                  f"{rep['repeats']} runs on each of {rep['frames']} frames; identical on "
                  f"{rep['identical_fraction']:.1%} of frames; mean std {rep['std_mean_overall']:.4g}.", "",
                  markdown_table(["dim", "std (mean)", "spread (max)"],
                                 [[d, s, m] for d, s, m in zip(summary["dims"], rep["std_mean"], rep["spread_max"])])]
    sens = summary.get("instruction_sensitivity")
    if sens:
        lines += ["## Instruction sensitivity", "",
                  f"Mean L2 between actions over all pairs: {_fmt(sens['l2_mean'])}", "",
                  markdown_table(["instruction a", "instruction b", "frames", "L2 mean", "L2 max"],
                                 [[p["a"], p["b"], p["frames"], p["l2_mean"], p["l2_max"]] for p in sens["pairs"]])]
    titles = {"predictions": "Predicted vs. true", "errors": "Error histograms", "latency": "Latency"}
    for key, title in titles.items():
        plot = plots.get(key)
        if plot is not None:
            lines += [f"## {title}", "", f"![{title}]({Path(plot).name})", ""]
    return "\n".join(lines)


def write_outputs(result, summary: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """predictions.csv, summary.json, report.md and (with `plots`) the PNGs, in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"predictions": write_predictions_csv(result, out_dir / PREDICTIONS_CSV),
               "summary": write_summary_json(summary, out_dir / SUMMARY_JSON)}
    figures: dict[str, Path | None] = {}
    if plots:
        figures = {"predictions": plot_predictions(result, out_dir / PLOT_PREDICTIONS),
                   "errors": plot_error_histograms(result, out_dir / PLOT_ERRORS),
                   "latency": plot_latency(result, out_dir / PLOT_LATENCY)}
    report = out_dir / REPORT_MD
    report.write_text(report_markdown(summary, figures), encoding="utf-8")
    written["report"] = report
    written.update({f"plot_{k}": v for k, v in figures.items() if v is not None})
    return written


def comparison_markdown(rows: Sequence[dict]) -> str:
    """One Markdown table row per (bag, checkpoint)."""
    ordered = sorted(rows, key=lambda r: (str(r.get("bag")), str(r.get("checkpoint"))))
    return markdown_table([label for _, label in COMPARISON_COLUMNS],
                          [[row.get(key) for key, _ in COMPARISON_COLUMNS] for row in ordered])


def write_comparison(rows: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    md = out_dir / COMPARISON_MD
    md.write_text("# Comparison\n\n" + comparison_markdown(rows), encoding="utf-8")
    js = out_dir / COMPARISON_JSON
    js.write_text(json.dumps(json_ready(list(rows)), indent=2) + "\n", encoding="utf-8")
    return {"markdown": md, "json": js}
