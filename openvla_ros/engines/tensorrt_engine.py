"""`tensorrt` backend and `openvla-ros build-trt`: TensorRT plans built from the ONNX export.

`build_trt(onnx_dir, out_dir, precision=...)` parses vision/prefill/decode ONNX graphs, gives
the dynamic axes one optimisation profile each (`shape_profiles`), serialises one plan per graph
and writes a manifest (checkpoint fingerprint from the ONNX manifest, precision, profiles, TensorRT
version, GPU). `TensorRTEngine` runs them with the TensorRT Python API: device buffers are torch
CUDA tensors laid out by `buffer_plan` (two ping-pong KV-cache buffers of the maximum length:
decode step k reads the cache of length S from one and writes S+1 into the other), one CUDA
stream, `execute_async_v3`, argmax on the device and one host copy of the tokens at the end.

Everything that does not need a GPU (precision rules, Q/DQ detection, profiles, buffer layout,
manifests) is a plain function tested on CPU; without CUDA or the tensorrt package, building and
construction raise ValueError saying what is missing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .manifest import build_manifest, check_against_checkpoint, read_manifest, write_manifest
from .base import PipelineBackedEngine, gpu_backend_unavailable_reason

# precision -> (TensorRT builder flags, minimum CUDA compute capability, needs Q/DQ nodes in the ONNX)
TRT_PRECISIONS = {
    "fp32": ((), (7, 0), False),
    "fp16": (("FP16",), (7, 0), False),
    "bf16": (("BF16",), (8, 0), False),
    "fp8": (("FP8", "FP16"), (8, 9), True),
    "int8": (("INT8", "FP16"), (7, 5), True),
}
DEFAULT_MAX_PROMPT_TOKENS = 128  # text tokens incl. BOS; OpenVLA prompts are ~20-40
DEFAULT_OPT_PROMPT_TOKENS = 32
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
PLAN_SUFFIX = ".plan"


def tensorrt_unavailable_reason(*, cuda_available: bool | None = None, trt_installed: bool | None = None) -> str | None:
    """Why TensorRT cannot be used here (None when it can)."""
    return gpu_backend_unavailable_reason("TensorRT needs", "the tensorrt Python package (pip install tensorrt)",
                                          "--engine onnx (CPU)", cuda_available=cuda_available,
                                          package_installed=trt_installed, module="tensorrt")


def check_precision(precision: str, compute_capability: tuple[int, int], qdq_nodes: int) -> tuple[str, ...]:
    """Builder flags for `precision` on a GPU of `compute_capability`; ValueError when it cannot work."""
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(TRT_PRECISIONS)}")
    flags, minimum, needs_qdq = TRT_PRECISIONS[precision]
    if tuple(compute_capability) < minimum:
        raise ValueError(f"precision {precision} needs a GPU of compute capability >= {minimum[0]}.{minimum[1]}, "
                         f"this one is {compute_capability[0]}.{compute_capability[1]}")
    if needs_qdq and qdq_nodes == 0:
        raise ValueError(f"precision {precision} needs an ONNX export with QuantizeLinear/DequantizeLinear nodes "
                         "(explicit quantisation, e.g. from NVIDIA ModelOpt); this export has none. "
                         "Use fp16 or bf16, or quantise the ONNX graphs first")
    return flags


def count_qdq_nodes(onnx_path) -> int:
    """QuantizeLinear/DequantizeLinear nodes in a graph (explicit quantisation present or not)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def shape_profiles(onnx_manifest: dict, n_tokens: int, *, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                   opt_prompt_tokens: int = DEFAULT_OPT_PROMPT_TOKENS) -> dict:
    """{graph: {input: (min, opt, max) shapes}} covering prompts of 2..max_prompt_tokens text tokens
    followed by `n_tokens` decoded tokens (K*D)."""
    arch = onnx_manifest["architecture"]
    L, KV, D = arch["num_hidden_layers"], arch["num_key_value_heads"], arch["head_dim"]
    P = int(onnx_manifest["num_patches"])
    max_pos = int(arch["max_position_embeddings"])
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if not 2 <= opt_prompt_tokens <= max_prompt_tokens:
        raise ValueError(f"need 2 <= opt_prompt_tokens ({opt_prompt_tokens}) <= max_prompt_tokens ({max_prompt_tokens})")
    longest = max_prompt_tokens + P + n_tokens - 1
    if longest > max_pos:
        raise ValueError(f"max_prompt_tokens {max_prompt_tokens} + {P} patches + {n_tokens} tokens exceed the "
                         f"model's {max_pos} positions")
    seq_lo, seq_hi = onnx_manifest["dynamic_axes"]["seq"]
    if not (seq_lo <= 2 and max_prompt_tokens <= seq_hi):
        raise ValueError(f"prompt range 2..{max_prompt_tokens} is outside the export's seq axis {seq_lo}..{seq_hi}")

    def cache(length):
        return (L, 1, KV, length, D)

    # The decode graph sees caches from the shortest prompt's length to the longest before its last step.
    past = (cache(2 + P), cache(opt_prompt_tokens + P + max(n_tokens // 2, 1)), cache(max_prompt_tokens + P + max(n_tokens - 2, 0)))
    if n_tokens == 1:
        past = (cache(2 + P), cache(2 + P), cache(2 + P))  # never run; TensorRT still needs a valid profile
    return {
        "vision": {},
        "prefill": {"input_ids": ((1, 2), (1, opt_prompt_tokens), (1, max_prompt_tokens))},
        "decode": {"past_keys": past, "past_values": past},
    }


def buffer_plan(onnx_manifest: dict, profiles: dict) -> dict:
    """Device buffers for one sequence at the profiles' maximum sizes: {name: {shape, dtype, bytes}}.

    kv_keys_a/b and kv_values_a/b are the ping-pong caches: each holds the longest cache any graph
    writes (prefill's present at the longest prompt, or a decode step's present at the longest past).
    """
    arch = onnx_manifest["architecture"]
    dtype = onnx_manifest["dtype"]
    L, KV, D, H, V = (arch["num_hidden_layers"], arch["num_key_value_heads"], arch["head_dim"],
                      arch["hidden_size"], arch["vocab_size"])
    P = int(onnx_manifest["num_patches"])
    max_prompt = profiles["prefill"]["input_ids"][2][1]
    longest_past = profiles["decode"]["past_keys"][2][3]
    longest = max(max_prompt + P, longest_past + 1)
    channels = onnx_manifest["graphs"]["vision"]["inputs"]["pixel_values"][1]
    shapes = {
        "pixel_values": ((1, channels, 224, 224), dtype),
        "image_embeds": ((1, P, H), dtype),
        "prompt_ids": ((1, max_prompt), "int64"),
        "step_ids": ((1, 1), "int64"),
        "logits": ((1, V), dtype),
        "kv_keys_a": ((L, 1, KV, longest, D), dtype),
        "kv_values_a": ((L, 1, KV, longest, D), dtype),
        "kv_keys_b": ((L, 1, KV, longest, D), dtype),
        "kv_values_b": ((L, 1, KV, longest, D), dtype),
    }
    return {name: {"shape": list(shape), "dtype": dt, "bytes": int(np.prod(shape)) * ITEMSIZE[dt]}
            for name, (shape, dt) in shapes.items()}


def trt_manifest(onnx_manifest: dict, checkpoint, *, precision: str, profiles: dict, plans: dict, gpu: dict) -> dict:
    graphs = {name: {"file": plans[name], "onnx": onnx_manifest["graphs"][name]["file"],
                     "profile": {k: [list(s) for s in v] for k, v in profiles[name].items()}} for name in plans}
    return build_manifest("tensorrt", checkpoint, dtype=onnx_manifest["dtype"], graphs=graphs,
                          extra={"precision": precision, "num_patches": onnx_manifest["num_patches"],
                                 "onnx_fingerprint": onnx_manifest["checkpoint"]["fingerprint"],
                                 "onnx_opset": onnx_manifest.get("opset"), "gpu": gpu})


def build_trt(checkpoint_dir, onnx_dir, out_dir, *, precision: str = "fp16",
              max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, opt_prompt_tokens: int = DEFAULT_OPT_PROMPT_TOKENS,
              workspace_gib: float = 8.0) -> Path:
    """Build one TensorRT plan per ONNX graph; returns the manifest path."""
    from ..vla.checkpoint import Checkpoint

    onnx_dir, out = Path(onnx_dir), Path(out_dir)
    checkpoint = Checkpoint.open(checkpoint_dir)
    onnx_manifest = read_manifest(onnx_dir, "onnx")
    check_against_checkpoint(onnx_manifest, checkpoint, onnx_dir)
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(TRT_PRECISIONS)}")
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ValueError(reason)
    import tensorrt as trt
    import torch

    n_tokens = checkpoint.config.chunk_len * checkpoint.action_stats(None).dim
    profiles = shape_profiles(onnx_manifest, n_tokens, max_prompt_tokens=max_prompt_tokens,
                              opt_prompt_tokens=opt_prompt_tokens)
    capability = torch.cuda.get_device_capability()
    qdq = sum(count_qdq_nodes(onnx_dir / g["file"]) for g in onnx_manifest["graphs"].values())
    flags = check_precision(precision, capability, qdq)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    plans = {}
    started = time.perf_counter()
    for name, spec in onnx_manifest["graphs"].items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_dir / spec["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT cannot parse {onnx_dir / spec['file']}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if profiles[name]:
            profile = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in profiles[name].items():
                profile.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValueError(f"TensorRT failed to build {name} at precision {precision} (see the log above)")
        plans[name] = f"{name}{PLAN_SUFFIX}"
        (out / plans[name]).write_bytes(bytes(serialized))
    gpu = {"name": torch.cuda.get_device_name(), "compute_capability": list(capability), "tensorrt": trt.__version__,
           "build_seconds": round(time.perf_counter() - started, 1)}
    return write_manifest(out, trt_manifest(onnx_manifest, checkpoint, precision=precision, profiles=profiles,
                                            plans=plans, gpu=gpu))


class TensorRTEngine(PipelineBackedEngine):
    """`Engine` backend running TensorRT plans on one CUDA stream with device-resident KV caches."""

    name = "tensorrt"
    # Forced tokens extend the prefill's input ids (within the plans' prompt profile); the decode
    # steps then see the same cache lengths as without forcing, which the decode profile covers.
    supports_forced_prefix = True

    def __init__(self, checkpoint_dir, trt_dir, *, unnorm_key: str | None = None, center_crop: bool = False,
                 rotate_180: bool = False, clock: Callable[[], float] = time.perf_counter):
        from ..vla.checkpoint import Checkpoint
        from ..vla.pipeline import OpenVLAPipeline

        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.trt_dir = Path(trt_dir)
        self.manifest = read_manifest(self.trt_dir, "tensorrt")
        check_against_checkpoint(self.manifest, self.checkpoint, self.trt_dir)
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise ValueError(reason)
        import tensorrt as trt
        import torch

        self.pipeline = OpenVLAPipeline(self.checkpoint, unnorm_key=unnorm_key, center_crop=center_crop, rotate_180=rotate_180)
        self._clock = clock
        self._torch = torch
        self.device = torch.device("cuda")
        torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name, spec in self.manifest["graphs"].items():
            engine = runtime.deserialize_cuda_engine((self.trt_dir / spec["file"]).read_bytes())
            if engine is None:
                raise ValueError(f"cannot load TensorRT plan {self.trt_dir / spec['file']} (built with another "
                                 f"TensorRT version or GPU? manifest says {self.manifest.get('gpu')})")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        profiles = {name: {k: [tuple(s) for s in v] for k, v in spec["profile"].items()}
                    for name, spec in self.manifest["graphs"].items()}
        self.plan = buffer_plan(self.manifest, profiles)
        self.max_prompt_tokens = profiles["prefill"]["input_ids"][2][1]
        self.buffers = {name: torch.empty(b["shape"], dtype=torch_dtypes[b["dtype"]], device=self.device)
                        for name, b in self.plan.items()}
        self.stream = torch.cuda.Stream()

    def info(self) -> dict:
        return {"engine": self.name, "trt_dir": str(self.trt_dir), "precision": self.manifest["precision"],
                "gpu": self.manifest.get("gpu"), **self.pipeline.info()}

    def _view(self, buffer: str, shape) -> "torch.Tensor":
        """A contiguous tensor of `shape` at the start of a (larger) buffer."""
        count = int(np.prod(shape))
        return self.buffers[buffer].view(-1)[:count].view(*shape)

    def _run(self, graph: str, tensors: dict) -> None:
        context = self.contexts[graph]
        engine = self.engines[graph]
        import tensorrt as trt

        for name, tensor in tensors.items():
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {graph} failed")

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None, forced_prefix: np.ndarray | None = None,
                prefix_soft_bins: int | None = None):
        torch = self._torch
        clock = self._clock
        t0 = clock()
        forced, windows = self.pipeline.prefix_plan(forced_prefix, prefix_soft_bins, unnorm_key=unnorm_key)
        windows = windows or []

        def greedy(logits, i):
            if i >= len(windows):
                return logits.argmax()
            lo, hi = windows[i]
            return logits[lo:hi + 1].argmax() + lo

        ids = list(self.pipeline.input_ids(instruction)) + [int(t) for t in forced]
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"instruction + {forced.size} forced tokens give {len(ids)} prompt tokens; the TensorRT "
                             f"plans were built for at most {self.max_prompt_tokens} (build-trt --max-prompt-tokens)")
        pixels = self.pipeline.pixel_values(image)
        L, _, KV, _, D = self.plan["kv_keys_a"]["shape"]
        P = int(self.manifest["num_patches"])
        n = self.pipeline.free_tokens(forced)
        with torch.cuda.stream(self.stream):
            self.buffers["pixel_values"].copy_(pixels, non_blocking=False)
            prompt = self._view("prompt_ids", (1, len(ids)))
            prompt.copy_(torch.tensor([ids], dtype=torch.int64))
            t1 = clock()
            self._run("vision", {"pixel_values": self.buffers["pixel_values"], "image_embeds": self.buffers["image_embeds"]})
            length = len(ids) + P
            side = "a"
            self._run("prefill", {"input_ids": prompt, "image_embeds": self.buffers["image_embeds"],
                                  "logits": self.buffers["logits"],
                                  "present_keys": self._view(f"kv_keys_{side}", (L, 1, KV, length, D)),
                                  "present_values": self._view(f"kv_values_{side}", (L, 1, KV, length, D))})
            tokens = torch.empty(n, dtype=torch.int64, device=self.device)
            tokens[0] = greedy(self.buffers["logits"][0], 0)
            for k in range(1, n):
                self.buffers["step_ids"].view(-1).copy_(tokens[k - 1:k])
                other = "b" if side == "a" else "a"
                self._run("decode", {"input_ids": self.buffers["step_ids"],
                                     "past_keys": self._view(f"kv_keys_{side}", (L, 1, KV, length, D)),
                                     "past_values": self._view(f"kv_values_{side}", (L, 1, KV, length, D)),
                                     "logits": self.buffers["logits"],
                                     "present_keys": self._view(f"kv_keys_{other}", (L, 1, KV, length + 1, D)),
                                     "present_values": self._view(f"kv_values_{other}", (L, 1, KV, length + 1, D))})
                tokens[k] = greedy(self.buffers["logits"][0], k)
                side, length = other, length + 1
            result = tokens.cpu().tolist()  # the one device->host copy (synchronises the stream)
        t2 = clock()
        timings = {"preprocess": (t1 - t0) * 1e3, "lm": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        return self.pipeline.to_chunk(result, stamp=stamp, unnorm_key=unnorm_key, timings_ms=timings,
                                      forced_tokens=forced)


def create_tensorrt_engine(checkpoint, *, trt_dir=None, device: str | None = None, dtype: str | None = None,
                           **options) -> TensorRTEngine:
    """ENGINE_FACTORIES entry: precision is the plans' (build-trt --precision); device must be CUDA."""
    if trt_dir is None:
        raise ValueError("the tensorrt engine needs --trt-dir (a directory written by `openvla-ros build-trt`)")
    return TensorRTEngine(checkpoint, trt_dir, **options)


def add_build_trt_parser(subparsers) -> argparse.ArgumentParser:
    """`openvla-ros build-trt --checkpoint DIR --onnx engines/NAME --out engines/NAME-trt --precision fp16|bf16|fp8|int8`."""
    p = subparsers.add_parser("build-trt", help="build TensorRT plans from an ONNX export (needs CUDA + tensorrt)")
    p.add_argument("--checkpoint", required=True, help="checkpoint the ONNX export was made from")
    p.add_argument("--onnx", required=True, help="directory written by `openvla-ros export onnx`")
    p.add_argument("--out", default=None, help="output directory (default: <onnx>-trt-<precision>)")
    p.add_argument("--precision", default="fp16", choices=sorted(TRT_PRECISIONS))
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    p.add_argument("--opt-prompt-tokens", type=int, default=DEFAULT_OPT_PROMPT_TOKENS)
    p.add_argument("--workspace-gib", type=float, default=8.0)
    p.set_defaults(func=cmd_build_trt)
    return p


def cmd_build_trt(args) -> int:
    out = args.out or f"{str(args.onnx).rstrip('/')}-trt-{args.precision}"
    path = build_trt(args.checkpoint, args.onnx, out, precision=args.precision, max_prompt_tokens=args.max_prompt_tokens,
                     opt_prompt_tokens=args.opt_prompt_tokens, workspace_gib=args.workspace_gib)
    print(json.dumps({"out": str(path.parent), "manifest": str(path), "precision": args.precision}))
    return 0


def add_tensorrt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trt-dir", default=None, help="tensorrt engine: directory written by `openvla-ros build-trt`")
