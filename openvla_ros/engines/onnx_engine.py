"""`onnx` backend: the graphs of `openvla-ros export onnx` run with onnxruntime and our greedy loop.

Pre- and post-processing are the shared `OpenVLAPipeline` (so actions equal the torch backend's for
equal tokens); the checkpoint directory supplies tokenizer, statistics and the fingerprint the
manifest is checked against. Execution providers: CPU, CUDA or TensorRT (onnxruntime's own).
A forced prefix's tokens are appended to the prefill's input ids (the graph splices the patches
after BOS, so the sequence is `[BOS] + patches + prompt + forced`); the loop decodes the rest.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..vla.checkpoint import Checkpoint
from ..vla.pipeline import OpenVLAPipeline
from .base import ActionChunk, PipelineBackedEngine
from .manifest import check_against_checkpoint, read_manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Execution providers to use: the requested ones (all must be available) or CPU."""
    if not requested:
        return ["CPUExecutionProvider"]
    aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    names = [aliases.get(p.lower(), p) for p in requested]
    missing = [p for p in names if p not in available]
    if missing:
        raise ValueError(f"onnxruntime execution provider(s) {missing} not available here; available: {list(available)}")
    return names


class OnnxEngine(PipelineBackedEngine):
    """`Engine` backend running exported ONNX graphs with onnxruntime."""

    name = "onnx"
    supports_forced_prefix = True

    def __init__(self, checkpoint_dir, onnx_dir, *, providers: Sequence[str] | None = None,
                 threads: int = 0, spin: bool = False, unnorm_key: str | None = None, center_crop: bool = False,
                 rotate_180: bool = False, clock: Callable[[], float] = time.perf_counter):
        import onnxruntime as ort

        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.onnx_dir = Path(onnx_dir)
        self.manifest = read_manifest(self.onnx_dir, "onnx")
        check_against_checkpoint(self.manifest, self.checkpoint, self.onnx_dir)
        missing = sorted({"vision", "prefill", "decode"} - set(self.manifest["graphs"]))
        if missing:
            raise ValueError(f"{self.onnx_dir} lacks the {missing} graph(s); export all three")
        if self.manifest["dtype"] not in NUMPY_DTYPES:
            raise ValueError(f"{self.onnx_dir}: unsupported dtype {self.manifest['dtype']!r}")
        self.dtype = NUMPY_DTYPES[self.manifest["dtype"]]
        self.providers = resolve_providers(providers, ort.get_available_providers())
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = onnxruntime's default), got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            # onnxruntime's idle worker threads busy-wait by default; next to a control loop and
            # other inference that steals the cores they need (measured: torch 10x slower alongside).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.sessions = {name: ort.InferenceSession(str(self.onnx_dir / spec["file"]), sess_options=options,
                                                    providers=self.providers)
                         for name, spec in self.manifest["graphs"].items()}
        self.pipeline = OpenVLAPipeline(self.checkpoint, unnorm_key=unnorm_key, center_crop=center_crop, rotate_180=rotate_180)
        self.max_positions = int(self.manifest["architecture"]["max_position_embeddings"])
        self.spin = bool(spin)
        self._clock = clock

    # Engine protocol -------------------------------------------------------------------------
    def info(self) -> dict:
        return {"engine": self.name, "onnx_dir": str(self.onnx_dir), "providers": self.providers, "spin": self.spin,
                "dtype": self.manifest["dtype"], "opset": self.manifest.get("opset"), **self.pipeline.info()}

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None, forced_prefix: np.ndarray | None = None,
                prefix_soft_bins: int | None = None) -> ActionChunk:
        clock = self._clock
        t0 = clock()
        forced, windows = self.pipeline.prefix_plan(forced_prefix, prefix_soft_bins, unnorm_key=unnorm_key)
        pixel_values, input_ids = self.prepare(image, instruction, forced)
        t1 = clock()
        image_embeds = self.image_embeds(pixel_values)
        t2 = clock()
        tokens, lm_timings = self.decode(input_ids, image_embeds, self.pipeline.free_tokens(forced), windows)
        t3 = clock()
        timings = {"preprocess": (t1 - t0) * 1e3, "vision": (t2 - t1) * 1e3, **lm_timings, "total": (t3 - t0) * 1e3}
        return self.pipeline.to_chunk(tokens, stamp=stamp, unnorm_key=unnorm_key, timings_ms=timings,
                                      forced_tokens=forced)

    # Stages ------------------------------------------------------------------------------------
    def prepare(self, image, instruction, forced_tokens=()) -> tuple[np.ndarray, np.ndarray]:
        """pixel values and input ids [1, T] (the prompt, then `forced_tokens` when given)."""
        input_ids = list(self.pipeline.input_ids(instruction)) + [int(t) for t in forced_tokens]
        pixel_values = self.pipeline.pixel_values(image).numpy().astype(self.dtype, copy=False)
        return pixel_values, np.asarray([input_ids], dtype=np.int64)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.sessions["vision"].run(["image_embeds"], {"pixel_values": pixel_values})[0]

    def prefill(self, input_ids: np.ndarray, image_embeds: np.ndarray, n_tokens: int | None = None):
        """logits [1, V] of the last prompt position and the KV cache; `n_tokens` (default K*D) are
        still to be decoded after it."""
        n = self.pipeline.n_tokens if n_tokens is None else int(n_tokens)
        needed = input_ids.shape[1] + image_embeds.shape[1] + n
        if needed > self.max_positions:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {image_embeds.shape[1]} patches + "
                             f"{n} action tokens exceeds the model's {self.max_positions} positions")
        return self.sessions["prefill"].run(None, {"input_ids": input_ids, "image_embeds": image_embeds})

    def decode(self, input_ids: np.ndarray, image_embeds: np.ndarray, n_tokens: int | None = None,
               windows: list[tuple[int, int]] | None = None) -> tuple[list[int], dict]:
        """Greedy `n_tokens` (default K*D) tokens after the prefill of `input_ids`; token i among ids
        windows[i] = (lo, hi) while there are windows."""
        n = self.pipeline.n_tokens if n_tokens is None else int(n_tokens)
        windows = list(windows or [])

        def greedy(row, i):
            if i >= len(windows):
                return int(np.argmax(row))
            lo, hi = windows[i]
            return lo + int(np.argmax(row[lo:hi + 1]))

        clock = self._clock
        t0 = clock()
        logits, keys, values = self.prefill(input_ids, image_embeds, n)
        token = greedy(logits[0], 0)
        tokens = [token]
        t1 = clock()
        step = self.sessions["decode"]
        for i in range(1, n):
            logits, keys, values = step.run(None, {"input_ids": np.array([[token]], dtype=np.int64),
                                                   "past_keys": keys, "past_values": values})
            token = greedy(logits[0], i)
            tokens.append(token)
        t2 = clock()
        return tokens, {"prefill": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3, "lm": (t2 - t0) * 1e3}


def create_onnx_engine(checkpoint, *, onnx_dir=None, device: str | None = None, dtype: str | None = None,
                       **options) -> OnnxEngine:
    """ENGINE_FACTORIES entry. `device` picks the provider (cpu -> CPU EP, cuda -> CUDA EP); the dtype is
    the export's, so only float32 (the CLI default) or the manifest's own dtype is accepted."""
    if onnx_dir is None:
        raise ValueError("the onnx engine needs --onnx-dir (a directory written by `openvla-ros export onnx`)")
    if "providers" not in options and device not in (None, "cpu"):
        if not str(device).startswith("cuda"):
            raise ValueError(f"unknown device {device!r} for the onnx engine; expected cpu or cuda")
        options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    engine = OnnxEngine(checkpoint, onnx_dir, **options)
    if dtype not in (None, "float32", engine.manifest["dtype"]):
        raise ValueError(f"--dtype {dtype} does not match the ONNX export's dtype {engine.manifest['dtype']!r}; "
                         "export again with --dtype")
    return engine


def add_onnx_options(parser: argparse.ArgumentParser) -> None:
    """Options of `--engine onnx` for predict/eval/serve: --onnx-dir, --onnx-providers, --onnx-threads."""
    parser.add_argument("--onnx-dir", default=None, help="onnx engine: directory written by `openvla-ros export onnx`")
    parser.add_argument("--onnx-providers", nargs="+", default=None,
                        help="onnx engine: execution providers in order (cpu, cuda, tensorrt or full names)")
    parser.add_argument("--onnx-threads", type=int, default=0, help="onnx engine: intra-op threads (0 = default)")
    parser.add_argument("--onnx-spin", action="store_true",
                        help="onnx engine: let idle onnxruntime threads busy-wait (lower latency, steals CPU from others)")


def onnx_options_from_args(args) -> dict:
    options = {"onnx_dir": args.onnx_dir, "threads": args.onnx_threads, "spin": args.onnx_spin}
    if args.onnx_providers:
        options["providers"] = args.onnx_providers
    return options
