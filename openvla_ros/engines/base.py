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
    time the image was taken (seconds), not the time the answer arrived. A chunk decoded with
    `forced_steps` committed actions forced as its first tokens holds only the free actions after
    them: its `stamp` is the observation time + forced_steps * dt, where the committed ones end.
    """

    actions: np.ndarray  # (K, D) float64, dataset units (un-normalised)
    dim_names: list[str]
    dt: float  # seconds each action covers (the training data's control period)
    stamp: float = 0.0  # observation time, seconds
    tokens: np.ndarray | None = None  # (K*D,) int64 raw token ids, when the backend has them
    normalised: np.ndarray | None = None  # (K, D) values in [-1, 1] before un-normalisation
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, e.g. preprocess/vision/prefill/decode/total
    unnorm_key: str | None = None
    forced_steps: int = 0  # committed actions teacher-forced before `actions` (not included in them)
    forced_tokens: np.ndarray | None = None  # (forced_steps*D,) int64 ids of those committed actions

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
        if not (isinstance(self.forced_steps, (int, np.integer)) and self.forced_steps >= 0):
            raise ValueError(f"forced_steps must be an integer >= 0, got {self.forced_steps!r}")
        self.actions = actions
        self.dim_names = list(self.dim_names)
        self.forced_steps = int(self.forced_steps)

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
            "forced_steps": self.forced_steps,
            "forced_tokens": [] if self.forced_tokens is None else [int(t) for t in np.ravel(self.forced_tokens)],
        }


@runtime_checkable
class Engine(Protocol):
    """What the inference worker, the CLI and the evaluator need from a backend."""

    name: str
    dim_names: Sequence[str]
    dt: float
    chunk_len: int
    # Backends that can decode with a forced prefix also set `supports_forced_prefix = True`; it is
    # not a protocol member so that engines without it (wrappers, test engines) still qualify: read
    # it with `supports_forced_prefix(engine)`.

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None, forced_prefix: np.ndarray | None = None) -> ActionChunk:
        """Image HxWx3 uint8 RGB and an instruction -> the chunk of actions for it.

        `forced_prefix` (P, D), 0 <= P < chunk_len: actions in dataset units already committed for
        the first P steps after `stamp`. They are forced as the chunk's first tokens and the answer
        holds the K-P actions after them (stamp + P*dt). None or P == 0: plain decoding.
        Local token backends also take `prefix_soft_bins=k`: nothing is forced, all K actions are
        decoded from `stamp`, the first P restricted to +-k bins of the committed ones.
        """
        ...

    def info(self) -> dict:
        """Identity for reports and /info: engine name, checkpoint, dims, unnorm keys, device, dtype."""
        ...


def supports_forced_prefix(engine) -> bool:
    """Whether `engine.predict` accepts a non-empty `forced_prefix` (False for engines that do not say)."""
    return bool(getattr(engine, "supports_forced_prefix", False))


def check_forced_prefix(forced_prefix, chunk_len: int, action_dim: int) -> np.ndarray:
    """The committed actions to force, validated: a float64 (P, D) array with 0 <= P < chunk_len.

    None or an empty array mean no forcing (P = 0). Raises ValueError naming the offending value.
    """
    if forced_prefix is None:
        return np.zeros((0, action_dim))
    try:
        prefix = np.asarray(forced_prefix, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"forced_prefix must be a numeric (P, D) array, got {str(forced_prefix)[:200]}") from None
    if prefix.size == 0:
        return np.zeros((0, action_dim))
    if prefix.ndim != 2 or prefix.shape[1] != action_dim:
        raise ValueError(f"forced_prefix must be (P, {action_dim}) (committed actions x this engine's {action_dim} dims), "
                         f"got shape {prefix.shape}")
    if prefix.shape[0] >= chunk_len:
        raise ValueError(f"forced_prefix has P = {prefix.shape[0]} steps; it must be shorter than the chunk "
                         f"(P < K = {chunk_len}) so that something is left to predict")
    bad = np.argwhere(~np.isfinite(prefix))
    if bad.size:
        step, dim = (int(i) for i in bad[0])
        raise ValueError(f"forced_prefix holds a non-finite value {prefix[step, dim]} at step {step}, dim {dim}")
    return prefix


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
