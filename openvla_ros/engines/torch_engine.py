"""PyTorch backend: the checkpoint's network in transformers/timm with this project's decode loop.

One prefill over `[BOS] + image patches + prompt`, then greedy steps with a KV cache, decoding
exactly K*D tokens (no EOS stop, no sampling, no logits processors) — the same tokens as the
Hugging Face `generate()` path (`reference_tokens`, used by tests and `openvla-ros bench engine`).
With a forced prefix of P committed actions their P*D tokens follow the prompt in the same prefill
(`[BOS] + patches + prompt + forced`) and only the (K-P)*D free tokens are decoded; with
`prefix_soft_bins=k` instead all K*D are decoded, the first P*D restricted to +-k bins of the plan's.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..vla.checkpoint import Checkpoint
from ..vla.loading import resolve_dtype
from ..vla.model import load_model
from ..vla.pipeline import OpenVLAPipeline
from .base import ActionChunk, PipelineBackedEngine
from .llama_decode import LlamaGreedyDecoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        return device
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda[:N]'")


class TorchEngine(PipelineBackedEngine):
    """`Engine` backend running the checkpoint with PyTorch on CPU or CUDA."""

    name = "torch"
    supports_forced_prefix = True

    def __init__(self, checkpoint_dir, *, device: str = "cpu", dtype: str = "auto",
                 unnorm_key: str | None = None, center_crop: bool = False, rotate_180: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.device = check_device(device)
        self.dtype_name = resolve_dtype(dtype, self.device, self.checkpoint)  # auto: fp32 for small models, else 16-bit
        self.dtype = parse_dtype(self.dtype_name)
        self.pipeline = OpenVLAPipeline(self.checkpoint, unnorm_key=unnorm_key, center_crop=center_crop, rotate_180=rotate_180)
        self.model = load_model(self.checkpoint, dtype=self.dtype, device=self.device)
        self._clock = clock
        self._decoder: LlamaGreedyDecoder | None = None

    # Engine protocol -------------------------------------------------------------------------
    def info(self) -> dict:
        return {"engine": self.name, "device": self.device, "dtype": self.dtype_name, **self.pipeline.info()}

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None, forced_prefix: np.ndarray | None = None,
                prefix_soft_bins: int | None = None) -> ActionChunk:
        clock = self._clock
        t0 = clock()
        forced, windows = self.pipeline.prefix_plan(forced_prefix, prefix_soft_bins, unnorm_key=unnorm_key)
        pixel_values, input_ids = self.prepare(image, instruction, forced)
        t1 = clock()
        with torch.inference_mode():
            embeds = self.multimodal_embeddings(pixel_values, input_ids)
            self._sync()
            t2 = clock()
            tokens, lm_timings = self.decode(embeds, self.pipeline.free_tokens(forced), windows)
        t3 = clock()
        timings = {"preprocess": (t1 - t0) * 1e3, "vision": (t2 - t1) * 1e3, **lm_timings, "total": (t3 - t0) * 1e3}
        return self.pipeline.to_chunk(tokens, stamp=stamp, unnorm_key=unnorm_key, timings_ms=timings,
                                      forced_tokens=forced)

    # Stages ------------------------------------------------------------------------------------
    def prepare(self, image, instruction, forced_tokens=()):
        """Validated inputs on the device: pixel values [1, C, 224, 224] and input ids [1, T]
        (the prompt, then `forced_tokens` when given)."""
        input_ids = self.pipeline.input_ids(instruction)  # validates the instruction first (cheap)
        pixel_values = self.pipeline.pixel_values(image)
        input_ids = list(input_ids) + [int(t) for t in forced_tokens]
        return (pixel_values.to(self.device, self.dtype),
                torch.tensor([input_ids], dtype=torch.long, device=self.device))

    def multimodal_embeddings(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[BOS] + projected patches + the rest of the prompt, as input embeddings [1, 1+P+T-1, H]."""
        patches = self.model.projector(self.model.vision_backbone(pixel_values))
        text = self.model.language_model.get_input_embeddings()(input_ids)
        return torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)

    def decode(self, embeds: torch.Tensor, n_tokens: int | None = None,
               windows: list[tuple[int, int]] | None = None) -> tuple[list[int], dict]:
        """Greedy `n_tokens` (default K*D) tokens: one prefill, then one cached step per token; token
        i is chosen among ids windows[i] = (lo, hi) while there are windows. Returns tokens and timings."""
        windows = list(windows or [])
        n = self.pipeline.n_tokens if n_tokens is None else int(n_tokens)
        needed = embeds.shape[1] + n
        if self._decoder is None or self._decoder.max_len < needed:
            # Sized for this prompt plus headroom, so longer instructions rarely reallocate.
            self._decoder = LlamaGreedyDecoder(self.model.language_model, max_len=needed + 64)
        clock = self._clock
        t0 = clock()
        token = self._decoder.prefill(embeds, windows[0] if windows else None)
        tokens = [token]
        self._sync()
        t1 = clock()
        for i in range(1, n):
            token = self._decoder.step(token, windows[i] if i < len(windows) else None)
            tokens.append(token)
        result = torch.cat(tokens, dim=1)[0].tolist()  # one device->host copy at the end
        t2 = clock()
        return result, {"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3, "lm": (t2 - t0) * 1e3}

    def reference_tokens(self, embeds: torch.Tensor, n_tokens: int | None = None) -> tuple[list[int], float]:
        """The plain Hugging Face path on the same embeddings: `generate()`, greedy, `n_tokens`
        (default K*D) new tokens."""
        lm = self.model.language_model
        n = self.pipeline.n_tokens if n_tokens is None else int(n_tokens)
        t0 = self._clock()
        out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                          pad_token_id=lm.config.pad_token_id, eos_token_id=None)
        self._sync()
        elapsed_ms = (self._clock() - t0) * 1e3
        return out[0, -n:].tolist(), elapsed_ms

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
