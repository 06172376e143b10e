"""`bnb4` / `bnb8` backends: the language model's linear layers quantised with bitsandbytes, on CPU or CUDA.

NF4 (optionally double-quantised, bf16 compute by default) or LLM.int8 for every linear layer inside
the Llama decoder layers (and the projector's with `quantise_projector`); the embedding, the LM head,
the vision backbones and the projector otherwise stay in the load dtype (as in the reference's
QLoRA/8-bit setups). Each layer is quantised as soon as its weights have been streamed from the
checkpoint, on the target device, so the full-precision language model is never held anywhere.
bitsandbytes 0.50 runs both layer types on the CPU with its generic kernels (it logs that a faster
4-bit CPU kernel, fetched from a hub at run time, is unavailable) and on CUDA with its own.

bitsandbytes' layers do their own matmuls, so decoding goes through the modules' forward (Hugging
Face cache, greedy, exactly K*D tokens: `hf_greedy_decode`) rather than `llama_decode`, which reads
`layer.weight` directly. Without bitsandbytes, or with a CUDA device on a machine without CUDA,
construction raises ValueError saying which is missing.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..vla.checkpoint import Checkpoint
from ..vla.model import load_model
from ..vla.pipeline import OpenVLAPipeline
from .quantise import LinearQuantiser, quantisable_linears
from .torch_engine import TorchEngine, check_device, parse_dtype
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


def bnb_unavailable_reason(device: str = "cpu", *, cuda_available: bool | None = None,
                           bnb_installed: bool | None = None) -> str | None:
    """Why the bnb backends cannot run on `device` here (None when they can)."""
    import importlib.util

    if bnb_installed is None:
        bnb_installed = importlib.util.find_spec("bitsandbytes") is not None
    missing = []
    if str(device).startswith("cuda"):
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            missing.append(f"a CUDA GPU for device {device!r} (torch.cuda.is_available() is False on this machine; "
                           "--device cpu runs them on the CPU)")
    if not bnb_installed:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        return "the bnb4/bnb8 engines need " + " and ".join(missing) + "; or use --engine torch, int8 or onnx"
    return None


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


class BnbQuantiser(LinearQuantiser):
    """bitsandbytes layers for the targets: NF4/FP4 `Linear4bit` or LLM.int8 `Linear8bitLt`; the
    weights are quantised by bitsandbytes when the new layer is moved to the device."""

    def __init__(self, settings: dict, *, projector: bool = False):
        super().__init__(projector=projector)
        self.settings = dict(settings)
        self.name = f"bnb{settings['bits']}"
        if settings["bits"] == 4:
            # packed nibbles + one absmax per 64 weights (fp32, or 8-bit with double quantisation)
            self.weight_bytes_per_element = 0.5 + (1.0 if settings["double_quant"] else 4.0) / 64
        else:
            self.weight_bytes_per_element = 1.0  # + one fp32 scale per output row, negligible

    def quantise(self, module: nn.Linear, device: str) -> nn.Module:
        import bitsandbytes as bnb

        settings = self.settings
        compute_dtype = parse_dtype(settings["compute_dtype"])
        weight = module.weight.detach().to(compute_dtype)
        if settings["bits"] == 4:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=compute_dtype, quant_type=settings["quant_type"],
                                    compress_statistics=settings["double_quant"], device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=settings["quant_type"],
                                           compress_statistics=settings["double_quant"])
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                      has_fp16_weights=False, threshold=settings["int8_threshold"], device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        return new.to(device)  # bitsandbytes quantises on this move (CPU or CUDA)


def quantise_language_model(model: nn.Module, settings: dict, device: str, *, projector: bool = False) -> nn.Module:
    """Quantise an already loaded OpenVLA model's targets in place (loading with the quantiser is the
    memory-lean way; this serves models built in memory)."""
    quantiser = BnbQuantiser(settings, projector=projector)
    for name in sorted(quantiser.targets(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantiser.quantise(getattr(parent, child), device))
    return model.to(device)


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

    def __init__(self, checkpoint_dir, *, bits: int = 4, device: str = "cpu", dtype: str = "bfloat16",
                 quant_type: str = "nf4", double_quant: bool = True, int8_threshold: float = 6.0,
                 quantise_projector: bool = False, unnorm_key: str | None = None, center_crop: bool = False,
                 rotate_180: bool = False, clock: Callable[[], float] = time.perf_counter,
                 available_bytes: int | None = None):
        # Settings are validated before anything heavy happens; then availability.
        dtype = "bfloat16" if dtype == "auto" else dtype
        self.settings = bnb_settings(bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype,
                                     int8_threshold=int8_threshold)
        reason = bnb_unavailable_reason(device)
        if reason is not None:
            raise ValueError(reason)
        self.name = f"bnb{bits}"
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.device = check_device(device)
        self.dtype_name = dtype
        self.dtype = parse_dtype(dtype)
        self.pipeline = OpenVLAPipeline(self.checkpoint, unnorm_key=unnorm_key, center_crop=center_crop, rotate_180=rotate_180)
        self.quantiser = BnbQuantiser(self.settings, projector=quantise_projector)
        self.model = load_model(self.checkpoint, dtype=self.dtype, device=self.device, quantiser=self.quantiser,
                                available_bytes=available_bytes)
        self._clock = clock
        self._decoder = None

    def info(self) -> dict:
        return {**super().info(), "engine": self.name,
                "quantisation": {**self.settings, "projector": self.quantiser.projector}}

    def decode(self, embeds: torch.Tensor, n_tokens: int | None = None, windows=None) -> tuple[list[int], dict]:
        t0 = self._clock()
        n = self.pipeline.n_tokens if n_tokens is None else int(n_tokens)
        with warnings.catch_warnings():
            # LLM.int8 casts bf16 activations to fp16 by design and says so on every call.
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
            tokens = hf_greedy_decode(self.model.language_model, embeds, n, windows)
        self._sync()
        elapsed = (self._clock() - t0) * 1e3
        return tokens, {"lm": elapsed}


def create_bnb_engine(bits: int):
    """ENGINE_FACTORIES entries for bnb4/bnb8: CUDA when there is one unless a device is given; the
    compute dtype defaults (None/auto) to bfloat16."""
    def factory(checkpoint, *, device: str | None = None, dtype: str | None = None, **options) -> BnbEngine:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bfloat16" if dtype in (None, "auto") else dtype
        return BnbEngine(checkpoint, bits=bits, device=device, dtype=dtype, **options)

    return factory
