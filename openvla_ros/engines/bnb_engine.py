"""`bnb4` / `bnb8` backends: the language model's linear layers quantised with bitsandbytes on CUDA.

NF4 (optionally double-quantised) or LLM.int8 for every linear layer inside the Llama decoder
layers; the embedding, the LM head, the vision backbones and the projector stay bf16 (as in the
reference's QLoRA/8-bit setups). Weights are loaded to the CPU first and quantised while being
moved to the GPU, so the full bf16 language model never has to fit in GPU memory.

bitsandbytes' layers do their own matmuls, so decoding goes through the modules' forward (Hugging
Face cache, greedy, exactly K*D tokens: `hf_greedy_decode`) rather than `llama_decode`, which reads
`layer.weight` directly. Without CUDA or without bitsandbytes, construction raises ValueError
saying which is missing.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..vla.checkpoint import Checkpoint
from ..vla.model import load_model
from ..vla.pipeline import OpenVLAPipeline
from .torch_engine import TorchEngine, check_device, parse_dtype
from .base import gpu_backend_unavailable_reason
from .llama_decode import greedy

BNB_BITS = {"bnb4": 4, "bnb8": 8}
NF4_TYPES = ("nf4", "fp4")


def bnb_settings(bits: int, *, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: str = "bfloat16", int8_threshold: float = 6.0) -> dict:
    """The quantisation settings (also what `info()` reports), validated."""
    parse_dtype(compute_dtype)
    if bits == 4:
        if quant_type not in NF4_TYPES:
            raise ValueError(f"4-bit quant_type must be one of {NF4_TYPES}, got {quant_type!r}")
        return {"bits": 4, "quant_type": quant_type, "double_quant": bool(double_quant), "compute_dtype": compute_dtype}
    if bits == 8:
        if not (int8_threshold >= 0 and np.isfinite(int8_threshold)):
            raise ValueError(f"int8_threshold must be a finite number >= 0, got {int8_threshold}")
        return {"bits": 8, "int8_threshold": float(int8_threshold), "compute_dtype": compute_dtype}
    raise ValueError(f"bits must be 4 or 8, got {bits!r}")


def bnb_unavailable_reason(*, cuda_available: bool | None = None, bnb_installed: bool | None = None) -> str | None:
    """Why the bnb backends cannot run here (None when they can)."""
    return gpu_backend_unavailable_reason("the bnb4/bnb8 engines need", "the bitsandbytes package (pip install bitsandbytes)",
                                          "--engine torch or onnx", cuda_available=cuda_available,
                                          package_installed=bnb_installed, module="bitsandbytes")


def quantisable_linears(language_model: nn.Module) -> list[str]:
    """Names (relative to the language model) of the linear layers that get quantised:
    every nn.Linear inside the decoder layers; embedding and lm_head stay in full precision."""
    return [name for name, module in language_model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}"]


def quantised_weight_bytes(language_model: nn.Module, bits: int) -> dict:
    """Weight bytes of the language model before (bf16) and after quantisation (per-block scales
    included approximately: NF4 one fp32 absmax per 64 weights, int8 one per output row)."""
    names = set(quantisable_linears(language_model))
    quantised = full = other = 0
    for name, module in language_model.named_modules():
        if name in names:
            count = module.weight.numel()
            full += count * 2
            quantised += count // 2 + 4 * (count // 64) if bits == 4 else count + 4 * module.weight.shape[0]
    for name, param in language_model.named_parameters():
        if name.rsplit(".", 1)[0] not in names or name.endswith(".bias"):
            other += param.numel() * 2
    return {"bf16_bytes": full + other, "quantised_bytes": quantised + other}


def quantise_language_model(language_model: nn.Module, settings: dict, device: str) -> nn.Module:
    """Swap the decoder's linear layers for bitsandbytes ones and move the model to `device` (CUDA);
    bitsandbytes quantises the weights during that move."""
    import bitsandbytes as bnb

    compute_dtype = parse_dtype(settings["compute_dtype"])
    for name in quantisable_linears(language_model):
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        weight = old.weight.detach().to(compute_dtype).cpu()
        if settings["bits"] == 4:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=compute_dtype, quant_type=settings["quant_type"],
                                    compress_statistics=settings["double_quant"], device="cpu")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=settings["quant_type"],
                                           compress_statistics=settings["double_quant"])
        else:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                      has_fp16_weights=False, threshold=settings["int8_threshold"], device="cpu")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().to(compute_dtype), requires_grad=False)
        setattr(parent, child, new)
    return language_model.to(device)


@torch.inference_mode()
def hf_greedy_decode(causal_lm, embeds: torch.Tensor, n_tokens: int, windows=None) -> list[int]:
    """Greedy `n_tokens` through the model's own forward with its KV cache (no EOS stop, no processors);
    token i among ids windows[i] = (lo, hi) while there are windows."""
    windows = list(windows or [])

    def window(i):
        return windows[i] if i < len(windows) else None

    out = causal_lm(inputs_embeds=embeds, use_cache=True)
    token = greedy(out.logits[:, -1:], window(0))
    tokens = [token]
    cache = out.past_key_values
    for i in range(1, n_tokens):
        out = causal_lm(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = greedy(out.logits[:, -1:], window(i))
        tokens.append(token)
    return torch.cat(tokens, dim=1)[0].tolist()


class BnbEngine(TorchEngine):
    """`Engine` backend: TorchEngine's pre/post-processing and vision path, a bitsandbytes language model."""

    def __init__(self, checkpoint_dir, *, bits: int = 4, device: str = "cuda", dtype: str = "bfloat16",
                 quant_type: str = "nf4", double_quant: bool = True, int8_threshold: float = 6.0,
                 unnorm_key: str | None = None, center_crop: bool = False, rotate_180: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        # Settings are validated before anything heavy happens; then availability.
        self.settings = bnb_settings(bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype,
                                     int8_threshold=int8_threshold)
        reason = bnb_unavailable_reason()
        if reason is not None:
            raise ValueError(reason)
        if not str(device).startswith("cuda"):
            raise ValueError(f"the bnb engines run on CUDA only, got device {device!r}")
        self.name = f"bnb{bits}"
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.device = check_device(device)
        self.dtype_name = dtype
        self.dtype = parse_dtype(dtype)
        self.pipeline = OpenVLAPipeline(self.checkpoint, unnorm_key=unnorm_key, center_crop=center_crop, rotate_180=rotate_180)
        model = load_model(self.checkpoint, dtype=self.dtype, device="cpu")
        model.vision_backbone.to(self.device)
        model.projector.to(self.device)
        quantise_language_model(model.language_model, self.settings, self.device)
        self.model = model.eval()
        self._clock = clock
        self._decoder = None

    def info(self) -> dict:
        return {**super().info(), "engine": self.name, "quantisation": dict(self.settings)}

    def decode(self, embeds: torch.Tensor, n_tokens: int | None = None, windows=None) -> tuple[list[int], dict]:
        t0 = self._clock()
        n = self.pipeline.n_tokens if n_tokens is None else int(n_tokens)
        tokens = hf_greedy_decode(self.model.language_model, embeds, n, windows)
        self._sync()
        elapsed = (self._clock() - t0) * 1e3
        return tokens, {"lm": elapsed}


def create_bnb_engine(bits: int):
    """ENGINE_FACTORIES entries for bnb4/bnb8; the CLI's defaults (cpu, float32) become cuda, bfloat16."""
    def factory(checkpoint, *, device: str | None = None, dtype: str | None = None, **options) -> BnbEngine:
        device = "cuda" if device in (None, "cpu") else device
        dtype = "bfloat16" if dtype in (None, "float32") else dtype
        return BnbEngine(checkpoint, bits=bits, device=device, dtype=dtype, **options)

    return factory
