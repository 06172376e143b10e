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


def _fixed_dtype(options: dict) -> dict:
    """`--dtype auto` (the CLI/node default) for backends whose dtype is fixed elsewhere (the export's,
    the server's): the same as not choosing one."""
    return {**options, "dtype": None} if options.get("dtype") == "auto" else options


def _remote(checkpoint, **options):
    from .remote import create_remote_engine

    return create_remote_engine(checkpoint, **_fixed_dtype(options))


def _onnx(checkpoint, **options):
    from .onnx_engine import create_onnx_engine

    return create_onnx_engine(checkpoint, **_fixed_dtype(options))


def _bnb(bits):
    def factory(checkpoint, **options):
        from .bnb_engine import create_bnb_engine

        return create_bnb_engine(bits)(checkpoint, **options)

    return factory


def _torchao(bits):
    def factory(checkpoint, **options):
        from .torchao_engine import create_torchao_engine

        return create_torchao_engine(bits)(checkpoint, **options)

    return factory


def _tensorrt(checkpoint, **options):
    from .tensorrt_engine import create_tensorrt_engine

    return create_tensorrt_engine(checkpoint, **_fixed_dtype(options))


# name -> factory(checkpoint_dir, **options). Later backends register here.
ENGINE_FACTORIES: dict[str, Callable[..., Engine]] = {"torch": _torch, "remote": _remote, "onnx": _onnx,
                                                     "bnb4": _bnb(4), "bnb8": _bnb(8), "int8": _torchao(8), "int4": _torchao(4),
                                                     "tensorrt": _tensorrt}


def engine_names() -> list[str]:
    return sorted(ENGINE_FACTORIES)


def create_engine(name: str, checkpoint, **options) -> Engine:
    if name not in ENGINE_FACTORIES:
        raise ValueError(f"unknown engine {name!r}; available: {engine_names()}")
    return ENGINE_FACTORIES[name](checkpoint, **options)


__all__ = ["ActionChunk", "Engine", "create_engine", "engine_names", "ENGINE_FACTORIES"]
