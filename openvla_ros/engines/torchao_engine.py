"""`int8` / `int4` backends: weight-only quantisation of the language model with torchao, for
machines without bitsandbytes (CPU or CUDA).

int8: one int8 weight per element and one scale per output row (`Int8WeightOnlyConfig`), on CPU and
CUDA. int4: 4-bit groups of `group_size` weights. On CUDA it is torchao's tinygemm layout
(`Int4WeightOnlyConfig`, packed, bf16); torchao 0.18 has no packed int4 layout that runs on the CPU
without extra kernel packages, so on the CPU the 4-bit values are kept one per int8
(`IntxWeightOnlyConfig(int4)`): 4-bit accuracy, int8 memory.

torchao's quantised weights are tensor subclasses that `F.linear` dispatches on, so these engines
keep the torch engine's own decode loop (`llama_decode`) unchanged. Layers are quantised as soon as
their weights have been streamed from the checkpoint (`vla.loading`).
"""
from __future__ import annotations

import importlib.util
import time
from typing import Callable

import torch
from torch import nn

from ..vla.checkpoint import Checkpoint
from ..vla.model import load_model
from ..vla.pipeline import OpenVLAPipeline
from .quantise import LinearQuantiser
from .torch_engine import TorchEngine, check_device, parse_dtype

AO_BITS = {"int8": 8, "int4": 4}
INT4_GROUP_SIZES = (32, 64, 128, 256)


def torchao_unavailable_reason(bits: int, device: str, *, ao_installed: bool | None = None,
                               cuda_available: bool | None = None) -> str | None:
    """Why the int8/int4 engines cannot run on `device` here (None when they can)."""
    if ao_installed is None:
        ao_installed = importlib.util.find_spec("torchao") is not None
    missing = []
    if str(device).startswith("cuda"):
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            missing.append(f"a CUDA GPU for device {device!r} (torch.cuda.is_available() is False on this machine)")
    if not ao_installed:
        missing.append("the torchao package (pip install torchao)")
    if missing:
        return f"the int{bits} engine needs " + " and ".join(missing) + "; or use --engine torch or onnx"
    return None


class TorchaoQuantiser(LinearQuantiser):
    """torchao weight-only quantisation of one target layer at a time."""

    def __init__(self, bits: int, *, device: str, group_size: int = 128, projector: bool = False):
        super().__init__(projector=projector)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if bits == 4 and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
        self.bits, self.group_size, self.name = bits, int(group_size), f"int{bits}"
        self.packed = bits == 4 and str(device).startswith("cuda")
        # int8: 1 byte + a row scale; int4: packed nibbles + bf16 scale/zero per group on CUDA,
        # one int8 per value + a scale per group on the CPU.
        if bits == 8:
            self.weight_bytes_per_element = 1.0
        elif self.packed:
            self.weight_bytes_per_element = 0.5 + 4.0 / group_size
        else:
            self.weight_bytes_per_element = 1.0 + 2.0 / group_size

    def group_for(self, in_features: int) -> int:
        """The group size used for a layer: the requested one, or the largest smaller standard size that
        divides the layer's inputs (small test models)."""
        for size in sorted((g for g in INT4_GROUP_SIZES if g <= self.group_size), reverse=True):
            if in_features % size == 0:
                return size
        raise ValueError(f"int4 needs a layer's in_features divisible by one of {INT4_GROUP_SIZES} "
                         f"(<= group_size {self.group_size}), a layer has {in_features}")

    def config(self, in_features: int):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        if self.bits == 8:
            return Int8WeightOnlyConfig()
        group = self.group_for(in_features)
        if self.packed:
            return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))

    def quantise(self, module: nn.Linear, device: str) -> nn.Module:
        from torchao.quantization import quantize_

        holder = nn.Sequential(module.to(device))
        quantize_(holder, self.config(module.in_features))
        layer = holder[0]
        layer.weight.requires_grad_(False)
        return layer


class TorchaoEngine(TorchEngine):
    """`Engine` backend: the torch engine with torchao weight-only int8/int4 decoder linears."""

    def __init__(self, checkpoint_dir, *, bits: int = 8, device: str = "cpu", dtype: str = "auto",
                 group_size: int = 128, quantise_projector: bool = False, unnorm_key: str | None = None,
                 center_crop: bool = False, rotate_180: bool = False,
                 clock: Callable[[], float] = time.perf_counter, available_bytes: int | None = None):
        self.name = f"int{bits}"
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.device = check_device(device)
        self.quantiser = TorchaoQuantiser(bits, device=self.device, group_size=group_size,
                                          projector=quantise_projector)
        reason = torchao_unavailable_reason(bits, self.device)
        if reason is not None:
            raise ValueError(reason)
        # Packed int4 on CUDA computes in bf16 only; elsewhere the compute dtype follows --dtype.
        dtype = "bfloat16" if (dtype == "auto" or self.quantiser.packed) else dtype
        self.dtype_name = dtype
        self.dtype = parse_dtype(dtype)
        self.pipeline = OpenVLAPipeline(self.checkpoint, unnorm_key=unnorm_key, center_crop=center_crop, rotate_180=rotate_180)
        self.model = load_model(self.checkpoint, dtype=self.dtype, device=self.device, quantiser=self.quantiser,
                                available_bytes=available_bytes)
        self._clock = clock
        self._decoder = None

    def info(self) -> dict:
        return {**super().info(), "engine": self.name,
                "quantisation": {"bits": self.quantiser.bits, "weight_only": True, "library": "torchao",
                                 "group_size": self.quantiser.group_size if self.quantiser.bits == 4 else None,
                                 "packed": self.quantiser.packed or self.quantiser.bits == 8,
                                 "compute_dtype": self.dtype_name, "projector": self.quantiser.projector}}


def create_torchao_engine(bits: int):
    """ENGINE_FACTORIES entries for int8/int4 (device defaults to cpu, the compute dtype to bfloat16)."""
    def factory(checkpoint, *, device: str | None = None, dtype: str | None = None, **options) -> TorchaoEngine:
        return TorchaoEngine(checkpoint, bits=bits, device=device or "cpu", dtype=dtype or "auto", **options)

    return factory


__all__ = ["AO_BITS", "TorchaoEngine", "TorchaoQuantiser", "create_torchao_engine",
           "torchao_unavailable_reason"]
