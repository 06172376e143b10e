"""Engine backends behind one factory: `create_engine("torch", checkpoint_dir, ...)`.

Every backend returns the same `ActionChunk`; callers pick one with `engine:` (node parameter) or
`--engine` (CLI).
"""
from __future__ import annotations

from typing import Callable

from .base import ActionChunk, Engine


def _torch(checkpoint, **options):
    from .torch_engine import TorchEngine

    return TorchEngine(checkpoint, **options)


# name -> factory(checkpoint_dir, **options). Later backends register here.
ENGINE_FACTORIES: dict[str, Callable[..., Engine]] = {"torch": _torch}


def engine_names() -> list[str]:
    return sorted(ENGINE_FACTORIES)


def create_engine(name: str, checkpoint, **options) -> Engine:
    if name not in ENGINE_FACTORIES:
        raise ValueError(f"unknown engine {name!r}; available: {engine_names()}")
    return ENGINE_FACTORIES[name](checkpoint, **options)


__all__ = ["ActionChunk", "Engine", "create_engine", "engine_names", "ENGINE_FACTORIES"]
