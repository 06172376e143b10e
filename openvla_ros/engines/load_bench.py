"""`openvla-ros bench load`: what loading a checkpoint costs, measured in a fresh child process.

The child imports what an engine needs, notes its resident set (the baseline), builds the engine and
reports its peak resident set (ru_maxrss), the weights' bytes in the chosen dtype and the ratio of
the peak growth to those bytes; a load refused for lack of memory reports the message and how long
the refusal took. A fresh process per measurement keeps earlier allocations out of the peak.

    python -m openvla_ros.engines.load_bench --checkpoint DIR [--engine torch] [--dtype auto] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

LOAD_NOTES = [
    "peak_rss_mb: ru_maxrss of a fresh child process that only loads the engine",
    "baseline_rss_mb: its resident set after importing torch/transformers/timm, before loading",
    "peak_over_weights: (peak_rss - baseline_rss) / weight bytes in the loaded dtype (1.0 = no second copy)",
]


def _child(checkpoint: str, engine_name: str, dtype: str, device: str) -> dict:
    import timm  # noqa: F401  (imports are part of the baseline, not of loading)
    import torch
    import transformers  # noqa: F401

    from ..vla.checkpoint import Checkpoint
    from ..vla.loading import InsufficientMemoryError, resolve_dtype, tensor_entries, weight_bytes
    from . import create_engine
    from .bench import current_rss_mb, peak_rss_mb

    baseline = current_rss_mb()
    opened = Checkpoint.open(checkpoint)
    resolved = resolve_dtype(dtype, device, opened)
    result = {"checkpoint": checkpoint, "engine": engine_name, "dtype_requested": dtype, "dtype": resolved,
              "device": device, "baseline_rss_mb": baseline,
              "weight_bytes": weight_bytes(tensor_entries(opened), getattr(torch, resolved)),
              "notes": LOAD_NOTES}
    t0 = time.perf_counter()
    try:
        engine = create_engine(engine_name, checkpoint, device=device, dtype=dtype)
    except InsufficientMemoryError as exc:
        result.update({"loaded": False, "error": str(exc), "seconds": time.perf_counter() - t0,
                       "peak_rss_mb": peak_rss_mb()})
        return result
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    result.update({"loaded": True, "seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": current_rss_mb(),
                   "peak_over_weights": (peak - baseline) * 2**20 / result["weight_bytes"],
                   "engine_dtype": engine.info().get("dtype")})
    return result


def measure_load(checkpoint, *, engine: str = "torch", dtype: str = "auto", device: str = "cpu",
                 timeout_s: float = 3600) -> dict:
    """Run `_child` in a fresh interpreter and return its JSON result."""
    command = [sys.executable, "-m", "openvla_ros.engines.load_bench", "--checkpoint", str(checkpoint),
               "--engine", engine, "--dtype", dtype, "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"load measurement failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--engine", default="torch")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.checkpoint, args.engine, args.dtype, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
