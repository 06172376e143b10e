"""Training throughput and memory on a tiny checkpoint: `openvla-ros bench train [--json]`.

`bench_train()` writes a tiny checkpoint and a few synthetic HDF5 demonstrations into a scratch
directory, trains the same steps twice with `run_training` and reports per-step time (after a
warm-up step), samples/s, peak RSS and, on CUDA, the peak of allocated GPU memory.

The reference run is the same training with `num_workers=0`: batch building (image augmentation,
preprocessing for the vision backbones, tokenisation) then happens in the training process between
optimizer steps, while with workers it overlaps the model's compute. On a tiny model that batch
building is a large share of a step, so this ratio is the figure the worker option changes; LoRA
against full fine-tuning of a tiny model would say little about the 7B model, where LoRA is about
memory. Both runs use the same seed and so train on the same batches: `losses_identical` checks it.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engines.bench import peak_rss_mb

WARMUP_STEPS = 1  # the first step pays worker start-up, lazy imports and first allocations
DEFAULT_EPISODES = 8
DEFAULT_FRAMES = 16
IMAGE_SHAPE = (256, 320)  # the engine benchmark's synthetic scene size; the cache resizes to 224
INSTRUCTION = "reach the red cube"


def write_synthetic_episodes(out: str | Path, episodes: int, frames: int, seed: int = 0) -> Path:
    """`episodes` ACT-style HDF5 files of `frames` scene images and random 7-D actions (gripper 0/1)."""
    import h5py

    from ..engines.bench import synthetic_scene

    if episodes < 1 or frames < 1:
        raise ValueError(f"episodes and frames must be >= 1, got {episodes} and {frames}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        images = np.stack([synthetic_scene(seed * 100_003 + e * 1_000 + t, *IMAGE_SHAPE) for t in range(frames)])
        actions = np.concatenate([rng.uniform(-0.02, 0.02, (frames, 6)), (np.arange(frames)[:, None] // 4) % 2],
                                 axis=1)
        with h5py.File(out / f"episode_{e}.hdf5", "w") as f:
            f.create_dataset("observations/images/cam", data=images)
            f.create_dataset("action", data=actions)
            f.create_dataset("language_raw", data=[INSTRUCTION.encode()])
    return out


def _summary(step_s: list[float], batch_size: int) -> dict:
    timed = np.asarray(step_s[WARMUP_STEPS:], dtype=np.float64)
    return {"samples_per_s": float(batch_size * len(timed) / timed.sum()),
            "step_ms_p50": float(np.percentile(timed, 50) * 1e3),
            "step_ms_p95": float(np.percentile(timed, 95) * 1e3),
            "warmup_step_ms": float(step_s[0] * 1e3)}


def bench_train(*, steps: int = 20, batch_size: int = 8, lora_rank: int = 32, full: bool = False,
                num_workers: int = 2, device: str | None = None, episodes: int = DEFAULT_EPISODES,
                frames: int = DEFAULT_FRAMES, seed: int = 0, work_dir: str | Path | None = None,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train `steps` steps with `num_workers` loader workers, then the same with 0 (the reference)."""
    from ..vla.tiny import write_tiny_checkpoint
    from .data import EpisodeReadOptions
    from .trainer import MODEL_PARTS, DatasetConfig, TrainConfig, run_training

    if steps < WARMUP_STEPS + 1:
        raise ValueError(f"steps must be >= {WARMUP_STEPS + 1} (a warm-up step and one timed), got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not full and lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1 (or use full fine-tuning), got {lora_rank}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (the reference run uses 0), got {num_workers}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")

    scratch = tempfile.TemporaryDirectory(prefix="openvla-bench-train-") if work_dir is None else None
    root = Path(scratch.name if scratch is not None else work_dir)
    try:
        checkpoint = write_tiny_checkpoint(root / "tiny", seed=seed)
        data = write_synthetic_episodes(root / "episodes", episodes, frames, seed=seed)

        def run(workers: int, name: str) -> tuple[dict, list[float]]:
            config = TrainConfig(
                out_dir=str(root / name), datasets=[DatasetConfig("bench", [str(data)], read=EpisodeReadOptions())],
                base_checkpoint=str(checkpoint), steps=steps, batch_size=batch_size, seed=seed,
                lora_rank=0 if full else lora_rank, train_parts=list(MODEL_PARTS) if full else [],
                val_fraction=0.0, eval_every=steps, save_every=steps, progress=False, resume=False,
                num_workers=workers, device=device, cache_dir=str(root / "cache"))
            step_s, losses = [], []

            def on_step(step: int, seconds: float, loss: float) -> None:
                step_s.append(seconds)
                losses.append(loss)

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = clock()
            run_training(config, clock=clock, on_step=on_step)
            out = {"num_workers": workers, **_summary(step_s, batch_size), "final_loss": losses[-1],
                   "wall_s": clock() - start, "peak_rss_mb": peak_rss_mb()}
            if workers:
                out["worker_peak_rss_mb"] = peak_rss_mb(children=True)
            if cuda:
                out["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            return out, losses

        # The measured run goes first so that its peak RSS (a process-wide maximum) is its own.
        measured, measured_losses = run(num_workers, "measured")
        reference, reference_losses = run(0, "reference")
    finally:
        if scratch is not None:
            scratch.cleanup()

    reference["description"] = (f"the same {steps} steps, data, model and seed with num_workers=0 (batches built in "
                                f"the training process); its peak_rss_mb is the process peak after both runs")
    return {
        "benchmark": "train",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": "tiny checkpoint (openvla_ros.vla.tiny defaults)",
        "mode": "full" if full else "lora",
        "lora_rank": 0 if full else lora_rank,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "batch_size": batch_size,
        "data": {"episodes": episodes, "frames_per_episode": frames, "image": list(IMAGE_SHAPE), "augment": True},
        **measured,
        "reference": reference,
        "ratio": measured["samples_per_s"] / reference["samples_per_s"],
        "ratio_of": f"samples_per_s with num_workers={num_workers} / with num_workers=0",
        "losses_identical": measured_losses == reference_losses,
    }
