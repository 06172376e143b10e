"""`openvla-ros bench gpu` (and scripts/gpu_check.sh): every GPU-only check in one run, one JSON.

On a CUDA machine, in order:
1. the GPU-marked tests (`pytest -m gpu`): bnb4/bnb8 and TensorRT on the GPU, CUDA torch paths;
2. every backend side by side on a tiny checkpoint (bf16 torch, bnb4, bnb8, int8, int4, onnx,
   TensorRT built from the ONNX export): latency, memory, token agreement with float32;
3. the same at the released widths (real towers, a 4096-wide language model with `--wide-layers`
   layers, random weights): torch bf16, bnb4, bnb8, int8, int4, and the speed against a re-run of
   OpenVLA's own predict_action;
4. with `--with-7b`: loading a 7B-shaped checkpoint (~15 GB written) in bf16 and NF4 onto the GPU.
Each part's failure is recorded in the JSON and the next part still runs. `--device cpu` runs the
same plumbing on a machine without CUDA (the tests use it; the figures are then CPU figures).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

WIDE_ENGINES = ("torch", "bnb4", "bnb8", "int8", "int4")


def _part(report: dict, name: str, run, progress) -> None:
    progress(f"[gpu check] {name} ...")
    t0 = time.perf_counter()
    try:
        report["parts"][name] = {"ok": True, **run()}
    except Exception as exc:  # a failed part is a figure of the report, not the end of the run
        report["parts"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-4000:]}
    report["parts"][name]["seconds"] = time.perf_counter() - t0
    progress(f"[gpu check] {name}: {'ok' if report['parts'][name]['ok'] else 'FAILED'}")


def _gpu_tests(repo: Path) -> dict:
    junit = Path(tempfile.mkdtemp(prefix="gpu-tests-")) / "junit.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "test", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}"], cwd=repo, capture_output=True, text=True)
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if junit.exists():
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"exit_code": done.returncode, **counts, "failed": failed, "output_tail": done.stdout[-3000:]}


def _rows(result: dict) -> dict:
    keep = ("available", "reason", "dtype", "latency_ms_p50", "latency_ms_p95", "tokens_per_s", "gpu_peak_mb",
            "rss_after_load_mb", "peak_rss_mb", "tokens_identical_to_torch_fp32", "token_agreement",
            "mean_bin_distance", "action_l2")
    return {row["engine"]: {k: row[k] for k in keep if k in row} for row in result["rows"]}


def run_gpu_check(out, *, device: str = "cuda", wide_layers: int = 2, wide: bool = True, with_7b: bool = False,
                  tests: bool = True, engines=None, runs: int = 10, workdir=None, progress=print) -> dict:
    import torch

    from ..vla.shaped import released_config, write_shaped_checkpoint
    from ..vla.tiny import write_tiny_checkpoint
    from .bench import bench_backends, bench_engine, bench_inputs, synthetic_scene
    from .load_bench import measure_load
    from .torch_engine import TorchEngine

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("bench gpu needs a CUDA machine (torch.cuda.is_available() is False); "
                         "--device cpu runs the same checks on the CPU")
    work = Path(workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    report = {"benchmark": "gpu_check", "device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "host": platform.node(), "parts": {}}
    inputs = bench_inputs(3, ["reach the red cube", "pick up the blue block"])
    tiny_engines = list(engines or ["torch", "bnb4", "bnb8", "int8", "int4", "onnx", "tensorrt"])

    if tests:
        _part(report, "gpu_tests", lambda: _gpu_tests(repo), progress)

    def tiny():
        checkpoint = write_tiny_checkpoint(work / "tiny", seed=0)
        result = bench_backends(checkpoint, tiny_engines, inputs=inputs, runs=runs, warmup=2, device=device,
                                dtype="bfloat16")
        return {"checkpoint": "tiny", "dtype": "bfloat16", "rows": _rows(result)}

    _part(report, "tiny_backends", tiny, progress)

    if wide:
        wide_dir = work / f"wide-{wide_layers}l"

        def wide_backends():
            if not (wide_dir / "model.safetensors.index.json").exists():
                write_shaped_checkpoint(wide_dir, released_config(layers=wide_layers))
            result = bench_backends(wide_dir, [e for e in WIDE_ENGINES if e in tiny_engines] or list(WIDE_ENGINES),
                                    inputs=inputs[:2], runs=max(2, runs // 2), warmup=1, device=device,
                                    dtype="bfloat16")
            return {"checkpoint": f"released widths, {wide_layers} LM layers", "dtype": "bfloat16", "rows": _rows(result)}

        def wide_predict_action():
            figures = {}
            for dtype in ("float32", "bfloat16"):
                engine = TorchEngine(wide_dir, device=device, dtype=dtype)
                result = bench_engine(engine, synthetic_scene(seed=0), "pick up the blue block", runs=max(2, runs // 2),
                                      warmup=1)
                figures[dtype] = {k: result[k] for k in ("ours_ms", "reference_ms", "predict_action_ms",
                                                         "speedup_vs_predict_action", "tokens_identical_to_predict_action")}
                del engine
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return figures

        _part(report, "wide_backends", wide_backends, progress)
        _part(report, "wide_vs_predict_action", wide_predict_action, progress)

    if with_7b:
        def load_7b():
            directory = work / "openvla-7b-shaped"
            if not (directory / "model.safetensors.index.json").exists():
                write_shaped_checkpoint(directory)
            return {name: measure_load(directory, engine=name, dtype="bfloat16", device=device)
                    for name in ("torch", "bnb4")}

        _part(report, "load_7b", load_7b, progress)

    report["ok"] = all(part["ok"] for part in report["parts"].values())
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
