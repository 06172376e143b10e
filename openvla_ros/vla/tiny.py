"""Tiny OpenVLA checkpoints in the official format, for tests and the laptop demo.

`openvla-ros make-tiny-checkpoint OUT [--seed N] [--chunk K]` writes config.json (same schema as
openvla/openvla-7b), sharded safetensors with the released weight names, a Llama-style
tokenizer.json built offline with `tokenizers`, tokenizer_config.json, special_tokens_map.json,
preprocessor_config.json and dataset_statistics.json. Deterministic for a given seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import constants as C
from .backbones import VISION_BACKBONES
from .checkpoint import CheckpointConfig

TINY_PIECES = 512  # text pieces; the last 256 double as action tokens, as in Llama 2's 32000
TINY_UNNORM_KEY = "tiny_demo"
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
PAD_PIECE = "<PAD>"

# Words the tokenizer's merges are learnt from (prompt templates and demo instructions).
_CORPUS = [
    "In: What action should the robot take to reach the red cube?\nOut:",
    "In: What action should the robot take to reach the blue cube?\nOut:",
    "In: What action should the robot take to pick up the screw?\nOut:",
    "In: What action should the robot take to pick up the red screw?\nOut:",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: What action should the "
    "robot take to open the drawer? ASSISTANT:",
    "put the carrot on the plate, move the spoon to the towel, close the green drawer, stack the blocks",
    "wipe the table with the sponge and place the yellow bowl in the sink near the left side",
]


def build_tokenizer(n_pieces: int = TINY_PIECES):
    """A Llama-2-style BPE tokenizer (byte fallback, ▁ word boundaries, BOS added) with `n_pieces` pieces + <PAD>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    bytes_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_learnt = n_pieces - len(SPECIAL_PIECES) - len(bytes_pieces)
    if n_learnt < 64:
        raise ValueError(f"n_pieces {n_pieces} too small (need >= {len(SPECIAL_PIECES) + 256 + 64})")
    normalizer = normalizers.Sequence([normalizers.Prepend(C.SPACE_PIECE), normalizers.Replace(" ", C.SPACE_PIECE)])
    # Learn merges on the corpus split into words, so no merge crosses a word boundary (as in
    # SentencePiece). Newlines are left to byte fallback (<0x0A>), as in Llama 2.
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=C.SPACE_PIECE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_learnt + 1, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=[C.SPACE_PIECE])
    learner.train_from_iterator([text.replace("\n", " ") for text in _CORPUS], trainer=trainer)
    learnt_vocab = learner.get_vocab()
    learnt = [p for p, _ in sorted(learnt_vocab.items(), key=lambda kv: kv[1]) if p != "<unk>"]
    merges = json.loads(learner.to_str())["model"]["merges"]
    # Pad with unused pieces so the id layout is exact (Llama 2 has 32000 pieces, all real words).
    filler = 0
    while len(learnt) < n_learnt:
        learnt.append(f"{C.SPACE_PIECE}unused{filler}")
        filler += 1
    pieces = list(SPECIAL_PIECES) + bytes_pieces + learnt[:n_learnt]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace(C.SPACE_PIECE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in SPECIAL_PIECES])
    tok.add_special_tokens([AddedToken(PAD_PIECE, special=True, normalized=False)])
    if tok.token_to_id(PAD_PIECE) != n_pieces:
        raise RuntimeError(f"<PAD> got id {tok.token_to_id(PAD_PIECE)}, expected {n_pieces}")
    return tok


def tiny_config(*, chunk: int = 1, hidden: int = 64, layers: int = 2, heads: int = 4,
                vision_backbone_id: str = "tiny-dinosiglip-224px", dt: float = C.DEFAULT_CONTROL_PERIOD_S,
                n_pieces: int = TINY_PIECES, norm_stats: dict | None = None) -> dict:
    if vision_backbone_id not in VISION_BACKBONES or not vision_backbone_id.startswith("tiny-"):
        raise ValueError(f"tiny checkpoints need a tiny-* vision backbone id, got {vision_backbone_id!r}")
    fused = VISION_BACKBONES[vision_backbone_id][1] is not None
    pad_multiple = 64
    return {
        "model_type": "openvla",
        "architectures": ["OpenVLAForActionPrediction"],
        "vision_backbone_id": vision_backbone_id,
        "llm_backbone_id": "tiny-llama2-pure",
        "arch_specifier": "no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        "use_fused_vision_backbone": fused,
        "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048,
        "pad_token_id": n_pieces,
        "pad_to_multiple_of": pad_multiple,
        "n_action_bins": C.N_ACTION_BINS,
        "timm_model_ids": [spec.arch for spec in VISION_BACKBONES[vision_backbone_id] if spec is not None],
        "image_sizes": [C.IMAGE_SIZE] * (2 if fused else 1),
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "llama",
            "vocab_size": n_pieces + pad_multiple,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "pad_token_id": n_pieces,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
        },
        C.CONFIG_KEY_CHUNK: int(chunk),
        C.CONFIG_KEY_DT: float(dt),
        C.CONFIG_KEY_DIM_NAMES: list(C.DEFAULT_ACTION_DIM_NAMES),
        "norm_stats": norm_stats or default_norm_stats(),
    }


def default_norm_stats(key: str = TINY_UNNORM_KEY) -> dict:
    """Statistics in the official schema: ±2 cm/step translation, ±0.1 rad/step rotation, gripper unmasked."""
    q99 = np.array([0.02, 0.02, 0.02, 0.1, 0.1, 0.1, 1.0])
    q01 = -q99
    q01[-1] = 0.0
    action = {"mean": [0.0] * 6 + [0.5], "std": (q99 / 2).tolist(), "max": q99.tolist(), "min": q01.tolist(),
              "q01": q01.tolist(), "q99": q99.tolist(), "mask": [True] * 6 + [False]}
    return {key: {"action": action, "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
                  "num_transitions": 0, "num_trajectories": 0}}


def init_tiny_weights(model, seed: int, action_vocab_size: int, n_bins: int = C.N_ACTION_BINS) -> None:
    """Deterministic random weights whose greedy outputs land on action tokens (so untrained tiny
    models still produce varied, image-dependent actions instead of text)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".gamma"):
                param.fill_(0.1)
            elif param.ndim >= 2 or "pos_embed" in name or "latent" in name or "cls_token" in name or "reg_token" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        head = model.language_model.lm_head.weight
        first, last = action_vocab_size - n_bins, action_vocab_size
        head[:first] *= 0.01
        head[last:] *= 0.01
        head[first:last] *= 20.0


def write_tiny_checkpoint(out, *, seed: int = 0, chunk: int = 1, config: dict | None = None,
                          shards: int = 2, model=None) -> Path:
    """Write a complete checkpoint directory; `model` (an OpenVLAModel) overrides the random weights."""
    from safetensors.torch import save_file

    from .model import OpenVLAModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or tiny_config(chunk=chunk)
    parsed = CheckpointConfig.from_dict(config)
    if model is None:
        torch.manual_seed(seed)
        model = OpenVLAModel(parsed)
        init_tiny_weights(model, seed, parsed.action_vocab_size, parsed.n_action_bins)
    state = {k: v.detach().contiguous().clone() for k, v in model.stored_state_dict().items()}
    write_weights(out, state, shards)
    norm_stats = config.get("norm_stats", {})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2) + "\n")
    n_pieces = int(config["pad_token_id"])
    build_tokenizer(n_pieces).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": PAD_PIECE, "model_max_length": 2048, "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer", "legacy": False}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_PIECE}, indent=2) + "\n")
    norms = [spec.normalisation for spec in VISION_BACKBONES[config["vision_backbone_id"]] if spec is not None]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PrismaticImageProcessor", "processor_class": "PrismaticProcessor",
        "image_resize_strategy": config["image_resize_strategy"], "input_sizes": [[3, C.IMAGE_SIZE, C.IMAGE_SIZE]] * len(norms),
        "interpolations": ["bicubic"] * len(norms), "means": [list(n.mean) for n in norms],
        "stds": [list(n.std) for n in norms], "tvf_crop_params": [{"output_size": [C.IMAGE_SIZE, C.IMAGE_SIZE]}] * len(norms),
        "use_fused_vision_backbone": len(norms) > 1}, indent=2) + "\n")
    return out


def write_weights(out: Path, state: dict, shards: int) -> None:
    """Single `model.safetensors` (shards=1) or N shards + `model.safetensors.index.json`, as HF writes them."""
    from safetensors.torch import save_file

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    meta = {"format": "pt"}
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata=meta)
        return
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in group}, str(out / file), metadata=meta)
        for k in group:
            weight_map[k] = file
            total += state[k].numel() * state[k].element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
