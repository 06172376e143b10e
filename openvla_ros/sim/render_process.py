"""Camera frames of a `PandaScene` rendered in a child process.

pybullet's CPU renderer holds the GIL for the whole frame (25-90 ms for 224x224 here, measured
with a Python thread that could not run meanwhile). In one process with the control nodes that
stalls their 100 Hz timers for most of every camera period. The child process owns a second,
render-only copy of the scene: the parent sends the pose state (`PandaScene.pose_state()`, joint
positions and cube poses), the child places its copy the same way and renders; the parent waits
for the answer on a pipe with the GIL released, or keeps simulating and collects it later.

Protocol on the child's stdin/stdout: length-prefixed pickles. The child moves its own stdout to
stderr first, so pybullet's banner cannot corrupt the stream.

    python -m openvla_ros.sim.render_process   # started by RenderProcess, not by hand
"""
from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys

import numpy as np

_HEADER = struct.Struct("<Q")
START_TIMEOUT_S = 60.0


def _write(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("render process closed its pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(fd: int):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, size))


class RenderProcess:
    """A render-only copy of the scene in a child process. Not thread-safe: one owner thread.

    `scene_options`: keyword arguments of `PandaScene` that change what the camera sees
    (camera, cube_size, urdf_path).
    """

    def __init__(self, scene_options: dict, start_timeout: float = START_TIMEOUT_S):
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      bufsize=0)
        self._out, self._in = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        self.in_flight = 0
        try:
            _write(self._out, ("init", scene_options))
            if not select.select([self._in], [], [], start_timeout)[0]:
                raise ValueError(f"render process did not start within {start_timeout} s")
            reply = _read(self._in)
        except (OSError, EOFError) as exc:
            self.close()
            raise ValueError(f"render process failed to start: {exc}") from exc
        if reply[0] != "ready":
            self.close()
            raise ValueError(f"render process failed to start: {reply[1]}")

    def submit(self, pose_state: dict) -> None:
        """Start rendering a frame of this pose state (collect it with `result()`)."""
        _write(self._out, ("render", pose_state))
        self.in_flight += 1

    def ready(self) -> bool:
        """A submitted frame can be collected without waiting."""
        return self.in_flight > 0 and bool(select.select([self._in], [], [], 0)[0])

    def result(self) -> np.ndarray:
        """The oldest submitted frame (waits for it, with the GIL released)."""
        if self.in_flight == 0:
            raise ValueError("no frame was submitted")
        kind, payload = _read(self._in)
        self.in_flight -= 1
        if kind != "image":
            raise ValueError(f"render process: {payload}")
        return payload

    def render(self, pose_state: dict) -> np.ndarray:
        self.submit(pose_state)
        return self.result()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                # A frame still in flight blocks the child on its pipe until it is read.
                while self.in_flight and select.select([self._in], [], [], 5.0)[0]:
                    try:
                        self.result()
                    except ValueError:
                        pass
                _write(self._out, ("quit", None))
                self._proc.wait(timeout=5.0)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            pipe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve() -> int:
    out = os.dup(1)  # the protocol channel; fd 1 then goes to stderr (pybullet prints a banner)
    os.dup2(2, 1)
    inp = 0
    from .scene import PandaScene

    scene = None
    while True:
        try:
            kind, payload = _read(inp)
        except EOFError:
            break
        if kind == "quit":
            break
        try:
            if kind == "init":
                scene = PandaScene(seed=0, **payload)
                _write(out, ("ready", None))
            elif kind == "render":
                scene.set_pose_state(payload)
                _write(out, ("image", scene.render()))
            else:
                _write(out, ("error", f"unknown request {kind!r}"))
        except Exception as exc:  # reported to the parent, which raises it there
            _write(out, ("error", f"{type(exc).__name__}: {exc}"))
    if scene is not None:
        scene.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve())
