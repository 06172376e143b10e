"""Checkpoints shaped like the released openvla-7b, with random weights: for loading and speed
benchmarks at the real sizes without downloading the model.

`released_config()` is the released config.json's content (DINOv2-L/14 + SigLIP-So400M/14 fused
towers, the 3-layer fused GELU projector, Llama-2-7B: hidden 4096, MLP 11008, 32 layers, 32 heads,
vocabulary 32000 + 64 padding), with `layers`/`hidden`/... overrides for cheaper variants (the speed
benchmark runs the real widths with a few layers; the tests run small widths). The weight names
are the released ones (they come from the same module tree that loads the checkpoint).

`write_shaped_checkpoint` writes the weights tensor by tensor into shards of at most
`max_shard_bytes` (the released model's 15.2 GB of bf16 come out as 3 shards): every tensor is
drawn, written and freed before the next, so writing a 7B-shaped checkpoint needs no more memory
than its largest tensor. The safetensors files are written here (8-byte header length, JSON header
padded to 8 bytes, raw little-endian data), which is what lets them stream.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import constants as C
from .tiny import PAD_PIECE, build_tokenizer, default_norm_stats

RELEASED_VOCAB_PIECES = 32000  # Llama 2's; + 64 padding rows in the released embedding
RELEASED_MAX_SHARD_BYTES = 7_000_000_000  # the released checkpoint's three shards are under 7 GB each
SHAPED_UNNORM_KEY = "bridge_orig"
TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INIT_STD = 0.02  # Llama's initializer_range


def released_config(*, layers: int | None = None, hidden: int | None = None, intermediate: int | None = None,
                    heads: int | None = None, vision_backbone_id: str = "dinosiglip-vit-so-224px",
                    n_pieces: int = RELEASED_VOCAB_PIECES) -> dict:
    """config.json of openvla-7b (its text_config leaves Llama-2-7B's sizes to LlamaConfig's defaults);
    overrides make smaller variants with the same weight names."""
    pad_multiple = 64
    text = {"model_type": "llama", "pad_token_id": n_pieces, "torch_dtype": "bfloat16",
            "vocab_size": n_pieces + pad_multiple}
    for key, value in (("num_hidden_layers", layers), ("hidden_size", hidden), ("intermediate_size", intermediate),
                       ("num_attention_heads", heads), ("num_key_value_heads", heads)):
        if value is not None:
            text[key] = int(value)
    fused = vision_backbone_id.startswith(("dinosiglip", "tiny-dinosiglip"))
    return {
        "model_type": "openvla",
        "architectures": ["OpenVLAForActionPrediction"],
        "arch_specifier": "no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [C.IMAGE_SIZE] * (2 if fused else 1),
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "n_action_bins": C.N_ACTION_BINS,
        "output_projector_states": False,
        "pad_to_multiple_of": pad_multiple,
        "pad_token_id": n_pieces,
        "text_config": text,
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"][: 2 if fused else 1],
        "torch_dtype": "bfloat16",
        "use_fused_vision_backbone": fused,
        "vision_backbone_id": vision_backbone_id,
        "norm_stats": default_norm_stats(SHAPED_UNNORM_KEY),
    }


def reduced_config() -> dict:
    """The released names at small widths (tiny towers, hidden 64, 2 layers, 576 vocabulary): what the
    default tests generate in a second."""
    return released_config(layers=2, hidden=64, intermediate=128, heads=4, vision_backbone_id="tiny-dinosiglip-224px",
                           n_pieces=512)


def stored_tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(stored name, shape) of every weight the config implies, in the module tree's order (no memory used)."""
    from accelerate import init_empty_weights

    from .checkpoint import CheckpointConfig
    from .model import OpenVLAModel, to_stored_name

    with init_empty_weights(include_buffers=False):
        model = OpenVLAModel(CheckpointConfig.from_dict(config))
    return [(to_stored_name(name), tuple(t.shape)) for name, t in model.state_dict().items()]


def shaped_tensor(name: str, shape: tuple[int, ...], *, seed: int, action_vocab_size: int, n_bins: int,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One weight, drawn from a generator seeded by (seed, name): the same tensor whatever the sharding.

    Matrices N(0, 0.02); norm weights 1, LayerScale 0.1, biases 0; the LM head's non-action rows
    scaled down so greedy decoding lands on action tokens (varied actions from a random model)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if name.endswith(".scale_factor"):
        return torch.full(shape, 0.1, dtype=dtype)
    if len(shape) >= 2 or any(key in name for key in ("pos_embed", "cls_token", "reg_token", "latent")):
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(INIT_STD).to(dtype)
        if name == "language_model.lm_head.weight":
            first = action_vocab_size - n_bins
            tensor[:first] *= 0.01
            tensor[action_vocab_size:] *= 0.01
            tensor[first:action_vocab_size] *= 20.0
        return tensor
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int) -> list[list[int]]:
    """Indices of `specs` per shard, in order, each shard at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for index, (_, shape) in enumerate(specs):
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors_streamed(path: Path, items: list[tuple[str, tuple[int, ...]]], make, dtype: torch.dtype,
                               metadata: dict | None = None) -> int:
    """Write a safetensors file whose tensors `make(name, shape)` draws one at a time; returns the data bytes."""
    code = TORCH_TO_SAFETENSORS[dtype]
    header, offset = {}, 0
    for name, shape in items:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for name, shape in items:
            tensor = make(name, shape).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made shape {tuple(tensor.shape)}, expected {shape}")
            handle.write(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
            del tensor
    return offset


def write_shaped_checkpoint(out, config: dict | None = None, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int = RELEASED_MAX_SHARD_BYTES, progress=None) -> Path:
    """A complete checkpoint directory for `config` (default: the released 7B) with random weights,
    sharded like Hugging Face writes it (model-0000i-of-0000n.safetensors + index)."""
    from .checkpoint import CheckpointConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or released_config()
    parsed = CheckpointConfig.from_dict(config)
    specs = stored_tensor_specs(config)
    shards = plan_shards(specs, dtype.itemsize, max_shard_bytes)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()

    def make(name, shape):
        return shaped_tensor(name, shape, seed=seed, action_vocab_size=parsed.action_vocab_size,
                             n_bins=parsed.n_action_bins, dtype=dtype)

    weight_map, total = {}, 0
    for number, indices in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        items = [specs[i] for i in indices]
        total += write_safetensors_streamed(out / file, items, make, dtype, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in items})
        if progress is not None:
            progress(f"wrote {file} ({len(items)} tensors)")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "dataset_statistics.json").write_text(json.dumps(config["norm_stats"], indent=2) + "\n")
    build_tokenizer(int(config["pad_token_id"])).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": PAD_PIECE, "model_max_length": 2048, "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer", "legacy": False}, indent=2) + "\n")
    return out
