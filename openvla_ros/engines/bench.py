"""`openvla-ros bench engine`: this project's decode loop against the plain Hugging Face path.

Same process, same weights, same inputs: per-stage medians for both, whether the tokens are
identical, and speedups (reference time / ours) for the language-model part and the whole action.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .torch_engine import TorchEngine


def synthetic_scene(seed: int = 0, height: int = 256, width: int = 320) -> np.ndarray:
    """A deterministic RGB test image: grey table, a red and a blue block, mild noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, dtype=np.int16)
    image += rng.integers(-12, 13, size=image.shape, dtype=np.int16)
    for colour in ((200, 30, 30), (30, 30, 200)):
        y, x = int(rng.integers(0, height - 40)), int(rng.integers(0, width - 40))
        image[y:y + 40, x:x + 40] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def bench_engine(engine: TorchEngine, image: np.ndarray, instruction: str, *, runs: int = 20,
                 warmup: int = 3) -> dict:
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    clock = time.perf_counter
    ours: dict[str, list[float]] = {}
    ref_lm, ref_total = [], []
    identical = True
    ours_tokens = ref_tokens = None
    for i in range(warmup + runs):
        # Interleave the two paths so machine load affects both alike.
        chunk = engine.predict(image, instruction)
        t0 = clock()
        with torch.inference_mode():
            pixel_values, input_ids = engine.prepare(image, instruction)
            embeds = engine.multimodal_embeddings(pixel_values, input_ids)
            tokens, lm_ms = engine.reference_tokens(embeds)
        total_ms = (clock() - t0) * 1e3
        ours_tokens, ref_tokens = chunk.tokens.tolist(), tokens
        identical &= ours_tokens == ref_tokens
        if i < warmup:
            continue
        for stage, ms in chunk.timings_ms.items():
            ours.setdefault(stage, []).append(ms)
        ref_lm.append(lm_ms)
        ref_total.append(total_ms)
    ours_ms = {stage: statistics.median(values) for stage, values in ours.items()}
    ref_ms = {"lm": statistics.median(ref_lm), "total": statistics.median(ref_total)}
    return {
        "benchmark": "engine",
        "engine": engine.info(),
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "n_tokens": engine.pipeline.n_tokens,
        "ours_ms": ours_ms,
        "reference_ms": ref_ms,
        "reference": "LlamaForCausalLM.generate(inputs_embeds, greedy, K*D new tokens)",
        "tokens_identical": bool(identical),
        "tokens": ours_tokens,
        "reference_tokens": ref_tokens,
        "speedup_lm": ref_ms["lm"] / ours_ms["lm"],
        "speedup_total": ref_ms["total"] / ours_ms["total"],
    }
