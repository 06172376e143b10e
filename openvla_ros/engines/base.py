"""The contract every engine backend honours: `Engine.predict(image, instruction) -> ActionChunk`.

Backends (torch, bnb4/bnb8, onnx, tensorrt, remote) differ only in how they compute the tokens;
callers (CLI, ROS nodes, evaluation) see this one type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class ActionChunk:
    """K consecutive actions of D dims predicted from one observation.

    Action i covers `[stamp + i*dt, stamp + (i+1)*dt)` on the observation's clock: `stamp` is the
    time the image was taken (seconds), not the time the answer arrived.
    """

    actions: np.ndarray  # (K, D) float64, dataset units (un-normalised)
    dim_names: list[str]
    dt: float  # seconds each action covers (the training data's control period)
    stamp: float = 0.0  # observation time, seconds
    tokens: np.ndarray | None = None  # (K*D,) int64 raw token ids, when the backend has them
    normalised: np.ndarray | None = None  # (K, D) values in [-1, 1] before un-normalisation
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, e.g. preprocess/vision/prefill/decode/total
    unnorm_key: str | None = None

    def __post_init__(self):
        actions = np.asarray(self.actions, dtype=np.float64)
        if actions.ndim == 1:
            actions = actions[None, :]
        if actions.ndim != 2 or actions.shape[0] < 1:
            raise ValueError(f"actions must be (K, D) with K >= 1, got shape {actions.shape}")
        if len(self.dim_names) != actions.shape[1]:
            raise ValueError(f"{len(self.dim_names)} dim names {self.dim_names} for {actions.shape[1]} dims")
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {self.dt}")
        self.actions = actions
        self.dim_names = list(self.dim_names)

    @property
    def chunk_len(self) -> int:
        return int(self.actions.shape[0])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def is_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.actions)))

    def as_dict(self) -> dict:
        """JSON-ready form (used by `predict --json`, the server and reports)."""
        return {
            "action": self.actions.tolist() if self.chunk_len > 1 else self.actions[0].tolist(),
            "dims": self.dim_names,
            "dt": self.dt,
            "stamp": self.stamp,
            "tokens": [] if self.tokens is None else [int(t) for t in np.ravel(self.tokens)],
            "latency_ms": self.timings_ms.get("total"),
            "timings_ms": dict(self.timings_ms),
            "unnorm_key": self.unnorm_key,
        }


@runtime_checkable
class Engine(Protocol):
    """What the inference worker, the CLI and the evaluator need from a backend."""

    name: str
    dim_names: Sequence[str]
    dt: float
    chunk_len: int

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None) -> ActionChunk:
        """Image HxWx3 uint8 RGB and an instruction -> the chunk of actions for it."""
        ...

    def info(self) -> dict:
        """Identity for reports and /info: engine name, checkpoint, dims, unnorm keys, device, dtype."""
        ...


class PipelineBackedEngine:
    """The Engine protocol's properties for local backends that hold an `OpenVLAPipeline` as `self.pipeline`."""

    pipeline = None  # set by the backend's __init__

    @property
    def dim_names(self):
        return self.pipeline.dim_names

    @property
    def dt(self) -> float:
        return self.pipeline.dt

    @property
    def chunk_len(self) -> int:
        return self.pipeline.chunk_len


def gpu_backend_unavailable_reason(needs: str, package: str, alternative: str, *,
                                   cuda_available: bool | None, package_installed: bool | None,
                                   module: str) -> str | None:
    """Why a CUDA-only backend cannot run here (None when it can): names every missing piece.

    `needs` opens the message ("TensorRT needs"), `package` names the missing package with its
    install hint, `alternative` the backend to use instead.
    `cuda_available` / `package_installed` default (None) to probing this machine (torch, `module`).
    """
    import importlib.util

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if package_installed is None:
        package_installed = importlib.util.find_spec(module) is not None
    missing = []
    if not cuda_available:
        missing.append("a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    if not package_installed:
        missing.append(package)
    if missing:
        return f"{needs} " + " and ".join(missing) + f"; use {alternative} instead"
    return None
