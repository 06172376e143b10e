"""How a trained model fares at the inference latency of the hardware it runs on (`openvla-ros eval latency`).

One model, the same seeded scenes in every cell, the closed loop in simulated time
(`sim.closed_loop`): per chunk geometry (``chunk``: the model's K actions; ``one_action``: only
the first, as the released OpenVLA answers), per inference latency L (fixed, or drawn from a file
of measured latencies so jitter is modelled) with inference back to back, and per execution
strategy:

* ``sync``: the arm waits while the model thinks, then executes the chunk (deploy.py clients);
* ``replace`` / ``crossfade`` / ``ensemble``: the latency-compensated timeline with that blend;
* ``arrival``: each chunk played from its arrival, the last action held until the next;
* ``auto``: vla_node's default, timeline or arrival per chunk from K*dt against the measured need;
* ``prefix``: the timeline with real-time chunking (committed actions forced as the first tokens).

Each cell reports success, time to success, commanded path length, jerk, the largest velocity step
at chunk switches and the share of moving ticks; `write_sweep_report` writes JSON, Markdown and a
plot of success and jerk against L.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

STRATEGIES: dict[str, dict] = {
    "sync": {"sync": True},
    "replace": {"execution": "timeline", "blend_policy": "replace"},
    "crossfade": {"execution": "timeline", "blend_policy": "crossfade"},
    "ensemble": {"execution": "timeline", "blend_policy": "ensemble"},
    "arrival": {"execution": "arrival", "blend_policy": "replace"},
    "auto": {"execution": "auto", "blend_policy": "replace"},
    "prefix": {"execution": "timeline", "blend_policy": "replace", "forced_prefix": True},
}
GEOMETRY_CHUNK = "chunk"
GEOMETRY_ONE_ACTION = "one_action"
GEOMETRIES = (GEOMETRY_CHUNK, GEOMETRY_ONE_ACTION)
DEFAULT_LATENCIES_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
MEASURED = "measured"  # the latency axis' label when latencies are drawn from a file
METRICS = ("success", "time_to_success_s", "path_length_m", "jerk_rms", "max_switch_jump", "moving_fraction")


@dataclass(frozen=True)
class SweepConfig:
    latencies_s: tuple = DEFAULT_LATENCIES_S
    strategies: tuple = tuple(STRATEGIES)
    geometries: tuple = GEOMETRIES
    episodes: int = 20
    max_seconds: float = 8.0
    control_rate_hz: float = 100.0
    measured_latencies_s: tuple = ()  # non-empty: every call's latency is drawn from these instead
    jitter_seed: int = 0

    def validated(self) -> "SweepConfig":
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategies {unknown or list(self.strategies)}; choose from {list(STRATEGIES)}")
        unknown = [g for g in self.geometries if g not in GEOMETRIES]
        if unknown or not self.geometries:
            raise ValueError(f"unknown geometries {unknown or list(self.geometries)}; choose from {list(GEOMETRIES)}")
        for name, values in (("latency", self.latencies_s), ("measured latency", self.measured_latencies_s)):
            bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
            if bad:
                raise ValueError(f"{name} values must be seconds >= 0, got {bad}")
        if not self.latencies_s and not self.measured_latencies_s:
            raise ValueError("no latencies to sweep: give latencies_s or measured_latencies_s")
        if not (isinstance(self.episodes, int) and self.episodes >= 1):
            raise ValueError(f"episodes must be an integer >= 1, got {self.episodes!r}")
        return self

    @property
    def latency_axis(self) -> list:
        return [MEASURED] if self.measured_latencies_s else [float(v) for v in self.latencies_s]


@dataclass
class SweepCell:
    geometry: str
    latency_s: float | str
    strategy: str
    episodes: int
    success: float
    time_to_success_s: float | None  # mean over successful episodes
    path_length_m: float
    jerk_rms: float
    max_switch_jump: float  # mean over episodes of each episode's largest step
    moving_fraction: float
    calls: int
    runs: list = field(default_factory=list, repr=False)  # per episode: seed, success, time, jerk


def read_latency_file(path) -> tuple[float, ...]:
    """Latencies in seconds: a JSON list, or one number per line (blank lines and '#' comments ignored)."""
    text = Path(path).read_text()
    try:
        values = json.loads(text)
    except ValueError:
        values = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                try:
                    values.append(float(line))
                except ValueError:
                    raise ValueError(f"{path}:{number}: not a latency in seconds: {line!r}") from None
    if not isinstance(values, list) or not values:
        raise ValueError(f"{path} holds no latencies (expected a JSON list or one number per line)")
    return tuple(float(v) for v in values)


def _cell(geometry, latency, strategy, episodes) -> SweepCell:
    n = len(episodes)
    times = [e.time_to_success_s for e in episodes if e.success]
    return SweepCell(
        geometry=geometry, latency_s=latency, strategy=strategy, episodes=n,
        success=sum(e.success for e in episodes) / n,
        time_to_success_s=float(np.mean(times)) if times else None,
        path_length_m=float(np.mean([e.path_length_m for e in episodes])),
        jerk_rms=float(np.mean([e.jerk_rms for e in episodes])),
        max_switch_jump=float(np.mean([e.max_switch_jump for e in episodes])),
        moving_fraction=float(np.mean([e.moving_fraction for e in episodes])),
        calls=int(sum(e.calls for e in episodes)),
        runs=[{"seed": e.seed, "success": e.success, "time_to_success_s": e.time_to_success_s,
               "jerk_rms": e.jerk_rms, "max_switch_jump": e.max_switch_jump} for e in episodes])


def run_latency_sweep(engine, seeds: Sequence[int], config: SweepConfig, *,
                      on_episode: Callable[[str, object, str], None] | None = None,
                      workers: int = 1) -> list[SweepCell]:
    """Every (geometry, latency, strategy) cell on the same seeded scenes; see the module docstring.

    ``seeds`` are scene seeds (the target cube and instruction follow from each); the first
    ``config.episodes`` are used. ``on_episode(geometry, latency, strategy)`` is called after each
    episode (progress; with several workers, for a cell's episodes once the cell is done). Cells a
    geometry cannot run (``prefix`` on a one-action model or an engine without forced-prefix
    decoding) are left out. ``workers`` > 1 runs cells in that many processes; ``engine`` must then
    be a picklable zero-argument factory building the engine (each worker builds its own). The
    cells do not depend on the number of workers: latencies are simulated, not measured.
    """
    config = config.validated()
    seeds = list(seeds)[:config.episodes]
    if len(seeds) < config.episodes:
        raise ValueError(f"{config.episodes} episodes need as many seeds, got {len(seeds)}")
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if workers == 1:
        engine = engine() if callable(engine) and not hasattr(engine, "predict") else engine
        runner = _CellRunner(engine, config.control_rate_hz, seeds[0])
        try:
            keys = [k for k in _cell_keys(config) if runner.can_run(*k)]
            return [runner.run(*key, seeds, config, on_episode) for key in keys]
        finally:
            runner.close()
    if hasattr(engine, "predict"):
        raise ValueError("workers > 1 needs a picklable engine factory (each worker builds its engine), "
                         f"got an engine instance {engine!r}")
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(engine, config.control_rate_hz, seeds[0])) as pool:
        keys = [k for k in _cell_keys(config) if pool.submit(_worker_can_run, *k).result()]
        futures = {pool.submit(_worker_cell, *key, seeds, config): key for key in keys}
        cells = {}
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            cells[key] = future.result()
            if on_episode is not None:
                for _ in range(len(seeds)):
                    on_episode(*key)
    return [cells[key] for key in keys]


def _cell_keys(config: SweepConfig) -> list[tuple]:
    return [(g, lat, s) for g in config.geometries for lat in config.latency_axis for s in config.strategies]


class _CellRunner:
    """One engine, scene and kinematics running cells (in the caller, or one per worker process)."""

    def __init__(self, engine, control_rate_hz: float, first_seed: int):
        from openvla_ros.sim.closed_loop import EngineSource, closed_loop_scene
        from openvla_ros.sim.rollout import panda_kinematics

        self.engine = engine
        self.sources = {g: EngineSource(engine, first_action_only=g == GEOMETRY_ONE_ACTION) for g in GEOMETRIES}
        self.scene = closed_loop_scene(first_seed, control_rate_hz)
        self.kinematics = panda_kinematics()

    def can_run(self, geometry: str, latency, strategy: str) -> bool:
        return not STRATEGIES[strategy].get("forced_prefix") or self.sources[geometry].supports_forced_prefix

    def run(self, geometry: str, latency, strategy: str, seeds: Sequence[int], config: SweepConfig,
            on_episode=None) -> SweepCell:
        from openvla_ros.sim.closed_loop import closed_loop_episode
        from openvla_ros.sim.scene import instruction_for, target_for_seed

        rng = np.random.default_rng(config.jitter_seed)
        sampler = (lambda: float(rng.choice(config.measured_latencies_s))) if latency == MEASURED else None
        episodes = []
        for seed in seeds:
            target = target_for_seed(seed)
            self.scene.reset(seed)
            episodes.append(closed_loop_episode(
                self.scene, self.kinematics, self.sources[geometry], target, instruction_for(target), policy=strategy,
                seed=seed, max_seconds=config.max_seconds, control_rate_hz=config.control_rate_hz,
                replan_period_s=0.0, sim_latency_s=None if sampler else float(latency), latency_sampler=sampler,
                check_period_s=float(self.engine.dt), **STRATEGIES[strategy]))
            if on_episode is not None:
                on_episode(geometry, latency, strategy)
        return _cell(geometry, latency, strategy, episodes)

    def close(self) -> None:
        self.scene.close()


_WORKER: dict = {}


def _init_worker(factory, control_rate_hz: float, first_seed: int) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core
    _WORKER["runner"] = _CellRunner(factory(), control_rate_hz, first_seed)


def _worker_can_run(geometry, latency, strategy) -> bool:
    return _WORKER["runner"].can_run(geometry, latency, strategy)


def _worker_cell(geometry, latency, strategy, seeds, config) -> SweepCell:
    return _WORKER["runner"].run(geometry, latency, strategy, seeds, config)


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def sweep_markdown(cells: Sequence[SweepCell], title: str = "Latency sweep") -> str:
    """Per geometry, one table per metric: strategies down, latencies across."""
    lines = [f"# {title}", ""]
    for geometry in dict.fromkeys(c.geometry for c in cells):
        mine = [c for c in cells if c.geometry == geometry]
        latencies = list(dict.fromkeys(c.latency_s for c in mine))
        strategies = list(dict.fromkeys(c.strategy for c in mine))
        by_key = {(c.strategy, c.latency_s): c for c in mine}
        header = "| strategy | " + " | ".join(f"L = {lat}" if lat == MEASURED else f"L = {lat:g} s" for lat in latencies) + " |"
        for metric, digits, caption in (("success", 2, "success"), ("jerk_rms", 1, "jerk RMS (m/s³)"),
                                        ("max_switch_jump", 3, "largest velocity step at a chunk switch (m/s)"),
                                        ("moving_fraction", 2, "share of ticks moving"),
                                        ("time_to_success_s", 2, "mean time to success (s)"),
                                        ("path_length_m", 3, "commanded path length (m)")):
            lines += [f"**{geometry}: {caption}** ({mine[0].episodes} episodes per cell)", "", header,
                      "|---|" + "---|" * len(latencies)]
            for strategy in strategies:
                row = [_fmt(getattr(by_key[(strategy, lat)], metric), digits) if (strategy, lat) in by_key else "–"
                       for lat in latencies]
                lines.append(f"| {strategy} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_sweep(cells: Sequence[SweepCell], path: Path) -> Path | None:
    """Success and jerk against latency, one line per strategy, a column per geometry (fixed latencies only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    numeric = [c for c in cells if c.latency_s != MEASURED]
    if not numeric:
        return None
    geometries = list(dict.fromkeys(c.geometry for c in numeric))
    fig = Figure(figsize=(5.5 * len(geometries), 7.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(geometries), squeeze=False)
    for col, geometry in enumerate(geometries):
        mine = [c for c in numeric if c.geometry == geometry]
        for strategy in dict.fromkeys(c.strategy for c in mine):
            line = sorted((c.latency_s, c.success, c.jerk_rms) for c in mine if c.strategy == strategy)
            lat = [p[0] for p in line]
            axes[0][col].plot(lat, [p[1] for p in line], marker="o", label=strategy)
            axes[1][col].plot(lat, [p[2] for p in line], marker="o", label=strategy)
        axes[0][col].set(title=f"{geometry}: success", xlabel="inference latency (s)", ylabel="success rate",
                         ylim=(-0.05, 1.05))
        axes[1][col].set(title=f"{geometry}: jerk of the commanded tip", xlabel="inference latency (s)",
                         ylabel="RMS jerk (m/s³)")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_sweep_report(cells: Sequence[SweepCell], out_dir, config: SweepConfig, info: dict | None = None) -> dict:
    """results.json, report.md and sweep.png in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(config), "info": info or {}, "cells": [asdict(c) for c in cells]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot = plot_sweep(cells, out / "sweep.png")
    text = sweep_markdown(cells)
    if plot is not None:
        text = text.replace("\n", f"\n\n![success and jerk against latency]({plot.name})\n", 1)
    (out / "report.md").write_text(text + "\n")
    return {"results": str(out / "results.json"), "report": str(out / "report.md"),
            "plot": None if plot is None else str(plot)}
