"""manifest.json of exported engine artefacts (ONNX graphs, TensorRT plans): what they were built from.

A manifest records the checkpoint's fingerprint and the architecture numbers the graphs bake in
(layers, heads, hidden size, vocabulary, patches, chunk length), the dtype, the I/O shapes with
their dynamic axes, the opset and the package versions. `check_against_checkpoint` compares it
with a checkpoint directory and raises ValueError listing every difference, so a stale export is
never run against other weights.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
VERSIONED_PACKAGES = ("openvla_ros", "torch", "onnx", "onnxruntime", "onnxscript", "transformers", "timm", "tensorrt")


def package_versions(packages=VERSIONED_PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def architecture_summary(checkpoint) -> dict:
    """The checkpoint facts an exported graph depends on (all JSON scalars)."""
    cfg = checkpoint.config
    text = cfg.text_config
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    return {
        "vision_backbone_id": cfg.vision_backbone_id,
        "use_fused_vision_backbone": bool(cfg.use_fused_vision_backbone),
        "llm_backbone_id": cfg.llm_backbone_id,
        "arch_specifier": cfg.arch_specifier,
        "hidden_size": hidden,
        "num_hidden_layers": int(text["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(text.get("num_key_value_heads") or heads),
        "head_dim": int(text.get("head_dim") or hidden // heads),
        "vocab_size": int(text["vocab_size"]),
        "max_position_embeddings": int(text.get("max_position_embeddings", 2048)),
        "chunk_len": int(cfg.chunk_len),
    }


def build_manifest(kind: str, checkpoint, *, dtype: str, graphs: dict, extra: dict | None = None) -> dict:
    return {
        "format": f"openvla-ros-{kind}",
        "manifest_version": MANIFEST_VERSION,
        "checkpoint": {"path": str(checkpoint.path), "fingerprint": checkpoint.fingerprint()},
        "architecture": architecture_summary(checkpoint),
        "dtype": dtype,
        "graphs": graphs,
        "versions": package_versions(),
        **(extra or {}),
    }


def write_manifest(out_dir, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(artefact_dir, kind: str) -> dict:
    """Load and sanity-check a manifest; every graph file it names must exist."""
    artefact_dir = Path(artefact_dir)
    path = artefact_dir / MANIFEST_FILE
    if not artefact_dir.is_dir():
        raise ValueError(f"{kind} directory {artefact_dir} does not exist (export it first)")
    if not path.is_file():
        raise ValueError(f"{artefact_dir} has no {MANIFEST_FILE}; it is not an openvla-ros {kind} export")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    expected_format = f"openvla-ros-{kind}"
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {expected_format!r}")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest_version {manifest.get('manifest_version')!r} is not supported "
                         f"(this build reads {MANIFEST_VERSION}); export again")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise ValueError(f"{path}: no graphs listed")
    missing = [g["file"] for g in graphs.values() if not (artefact_dir / g["file"]).is_file()]
    if missing:
        raise ValueError(f"{artefact_dir} is missing files named in its manifest: {missing}")
    return manifest


def manifest_differences(manifest: dict, checkpoint) -> list[str]:
    """Human-readable differences between a manifest and a checkpoint (empty when they match)."""
    differences = []
    recorded = manifest.get("checkpoint", {})
    fingerprint = checkpoint.fingerprint()
    if recorded.get("fingerprint") != fingerprint:
        differences.append(f"checkpoint fingerprint: manifest {recorded.get('fingerprint')!r} "
                           f"(exported from {recorded.get('path')}), checkpoint {fingerprint!r} ({checkpoint.path})")
    summary = architecture_summary(checkpoint)
    stored = manifest.get("architecture", {})
    for key, value in summary.items():
        if stored.get(key) != value:
            differences.append(f"{key}: manifest {stored.get(key)!r}, checkpoint {value!r}")
    return differences


def check_against_checkpoint(manifest: dict, checkpoint, artefact_dir) -> None:
    differences = manifest_differences(manifest, checkpoint)
    if differences:
        raise ValueError(f"{artefact_dir} was not exported from checkpoint {checkpoint.path}: " + "; ".join(differences))
