"""Loading a checkpoint of any size within a memory budget: streamed shards, no second copy.

The safetensors files are read tensor by tensor with plain reads into the tensor that the model
keeps (no memory map: mapped pages of a whole shard would count towards the process's resident set
while it is open, ~5 GB per shard of the released 7B), converted and moved to the target device one
tensor at a time, and assigned into a model built on the meta device. Peak memory is the loaded
weights plus one tensor. A `Quantiser` replaces each targeted linear layer as soon as its weights
have arrived, so a quantised model never holds the full-precision language model.

Before a single weight is read, the bytes the chosen dtype needs are compared with the memory
available on the target device; a model that cannot fit fails at once with what to choose instead.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from . import constants as C
from .checkpoint import Checkpoint, CheckpointError

# safetensors dtype codes -> torch dtypes (the ones a checkpoint of this model can hold).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A safetensors header above this size is not a weights file (the released 7B's is ~120 kB).
MAX_HEADER_BYTES = 100 * 2**20
# `--dtype auto` keeps float32 below this many parameters (tiny and demo models: exact tokens, and
# memory is no concern) and picks a 16-bit dtype above it (the released 7B is 7.5e9).
AUTO_FP32_MAX_PARAMS = 1_000_000_000
# Room for activations, the KV cache and allocator slack on top of the weights when checking fit.
MEMORY_HEADROOM_FRACTION = 0.05
MEMORY_HEADROOM_BYTES = 256 * 2**20
DTYPE_CHOICES = C.DTYPE_CHOICES


class InsufficientMemoryError(ValueError):
    """The chosen dtype/engine cannot fit this checkpoint in the target device's available memory."""


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are and what they are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(file: Path) -> list[TensorEntry]:
    """The entries of one safetensors file, validated against the file's size (no tensor data read)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"cannot read weights file {file}: shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"cannot read weights file {file}: header length {header_len} does not fit "
                                      f"in the file's {size} bytes")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"cannot read weights file {file}: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read weights file {file}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read weights file {file}: header is not an object")
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"cannot read weights file {file}: tensor {name!r} has a malformed entry {info!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or begin < 0 or stop - begin != nbytes or data_start + stop > size:
            raise CheckpointError(f"cannot read weights file {file}: tensor {name!r} ({info['dtype']} {list(shape)}) "
                                  f"does not match its byte range {begin}..{stop} in a file of {size} bytes")
        entries.append(TensorEntry(name, dtype, shape, file, data_start + begin, data_start + stop))
    return entries


def tensor_entries(checkpoint: Checkpoint) -> list[TensorEntry]:
    """Every stored tensor of the checkpoint (headers only), shard by shard in file order."""
    entries = []
    for file in checkpoint.weight_files:
        entries.extend(sorted(read_safetensors_header(file), key=lambda e: e.start))
    return entries


def stream_tensors(entries: Iterable[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """(entry, CPU tensor in the stored dtype) one at a time, read straight into the tensor's memory."""
    handle, current = None, None
    try:
        for entry in entries:
            if entry.file != current:
                if handle is not None:
                    handle.close()
                handle, current = open(entry.file, "rb"), entry.file
            raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
            handle.seek(entry.start)
            if raw.numel() and handle.readinto(raw.numpy()) != raw.numel():
                raise CheckpointError(f"cannot read weights file {entry.file}: tensor {entry.name!r} is truncated")
            yield entry, raw.view(entry.dtype).reshape(entry.shape)
    except OSError as exc:
        raise CheckpointError(f"cannot read weights file {current}: {exc}") from None
    finally:
        if handle is not None:
            handle.close()


# Memory budget --------------------------------------------------------------------------------

def available_memory_bytes(device: str) -> int:
    """Memory a load can use on `device` now: free GPU memory, or the OS's available RAM."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # elsewhere than Linux

    return int(psutil.virtual_memory().available)


def parameter_count(checkpoint: Checkpoint) -> int:
    return sum(entry.numel for entry in tensor_entries(checkpoint))


def resolve_dtype(name: str, device: str, checkpoint: Checkpoint | None = None, *,
                  n_params: int | None = None) -> str:
    """`auto` -> float32 for models under AUTO_FP32_MAX_PARAMS, else bfloat16 (float16 on GPUs without
    bf16); any other name is returned unchanged (validated by the engine)."""
    if name != "auto":
        return name
    if n_params is None:
        n_params = parameter_count(checkpoint)
    if n_params < AUTO_FP32_MAX_PARAMS:
        return "float32"
    if str(device).startswith("cuda") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def weight_bytes(entries: Iterable[TensorEntry], dtype: torch.dtype,
                 bytes_per_weight: Callable[[TensorEntry], float | None] | None = None) -> int:
    """Bytes the loaded weights take: floating tensors in `dtype`, others as stored; a quantiser's
    `bytes_per_weight(entry)` (None for tensors it leaves alone) overrides per tensor."""
    total = 0.0
    for entry in entries:
        per = bytes_per_weight(entry) if bytes_per_weight is not None else None
        if per is None:
            per = dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
        total += entry.numel * per
    return int(total)


def needed_bytes(weights: int) -> int:
    return int(weights * (1 + MEMORY_HEADROOM_FRACTION) + MEMORY_HEADROOM_BYTES)


def _gb(n: int) -> str:
    value = n / 1e9
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 0.1 else f"{value:.2f}"


def check_fits(weights: int, *, device: str, what: str, available: int | None = None,
               suggestions: str = "use --dtype bfloat16 or --engine bnb4") -> dict:
    """Raise InsufficientMemoryError when `weights` (+ headroom) exceed the memory available on `device`.

    `what` names the choice in the message ("in float32", "as bnb4"); returns the figures checked.
    """
    need = needed_bytes(weights)
    have = available_memory_bytes(device) if available is None else int(available)
    if need > have:
        where = "GPU memory" if str(device).startswith("cuda") else "RAM"
        raise InsufficientMemoryError(f"loading needs ~{_gb(need)} GB {what}, {_gb(have)} GB {where} available: "
                                      f"{suggestions}")
    return {"weight_bytes": int(weights), "needed_bytes": need, "available_bytes": have}


def suggestions_for(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "use --dtype bfloat16 or --engine bnb4"
    return "use --engine bnb4 (or int8, bnb8)"


# Streamed loading into a meta-built model ------------------------------------------------------

class Quantiser(Protocol):
    """Replaces chosen modules (by name) with quantised ones as soon as their weights have arrived."""

    name: str

    def targets(self, model: nn.Module) -> set[str]:
        """Module names (relative to the model) to quantise."""
        ...

    def bytes_per_weight(self, entry: TensorEntry, module_name: str, targets: set[str]) -> float | None:
        """Loaded bytes per stored element of `entry`, or None when the quantiser leaves it as loaded."""
        ...

    def quantise(self, module: nn.Module, device: str) -> nn.Module:
        """The quantised replacement for a fully loaded `module`, on `device`."""
        ...


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """Put `tensor` into the model as parameter/buffer `name` (no copy); returns the owning module's name."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"weight {name} has no parameter or buffer in the model")
    return module_name


_MALLOC_TRIM = []


def release_freed_heap() -> None:
    """Hand memory freed by a quantiser's temporaries back to the OS (glibc keeps freed blocks below
    its mmap threshold in the heap: measured, NF4-quantising a 4096x11008 layer on the CPU otherwise
    leaves ~20 MB of fragments behind per layer, ~3 GB over the 7B's decoder). No-op off glibc."""
    if not _MALLOC_TRIM:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _MALLOC_TRIM.append(None)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def load_streamed(model: nn.Module, entries: list[TensorEntry], *, dtype: torch.dtype, device: str,
                  rename: Callable[[str], str] = lambda n: n, quantiser: Quantiser | None = None,
                  on_quantised: Callable[[str], None] | None = None) -> nn.Module:
    """Read every entry into `model` (built on the meta device), converting floating tensors to `dtype`
    and moving each to `device` before the next is read; quantise targets as they complete."""
    targets = quantiser.targets(model) if quantiser is not None else set()
    pending = {}  # target module name -> parameter names still to arrive
    if targets:
        for module_name in targets:
            pending[module_name] = {n for n, _ in model.get_submodule(module_name).named_parameters(recurse=False)}
    for entry, tensor in stream_tensors(entries):
        name = rename(entry.name)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if tensor.device != torch.device(device):
            tensor = tensor.to(device)
        module_name = _assign(model, name, tensor)
        del tensor
        if module_name in pending:
            pending[module_name].discard(name.rpartition(".")[2])
            if not pending[module_name]:
                del pending[module_name]
                _replace(model, module_name, quantiser.quantise(model.get_submodule(module_name), device))
                release_freed_heap()
                if on_quantised is not None:
                    on_quantised(module_name)
    # Buffers that are not stored (e.g. rotary inv_freq) were created for real on the CPU.
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != torch.device(device) and buffer.device.type != "meta":
                module._buffers[key] = buffer.to(device)
    return model
