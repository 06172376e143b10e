"""Shared fixtures: tiny checkpoints in the official format, made once per test session."""
from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.vla.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_chunk_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-k4", seed=1, chunk=4)


@pytest.fixture(scope="session")
def torch_engine(tiny_checkpoint):
    from openvla_ros.engines.torch_engine import TorchEngine

    return TorchEngine(tiny_checkpoint)


@pytest.fixture
def scene_image():
    from openvla_ros.engines.bench import synthetic_scene

    return synthetic_scene(seed=3)


def random_image(seed: int, shape=(180, 240, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


class ManualClock:
    """A thread-safe clock that tests advance explicitly (injected wherever code reads time)."""

    def __init__(self, t: float = 0.0):
        import threading

        self.t = t
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.t

    def advance(self, dt: float) -> float:
        with self.lock:
            self.t += dt
            return self.t


def pytest_collection_modifyitems(config, items):
    """Every test in a test_ros_*.py file starts real rclpy nodes: mark it `ros`, so that
    `-m ros` (the Jazzy run of `make test`) selects them without each file repeating the mark."""
    for item in items:
        if item.path.name.startswith("test_ros_"):
            item.add_marker(pytest.mark.ros)
