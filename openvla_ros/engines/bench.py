"""`openvla-ros bench engine`: this project's decode loop against the plain Hugging Face path, and
every engine backend side by side.

`bench_engine`: same process, same weights, same inputs: per-stage medians for both, whether the
tokens are identical, and speedups (reference time / ours) for the language-model part and the whole action.
`bench_backends` (`--engine all|NAME...`): one row per backend on the same images: latency p50/p95,
tokens/s, memory, and whether its tokens equal a float32 torch engine's.
`bench_forced_prefix` (`--forced-steps P...`): the cost of decoding with P committed actions forced
(their P*D tokens join the prefill, P*D decode steps fewer) against plain decoding, as ratios.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..eval.metrics import latency_stats
from .torch_engine import TorchEngine


def synthetic_scene(seed: int = 0, height: int = 256, width: int = 320) -> np.ndarray:
    """A deterministic RGB test image: grey table, a red and a blue block, mild noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, dtype=np.int16)
    image += rng.integers(-12, 13, size=image.shape, dtype=np.int16)
    for colour in ((200, 30, 30), (30, 30, 200)):
        y, x = int(rng.integers(0, height - 40)), int(rng.integers(0, width - 40))
        image[y:y + 40, x:x + 40] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def bench_engine(engine: TorchEngine, image: np.ndarray, instruction: str, *, runs: int = 20,
                 warmup: int = 3, predict_action: bool = True) -> dict:
    """Ours against two references on the same weights and inputs, interleaved per run: the language
    model's `generate()` on our embeddings, and (`predict_action`) a faithful re-run of OpenVLA's own
    predict_action (`reference_predict`: every vision block, full-sequence logits, growing cache/mask)."""
    from .reference_predict import reference_predict_tokens

    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    clock = time.perf_counter
    ours: dict[str, list[float]] = {}
    ref_lm, ref_total, pa_total = [], [], []
    identical = identical_pa = True
    ours_tokens = ref_tokens = pa_tokens = None
    for i in range(warmup + runs):
        # Interleave the paths so machine load affects all alike.
        chunk = engine.predict(image, instruction)
        t0 = clock()
        with torch.inference_mode():
            pixel_values, input_ids = engine.prepare(image, instruction)
            embeds = engine.multimodal_embeddings(pixel_values, input_ids)
            tokens, lm_ms = engine.reference_tokens(embeds)
        total_ms = (clock() - t0) * 1e3
        ours_tokens, ref_tokens = chunk.tokens.tolist(), tokens
        identical &= ours_tokens == ref_tokens
        if predict_action:
            t0 = clock()
            pixel_values, input_ids = engine.prepare(image, instruction)
            pa_tokens = reference_predict_tokens(engine.model, pixel_values, input_ids, engine.pipeline.n_tokens)
            engine._sync()
            pa_ms = (clock() - t0) * 1e3
            identical_pa &= ours_tokens == pa_tokens
        if i < warmup:
            continue
        for stage, ms in chunk.timings_ms.items():
            ours.setdefault(stage, []).append(ms)
        ref_lm.append(lm_ms)
        ref_total.append(total_ms)
        if predict_action:
            pa_total.append(pa_ms)
    ours_ms = {stage: statistics.median(values) for stage, values in ours.items()}
    ref_ms = {"lm": statistics.median(ref_lm), "total": statistics.median(ref_total)}
    result = {
        "benchmark": "engine",
        "engine": engine.info(),
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "n_tokens": engine.pipeline.n_tokens,
        "ours_ms": ours_ms,
        "reference_ms": ref_ms,
        "reference": "LlamaForCausalLM.generate(inputs_embeds, greedy, K*D new tokens)",
        "tokens_identical": bool(identical),
        "tokens": ours_tokens,
        "reference_tokens": ref_tokens,
        "speedup_lm": ref_ms["lm"] / ours_ms["lm"],
        "speedup_total": ref_ms["total"] / ours_ms["total"],
    }
    if predict_action:
        pa_ms = statistics.median(pa_total)
        result.update({"predict_action_ms": pa_ms, "tokens_identical_to_predict_action": bool(identical_pa),
                       "predict_action_reference": "re-run of OpenVLA's predict_action (engines/reference_predict.py)",
                       "speedup_vs_predict_action": pa_ms / ours_ms["total"]})
    return result


def bench_forced_prefix(engine, inputs, steps=(0, 1, 2), *, runs: int = 20, warmup: int = 3,
                        clock=time.perf_counter) -> dict:
    """Per forced-step count P: median wall-clock and per-stage times of `engine.predict` with P
    committed actions forced, and their ratios to P = 0 (always measured).

    The committed actions of input i are the first P actions the engine chose for input i-1 (a
    replan after the scene moved on). Runs are interleaved over P so machine load hits all alike.
    """
    from .base import supports_forced_prefix

    if not supports_forced_prefix(engine):
        raise ValueError(f"the {getattr(engine, 'name', '?')} engine does not support a forced prefix")
    steps = sorted({0, *(int(p) for p in steps)})
    if steps[0] < 0 or steps[-1] >= engine.chunk_len:
        raise ValueError(f"forced steps must lie in 0..{engine.chunk_len - 1} (P < K = {engine.chunk_len}), got {steps}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if not inputs:
        raise ValueError("need at least one (image, instruction) input")
    plans = [engine.predict(image, text).actions for image, text in inputs]
    wall: dict[int, list[float]] = {p: [] for p in steps}
    stages: dict[int, dict[str, list[float]]] = {p: {} for p in steps}
    for r in range(warmup + runs):
        i = r % len(inputs)
        image, instruction = inputs[i]
        for p in steps:
            t0 = clock()
            chunk = engine.predict(image, instruction, forced_prefix=plans[i - 1][:p])
            elapsed = (clock() - t0) * 1e3
            if r < warmup:
                continue
            wall[p].append(elapsed)
            for stage, ms in chunk.timings_ms.items():
                stages[p].setdefault(stage, []).append(ms)
    n_dims = len(engine.dim_names)
    rows = []
    for p in steps:
        medians = {stage: statistics.median(values) for stage, values in stages[p].items()}
        rows.append({"forced_steps": p, "forced_tokens": p * n_dims, "decoded_tokens": (engine.chunk_len - p) * n_dims,
                     "latency_ms_p50": statistics.median(wall[p]), "stages_ms_p50": medians})
    base = rows[0]
    for row in rows:
        row["latency_ratio_to_plain"] = row["latency_ms_p50"] / base["latency_ms_p50"]
        lm, lm0 = row["stages_ms_p50"].get("lm"), base["stages_ms_p50"].get("lm")
        row["lm_ratio_to_plain"] = lm / lm0 if lm is not None and lm0 else None
    return {"benchmark": "forced_prefix", "engine": engine.info(), "chunk_len": engine.chunk_len, "runs": runs,
            "warmup": warmup, "images": len(inputs), "torch_threads": torch.get_num_threads(), "rows": rows,
            "notes": ["latency: wall-clock around Engine.predict; lm: prefill + decode of the language model",
                      "ratios: p50 with P forced steps / p50 of plain decoding (P = 0) on the same inputs"]}


def format_forced_prefix_table(result: dict) -> str:
    """The rows of `bench_forced_prefix` as an aligned text table."""
    header = ["P", "forced tok", "decoded tok", "p50 ms", "prefill ms", "decode ms", "x plain", "lm x plain"]
    lines = [[str(r["forced_steps"]), str(r["forced_tokens"]), str(r["decoded_tokens"]), f"{r['latency_ms_p50']:.2f}",
              _fmt(r["stages_ms_p50"].get("prefill"), ".2f"), _fmt(r["stages_ms_p50"].get("decode"), ".2f"),
              f"{r['latency_ratio_to_plain']:.3f}", _fmt(r["lm_ratio_to_plain"], ".3f")] for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header] + lines]
    out.append(f"engine {result['engine'].get('engine')}, K = {result['chunk_len']}, {result['runs']} runs "
               f"(+{result['warmup']} warmup) over {result['images']} image(s)")
    out.extend("note: " + note for note in result["notes"])
    return "\n".join(out)


# Every backend on the same inputs (`bench engine --engine all|NAME...`) ----------------------------

BENCH_NOTES = [
    "latency: wall-clock around Engine.predict per action chunk (remote includes HTTP to an in-process server); "
    "timed runs are interleaved across backends (run r: every backend on image r mod N) so machine load hits all alike",
    "tokens_per_s: tokens per chunk / p50 latency",
    "rss_after_load_mb: this process's resident set right after the row's engine was loaded; engines are "
    "benched in one process, so rss_increase_over_torch_mb (vs the torch row) is the row's own cost only roughly",
    "onnx/tensorrt exported or built in this process (no --onnx-dir/--trt-dir) add the exporter's memory to their RSS",
    "rss_torch_load_mb (torch row): RSS growth while loading the torch engine",
    "peak_rss_mb: ru_maxrss, process-wide peak at the end (all backends loaded at once for the interleaved runs)",
    "gpu_peak_mb: torch.cuda.max_memory_allocated over the row's load and untimed calls, including the torch engine kept for reference",
    "tokens_identical_to_torch_fp32: tokens equal to a float32 TorchEngine on every bench image and every timed call",
    "token_agreement / mean_bin_distance / action_l2 / normalised_l2: against the float32 TorchEngine over every "
    "(image, instruction) input: share of identical action tokens, mean |token difference| in bins, mean L2 "
    "of the chunk's action difference in dataset units and in [-1, 1]",
]


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children), in MB."""
    import resource
    import sys

    value = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


def bench_inputs(n_images: int, instruction, image: np.ndarray | None = None) -> list[tuple[np.ndarray, str]]:
    """The (image, instruction) pairs every backend sees: the given image, else `n_images` synthetic
    scenes, each with every instruction (`instruction` is one string or several)."""
    instructions = [instruction] if isinstance(instruction, str) else list(instruction)
    if not instructions:
        raise ValueError("at least one instruction is needed")
    if image is not None:
        return [(image, text) for text in instructions]
    if n_images < 1:
        raise ValueError(f"images must be >= 1, got {n_images}")
    return [(synthetic_scene(seed=seed), text) for seed in range(n_images) for text in instructions]


def agreement(chunks, reference_chunks) -> dict:
    """How far a backend's answers are from the float32 reference's on the same inputs.

    token_agreement: share of action tokens identical; mean_bin_distance: mean |token - reference
    token| (one token id is one action bin); action_l2: mean over inputs of the L2 norm of the
    un-normalised action difference (whole chunk); normalised_l2: the same on the [-1, 1] values.
    """
    tokens = np.concatenate([np.ravel(c.tokens) for c in chunks]).astype(np.int64)
    reference = np.concatenate([np.ravel(c.tokens) for c in reference_chunks]).astype(np.int64)
    if tokens.shape != reference.shape:
        raise ValueError(f"{tokens.size} tokens against {reference.size} reference tokens")
    l2 = [float(np.linalg.norm(c.actions - r.actions)) for c, r in zip(chunks, reference_chunks, strict=True)]
    normalised = [float(np.linalg.norm(c.normalised - r.normalised)) for c, r in zip(chunks, reference_chunks)
                  if c.normalised is not None and r.normalised is not None]
    return {"token_agreement": float(np.mean(tokens == reference)),
            "mean_bin_distance": float(np.mean(np.abs(tokens - reference))),
            "action_l2": float(np.mean(l2)),
            "normalised_l2": float(np.mean(normalised)) if normalised else None}


def _fmt(value, spec: str) -> str:
    """A table cell: "-" for a figure that does not exist (e.g. the ratio to torch when torch was not run)."""
    return "-" if value is None else format(value, spec)


def _tokens(chunk) -> list[int] | None:
    return None if chunk.tokens is None else [int(t) for t in np.ravel(chunk.tokens)]


def check_and_warm(engine, inputs, *, warmup: int, reference_tokens: list[list[int]],
                   reference_chunks: list | None = None) -> dict:
    """Untimed: every input once (tokens against the reference), then `warmup` more calls.

    With the reference's chunks, also the `agreement` figures (when the backend returns tokens)."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    identical, n_tokens, chunks = True, None, []
    for (image, instruction), reference in zip(inputs, reference_tokens, strict=True):
        chunk = engine.predict(image, instruction)
        chunks.append(chunk)
        tokens = _tokens(chunk)
        identical &= tokens == reference
        n_tokens = len(tokens) if tokens is not None else n_tokens
    for i in range(warmup):
        engine.predict(*inputs[i % len(inputs)])
    result = {"tokens_identical": bool(identical), "tokens_per_action": n_tokens}
    if reference_chunks is not None:
        if all(c.tokens is not None for c in chunks):
            result.update(agreement(chunks, reference_chunks))
        else:
            result.update(dict.fromkeys(("token_agreement", "mean_bin_distance", "action_l2", "normalised_l2")))
    return result


def interleaved_latencies(engines: dict, inputs, *, runs: int, reference_tokens: list[list[int]],
                          clock=time.perf_counter) -> dict:
    """Timed: run r calls every engine in turn on input r % N, so machine load hits all rows alike.

    Returns per engine name: latency p50/p95 (ms), sample count, and whether every timed call's
    tokens equalled the reference too.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    latencies = {name: [] for name in engines}
    identical = dict.fromkeys(engines, True)
    for r in range(runs):
        image, instruction = inputs[r % len(inputs)]
        for name, engine in engines.items():
            t0 = clock()
            chunk = engine.predict(image, instruction)
            latencies[name].append((clock() - t0) * 1e3)
            identical[name] &= _tokens(chunk) == reference_tokens[r % len(inputs)]
    stats = {name: latency_stats(values) for name, values in latencies.items()}
    return {name: {"latency_ms_p50": stats[name]["p50"], "latency_ms_p95": stats[name]["p95"],
                   "samples": len(latencies[name]), "tokens_identical": bool(identical[name])}
            for name in latencies}


def _unavailable(name: str, reason: str) -> dict:
    return {"engine": name, "available": False, "reason": reason}


def bench_backends(checkpoint, engines, *, inputs, runs: int = 20, warmup: int = 3, device: str = "cpu",
                   dtype: str = "float32", unnorm_key: str | None = None, onnx_options: dict | None = None,
                   trt_dir=None) -> dict:
    """One row per backend name in `engines` ("all" = every registered one): the same inputs for each.

    Backends that cannot run here get `available: false` and the reason. onnx without `onnx_dir` is
    exported to a temporary directory; remote is benched against an in-process server on a free
    loopback port wrapping the torch engine; tensorrt without `trt_dir` is built from the ONNX export.
    """
    import contextlib
    import tempfile
    import threading

    from . import create_engine, engine_names
    from .torch_engine import TorchEngine

    names = engine_names() if "all" in engines else list(dict.fromkeys(engines))
    unknown = [n for n in names if n not in engine_names()]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; available: {engine_names()} or all")
    # torch first: it is the speed reference and (fp32) the token reference, and serves remote.
    names = ["torch"] + [n for n in names if n != "torch"] if "torch" in names else names
    cuda = torch.cuda.is_available()
    common = {"device": device, "dtype": dtype, "unnorm_key": unnorm_key}
    onnx_options = dict(onnx_options or {})

    def gpu_reset():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    rows = []
    with contextlib.ExitStack() as stack:
        gpu_reset()
        rss_before = current_rss_mb()
        torch_engine = TorchEngine(checkpoint, **common)
        torch_rss = current_rss_mb()
        if torch_engine.dtype_name == "float32":
            reference_engine = torch_engine
        else:
            reference_engine = TorchEngine(checkpoint, device=device, dtype="float32", unnorm_key=unnorm_key)
        reference_chunks = [reference_engine.predict(image, text) for image, text in inputs]
        reference = [_tokens(chunk) for chunk in reference_chunks]
        del reference_engine

        def temp_dir(prefix):
            return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))

        def onnx_dir():
            if onnx_options.get("onnx_dir") is None:
                from .onnx_export import export_onnx

                onnx_options["onnx_dir"] = temp_dir("bench-onnx-") / "export"
                export_onnx(checkpoint, onnx_options["onnx_dir"])
            return onnx_options["onnx_dir"]

        def load(name):
            """The engine for `name`, or a string saying why it cannot run here."""
            if name == "torch":
                return torch_engine
            if name in ("bnb4", "bnb8"):
                from .bnb_engine import bnb_unavailable_reason

                reason = bnb_unavailable_reason(device)
                if reason is not None:
                    return reason
                return create_engine(name, checkpoint, **common)
            if name == "tensorrt":
                from .tensorrt_engine import build_trt, tensorrt_unavailable_reason

                reason = tensorrt_unavailable_reason()
                if reason is not None:
                    return reason
                directory = trt_dir
                if directory is None:
                    directory = temp_dir("bench-trt-") / "plans"
                    build_trt(checkpoint, onnx_dir(), directory)
                return create_engine(name, checkpoint, trt_dir=directory, unnorm_key=unnorm_key)
            if name == "onnx":
                onnx_dir()
                return create_engine(name, checkpoint, **{**common, **onnx_options})
            if name == "remote":
                from .server import make_server

                server = make_server(torch_engine, host="127.0.0.1", port=0)
                thread = threading.Thread(target=server.serve_forever, name="bench-remote-server", daemon=True)
                thread.start()

                def stop():
                    server.shutdown()
                    server.server_close()
                    thread.join(timeout=5)

                stack.callback(stop)
                return create_engine(name, None, url=server.url)
            return create_engine(name, checkpoint, **common)

        loaded = {}
        for name in names:
            # Loading and the untimed calls run one backend at a time, so RSS and GPU peaks are per row.
            if name != "torch":
                gpu_reset()
            try:
                engine = load(name)
            except (ValueError, ImportError, RuntimeError, OSError) as exc:
                engine = f"{type(exc).__name__}: {exc}"
            if isinstance(engine, str):
                rows.append(_unavailable(name, engine))
                continue
            if hasattr(engine, "close"):
                stack.callback(engine.close)
            rss_loaded = torch_rss if name == "torch" else current_rss_mb()
            info = engine.info()
            # onnx names execution providers and remote a URL where local engines name a device.
            row = {"engine": name, "available": True,
                   "device": info.get("device") or ",".join(info.get("providers") or []) or info.get("url"),
                   "dtype": info.get("dtype")}
            checked = check_and_warm(engine, inputs, warmup=warmup, reference_tokens=reference,
                                     reference_chunks=reference_chunks)
            row["rss_after_load_mb"] = rss_loaded
            row["rss_increase_over_torch_mb"] = 0.0 if name == "torch" else rss_loaded - torch_rss
            if name == "torch":
                row["rss_torch_load_mb"] = torch_rss - rss_before
            row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            row["_checked"] = checked
            rows.append(row)
            loaded[name] = engine
        timed = interleaved_latencies(loaded, inputs, runs=runs, reference_tokens=reference) if loaded else {}
        for row in rows:
            if not row["available"]:
                continue
            checked, stats = row.pop("_checked"), timed[row["engine"]]
            n_tokens = checked["tokens_per_action"]
            row.update({"latency_ms_p50": stats["latency_ms_p50"], "latency_ms_p95": stats["latency_ms_p95"],
                        "tokens_per_s": n_tokens / (stats["latency_ms_p50"] / 1e3) if n_tokens and stats["latency_ms_p50"] > 0 else None,
                        "tokens_per_action": n_tokens, "samples": stats["samples"],
                        "tokens_identical_to_torch_fp32": checked["tokens_identical"] and stats["tokens_identical"],
                        "token_agreement": checked["token_agreement"], "mean_bin_distance": checked["mean_bin_distance"],
                        "action_l2": checked["action_l2"], "normalised_l2": checked["normalised_l2"],
                        "peak_rss_mb": peak_rss_mb()})
    torch_rows = [r for r in rows if r["engine"] == "torch" and r["available"]]
    for row in rows:
        if row["available"]:
            row["ratio_vs_torch"] = (torch_rows[0]["latency_ms_p50"] / row["latency_ms_p50"]) if torch_rows else None
    return {"benchmark": "engines", "rows": rows, "checkpoint": str(checkpoint), "device": device,
            "cuda": cuda, "dtype": dtype, "runs": runs, "warmup": warmup, "images": len(inputs),
            "instructions": sorted({text for _, text in inputs}),
            "torch_threads": torch.get_num_threads(), "notes": BENCH_NOTES}


def format_backends_table(result: dict) -> str:
    """The rows of `bench_backends` as an aligned text table, unavailable backends with their reason."""
    header = ["engine", "dtype", "p50 ms", "p95 ms", "tok/s", "x torch", "RSS MB", "+RSS MB", "GPU MB", "tokens=torch32",
              "agree", "bin dist", "action L2"]
    lines = []
    for row in result["rows"]:
        if not row["available"]:
            lines.append([row["engine"], "unavailable: " + row["reason"]])
            continue
        gpu = _fmt(row["gpu_peak_mb"], ".0f")
        tps = _fmt(row["tokens_per_s"], ".0f")
        lines.append([row["engine"], str(row.get("dtype")), f"{row['latency_ms_p50']:.1f}", f"{row['latency_ms_p95']:.1f}", tps,
                      _fmt(row["ratio_vs_torch"], ".2f"), f"{row['rss_after_load_mb']:.0f}",
                      _fmt(row["rss_increase_over_torch_mb"], "+.0f"), gpu,
                      "yes" if row["tokens_identical_to_torch_fp32"] else "NO",
                      _fmt(row.get("token_agreement"), ".1%"), _fmt(row.get("mean_bin_distance"), ".2f"),
                      _fmt(row.get("action_l2"), ".2e")])
    widths = [max(len(r[i]) for r in [header] + [r for r in lines if len(r) == len(header)]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for r in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) if len(r) == len(header) else "  ".join(r))
    out.append(f"checkpoint {result['checkpoint']}, device {result['device']}, {result['runs']} runs "
               f"(+{result['warmup']} warmup) over {result['images']} (image, instruction) input(s)")
    out.extend("note: " + note for note in result["notes"])
    return "\n".join(out)
