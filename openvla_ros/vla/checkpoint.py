"""Reading an OpenVLA checkpoint directory in the official Hugging Face layout.

config.json, single (`model.safetensors`) or sharded (`model-0000N-of-0000M.safetensors` +
`model.safetensors.index.json`) weights, tokenizer files, and `dataset_statistics.json`, which
replaces `norm_stats` when present (fine-tuned run directories carry it).

Everything read is validated before anything is built: config values have the right types and
sizes within TEXT_CONFIG_LIMITS (so an absurd size is an error, not a terabyte allocation), every
dataset's action statistics are finite with q01 <= q99, and a `dataset_statistics.json` that is a
dangling link is an error rather than a silent fall-back to `norm_stats`. Every problem is a
one-line CheckpointError naming the file, the key and the value.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import constants as C
from .action_tokens import ActionStats, action_stats, default_dim_names, select_unnorm_key
from .prompt import PROMPT_STYLES, prompt_style_for

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
STATISTICS_FILE = "dataset_statistics.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

# Plausible ranges of the Llama sizes in text_config (inclusive): far beyond any released model
# (Llama 2 7B: 4096 hidden, 32 layers, 32000 vocabulary), far below sizes that cannot be allocated.
TEXT_CONFIG_LIMITS = {
    "vocab_size": (2, 1 << 20),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
}
# What Hugging Face's LlamaConfig assumes for a size text_config leaves out (Llama 2 7B's): the
# released openvla-7b's config.json gives only vocab_size and pad_token_id and relies on them.
LLAMA_DEFAULT_SIZES = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                       "num_hidden_layers": 32, "num_attention_heads": 32}
MAX_N_ACTION_BINS = 1 << 16
MAX_CHUNK_LEN = 1024
MAX_PAD_TO_MULTIPLE_OF = 1 << 12


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the file and the problem."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        what = "dangling link" if path.is_symlink() else "missing file"
        raise CheckpointError(f"{what} {path}") from None
    except OSError as exc:  # a symlink loop, a directory, no permission ...
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON: nested too deeply") from None


def _int_field(raw: dict, key: str, default, lo: int, hi: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {key} must be an integer, got {value!r:.80}")
    if not lo <= value <= hi:
        raise CheckpointError(f"{where}: {key} = {value} is outside the plausible range [{lo}, {hi}]")
    return value


def _float_field(raw: dict, key: str, default, where: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {key} must be a finite number, got {value!r:.80}")
    return float(value)


def validate_text_config(text: dict, where: str) -> dict:
    """The Llama sizes of `text_config`, checked (types, TEXT_CONFIG_LIMITS, head divisibility)."""
    sizes = {}
    for key, (lo, hi) in TEXT_CONFIG_LIMITS.items():
        default = sizes["num_attention_heads"] if key == "num_key_value_heads" else LLAMA_DEFAULT_SIZES[key]
        value = text.get(key) if text.get(key) is not None else default
        sizes[key] = _int_field({key: value}, key, None, lo, hi, f"{where}: text_config")
    heads, kv_heads, hidden = sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["hidden_size"]
    if text.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"{where}: text_config hidden_size {hidden} is not divisible by "
                              f"num_attention_heads {heads}")
    if heads % kv_heads:
        raise CheckpointError(f"{where}: text_config num_attention_heads {heads} is not divisible by "
                              f"num_key_value_heads {kv_heads}")
    if text.get("head_dim") is not None:
        sizes["head_dim"] = _int_field(text, "head_dim", None, 1, 1 << 12, f"{where}: text_config")
    return sizes


def llm_parameter_count(text: dict) -> int:
    """Parameters of the Llama a (validated) text_config describes: embeddings, LM head, layers."""
    vocab, hidden = int(text["vocab_size"]), int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * int(text["intermediate_size"])
    tied = bool(text.get("tie_word_embeddings", False))
    return vocab * hidden * (1 if tied else 2) + int(text["num_hidden_layers"]) * (attention + mlp + 2 * hidden) + hidden


def validate_norm_stats(norm_stats, source: str) -> dict:
    """`norm_stats` (dataset key -> {"action": {q01, q99, mask}, ...}) checked entry by entry."""
    if not isinstance(norm_stats, dict):
        raise CheckpointError(f"{source} must be an object keyed by dataset name, got {type(norm_stats).__name__}")
    for key, entry in norm_stats.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{source}: statistics of dataset {key!r} must be an object, got {entry!r:.80}")
        action = entry.get("action")
        if action is None:
            continue  # reported if this key is ever used (select_unnorm_key / action_stats)
        if not isinstance(action, dict):
            raise CheckpointError(f"{source}: {key!r} action statistics must be an object, got {action!r:.80}")
        try:
            ActionStats.from_dict(action, where=f"{source}: {key!r} action statistics")
        except (ValueError, TypeError) as exc:
            raise CheckpointError(str(exc)) from None
    return norm_stats


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
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} must hold a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != "openvla":
            raise CheckpointError(f"{where}: model_type is {raw.get('model_type')!r:.80}, expected 'openvla'")
        missing = [k for k in ("vision_backbone_id", "llm_backbone_id", "text_config") if k not in raw]
        if missing:
            raise CheckpointError(f"{where} lacks {missing}")
        for key in ("vision_backbone_id", "llm_backbone_id"):
            if not isinstance(raw[key], str):
                raise CheckpointError(f"{where}: {key} must be a string, got {raw[key]!r:.80}")
        for key in ("arch_specifier", "image_resize_strategy"):
            if key in raw and not isinstance(raw[key], str):
                raise CheckpointError(f"{where}: {key} must be a string, got {raw[key]!r:.80}")
        text = raw["text_config"]
        if not isinstance(text, dict):
            raise CheckpointError(f"{where}: text_config must be an object, got {text!r:.80}")
        sizes = validate_text_config(text, where)
        chunk_len = _int_field(raw, C.CONFIG_KEY_CHUNK, 1, 1, MAX_CHUNK_LEN, where)
        dt = _float_field(raw, C.CONFIG_KEY_DT, C.DEFAULT_CONTROL_PERIOD_S, where)
        if not dt > 0:
            raise CheckpointError(f"{where}: {C.CONFIG_KEY_DT} must be > 0, got {dt}")
        pad_multiple = _int_field(raw, "pad_to_multiple_of", 64, 0, MAX_PAD_TO_MULTIPLE_OF, where)
        n_bins = _int_field(raw, "n_action_bins", C.N_ACTION_BINS, 2, MAX_N_ACTION_BINS, where)
        if sizes["vocab_size"] - pad_multiple <= n_bins:
            raise CheckpointError(f"{where}: text_config vocab_size {sizes['vocab_size']} minus pad_to_multiple_of "
                                  f"{pad_multiple} leaves no room for {n_bins} action bins")
        pad_token_id = _int_field(raw, "pad_token_id", 32000, 0, sizes["vocab_size"] - 1, where)
        style = raw.get(C.CONFIG_KEY_PROMPT_STYLE) or prompt_style_for(raw["llm_backbone_id"])
        if style not in PROMPT_STYLES:
            raise CheckpointError(f"{where}: {C.CONFIG_KEY_PROMPT_STYLE} {style!r:.80} not in {PROMPT_STYLES}")
        names = raw.get(C.CONFIG_KEY_DIM_NAMES)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"{where}: {C.CONFIG_KEY_DIM_NAMES} must be a list of strings, got {names!r:.80}")
        return cls(
            raw=raw,
            vision_backbone_id=raw["vision_backbone_id"],
            llm_backbone_id=raw["llm_backbone_id"],
            arch_specifier=raw.get("arch_specifier", "no-align+fused-gelu-mlp"),
            use_fused_vision_backbone=bool(raw.get("use_fused_vision_backbone", True)),
            image_resize_strategy=raw.get("image_resize_strategy", "resize-naive"),
            text_config={**text, **sizes},  # the sizes as used, LlamaConfig defaults filled in
            pad_token_id=pad_token_id,
            pad_to_multiple_of=pad_multiple,
            n_action_bins=n_bins,
            chunk_len=chunk_len,
            control_period_s=dt,
            prompt_style=style,
            dim_names_override=names,
        )

    def estimated_llm_bytes(self, bytes_per_parameter: int = 4) -> int:
        """Memory the language model's weights take (the vision backbones come on top)."""
        return llm_parameter_count(self.text_config) * bytes_per_parameter

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
        if stats_path.exists() or stats_path.is_symlink():  # a dangling link is an error, not "absent"
            norm_stats, source = _read_json(stats_path), str(stats_path)
        else:
            norm_stats, source = config.raw.get("norm_stats") or {}, f"{path / CONFIG_FILE}:norm_stats"
        validate_norm_stats(norm_stats, source)
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
