"""Reading an OpenVLA checkpoint directory in the official Hugging Face layout.

config.json, single (`model.safetensors`) or sharded (`model-0000N-of-0000M.safetensors` +
`model.safetensors.index.json`) weights, tokenizer files, and `dataset_statistics.json`, which
replaces `norm_stats` when present (fine-tuned run directories carry it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import constants as C
from .action_tokens import action_stats, default_dim_names, select_unnorm_key
from .prompt import PROMPT_STYLES, prompt_style_for

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
STATISTICS_FILE = "dataset_statistics.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the file and the problem."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


@dataclass
class CheckpointConfig:
    """The parts of config.json the engine uses, validated."""

    raw: dict
    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    use_fused_vision_backbone: bool
    image_resize_strategy: str
    text_config: dict
    pad_token_id: int
    pad_to_multiple_of: int
    n_action_bins: int
    chunk_len: int
    control_period_s: float
    prompt_style: str
    dim_names_override: list | None = None

    @classmethod
    def from_dict(cls, raw: dict, where: str = CONFIG_FILE) -> "CheckpointConfig":
        if raw.get("model_type") != "openvla":
            raise CheckpointError(f"{where}: model_type is {raw.get('model_type')!r}, expected 'openvla'")
        missing = [k for k in ("vision_backbone_id", "llm_backbone_id", "text_config") if k not in raw]
        if missing:
            raise CheckpointError(f"{where} lacks {missing}")
        chunk_len = int(raw.get(C.CONFIG_KEY_CHUNK, 1))
        if chunk_len < 1:
            raise CheckpointError(f"{where}: {C.CONFIG_KEY_CHUNK} must be >= 1, got {chunk_len}")
        dt = float(raw.get(C.CONFIG_KEY_DT, C.DEFAULT_CONTROL_PERIOD_S))
        if not dt > 0:
            raise CheckpointError(f"{where}: {C.CONFIG_KEY_DT} must be > 0, got {dt}")
        style = raw.get(C.CONFIG_KEY_PROMPT_STYLE) or prompt_style_for(raw["llm_backbone_id"])
        if style not in PROMPT_STYLES:
            raise CheckpointError(f"{where}: {C.CONFIG_KEY_PROMPT_STYLE} {style!r} not in {PROMPT_STYLES}")
        return cls(
            raw=raw,
            vision_backbone_id=raw["vision_backbone_id"],
            llm_backbone_id=raw["llm_backbone_id"],
            arch_specifier=raw.get("arch_specifier", "no-align+fused-gelu-mlp"),
            use_fused_vision_backbone=bool(raw.get("use_fused_vision_backbone", True)),
            image_resize_strategy=raw.get("image_resize_strategy", "resize-naive"),
            text_config=dict(raw["text_config"]),
            pad_token_id=int(raw.get("pad_token_id", 32000)),
            pad_to_multiple_of=int(raw.get("pad_to_multiple_of", 64)),
            n_action_bins=int(raw.get("n_action_bins", C.N_ACTION_BINS)),
            chunk_len=chunk_len,
            control_period_s=dt,
            prompt_style=style,
            dim_names_override=raw.get(C.CONFIG_KEY_DIM_NAMES),
        )

    @property
    def action_vocab_size(self) -> int:
        """The vocabulary size the action bins count down from (32000 for the released model)."""
        return int(self.text_config["vocab_size"]) - self.pad_to_multiple_of


@dataclass
class Checkpoint:
    """A checkpoint directory: validated config, statistics and the weight files it holds."""

    path: Path
    config: CheckpointConfig
    norm_stats: dict
    statistics_source: str
    weight_files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path) -> "Checkpoint":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        config = CheckpointConfig.from_dict(_read_json(path / CONFIG_FILE), where=str(path / CONFIG_FILE))
        stats_path = path / STATISTICS_FILE
        if stats_path.exists():
            norm_stats, source = _read_json(stats_path), str(stats_path)
        else:
            norm_stats, source = config.raw.get("norm_stats") or {}, f"{path / CONFIG_FILE}:norm_stats"
        if not isinstance(norm_stats, dict):
            raise CheckpointError(f"{source} must be an object keyed by dataset name")
        if not any((path / name).exists() for name in TOKENIZER_FILES):
            raise CheckpointError(f"{path} has no tokenizer (expected one of {list(TOKENIZER_FILES)})")
        return cls(path=path, config=config, norm_stats=norm_stats, statistics_source=source,
                   weight_files=_weight_files(path))

    @property
    def unnorm_keys(self) -> list[str]:
        return sorted(self.norm_stats)

    def resolve_unnorm_key(self, unnorm_key: str | None) -> str:
        return select_unnorm_key(self.norm_stats, unnorm_key)

    def action_stats(self, unnorm_key: str | None):
        return action_stats(self.norm_stats, self.resolve_unnorm_key(unnorm_key))

    def dim_names(self, action_dim: int) -> list[str]:
        return default_dim_names(action_dim, self.config.dim_names_override)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every stored weight, on the CPU in the stored dtype."""
        from safetensors import safe_open

        for file in self.weight_files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types for bad headers/data
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"cannot read weights file {file}: {exc}") from None

    def fingerprint(self) -> str:
        """Short hash of config.json and the weight files' names and sizes (identifies a checkpoint cheaply)."""
        digest = hashlib.sha256((self.path / CONFIG_FILE).read_bytes())
        for file in self.weight_files:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
        return digest.hexdigest()[:16]


def _weight_files(path: Path) -> list[Path]:
    index_path = path / WEIGHTS_INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (path / name).exists()]
        if absent:
            raise CheckpointError(f"{index_path} names weight shards that are missing: {absent}")
        return [path / name for name in files]
    single = path / SINGLE_WEIGHTS_FILE
    if single.exists():
        return [single]
    raise CheckpointError(f"{path} has no weights ({SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})")
