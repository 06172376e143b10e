"""`openvla-ros export onnx`: the checkpoint as three ONNX graphs plus a manifest.

    vision.onnx   pixel_values [1, C, 224, 224]              -> image_embeds [1, P, H]
                  (both backbones + projector; P = 256 patches)
    prefill.onnx  input_ids [1, T] int64, image_embeds [1, P, H]
                  -> logits [1, V] (last position), present_keys/values [L, 1, KV, 1+P+T-1, D]
                  (the embedding lookup and the `[BOS] + patches + rest` splice are in the graph,
                  so the runtime needs no weights)
    decode.onnx   input_ids [1, 1] int64, past_keys/values [L, 1, KV, S, D]
                  -> logits [1, V], present_keys/values [L, 1, KV, S+1, D]

The language-model graphs are thin wrappers over the checkpoint's own `LlamaForCausalLM` weights
using the same operations as `llama_decode.LlamaGreedyDecoder` (RMSNorm in float32, rotary tables
from the model's rotary embedding, scaled-dot-product attention, SwiGLU MLP), exported with the
dynamo-based `torch.onnx.export` (the default of torch >= 2.9; works here with onnxscript).
The cache grows by concatenation (past in, present out), so every graph input has one dynamic axis
at most: `seq` (prompt length) and `past` (cache length).
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..vla.checkpoint import Checkpoint
from ..vla.model import load_model
from .manifest import architecture_summary, build_manifest, write_manifest

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
GRAPH_FILES = {"vision": "vision.onnx", "prefill": "prefill.onnx", "decode": "decode.onnx"}
# Example sizes for tracing; never 0 or 1, which torch.export would specialise on.
_EXAMPLE_SEQ = 7
_EXAMPLE_PAST = 9


def _rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:
    dtype = hidden.dtype
    h32 = hidden.to(torch.float32)
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionGraph(nn.Module):
    """pixel values -> projected patch embeddings (what TorchEngine splices after BOS)."""

    def __init__(self, model):
        super().__init__()
        self.vision_backbone = model.vision_backbone
        self.projector = model.projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision_backbone(pixel_values))


class _LlamaStack(nn.Module):
    """The decoder layers of a LlamaForCausalLM with an explicit concatenated KV cache."""

    def __init__(self, causal_lm):
        super().__init__()
        decoder = causal_lm.model
        cfg = causal_lm.config
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.embed = causal_lm.get_input_embeddings()
        self.head = causal_lm.lm_head
        self.n_rep = cfg.num_attention_heads // (cfg.num_key_value_heads or cfg.num_attention_heads)
        weight = self.embed.weight
        positions = torch.arange(cfg.max_position_embeddings, device=weight.device).unsqueeze(0)
        probe = torch.empty(1, 1, 1, dtype=weight.dtype, device=weight.device)
        cos, sin = decoder.rotary_emb(probe, position_ids=positions)  # same table as llama_decode
        self.register_buffer("cos", cos[0].detach().clone(), persistent=False)  # [max_pos, D]
        self.register_buffer("sin", sin[0].detach().clone(), persistent=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_rep == 1:
            return x
        b, h, s, d = x.shape
        return x[:, :, None].expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)

    def forward(self, hidden, past_keys=None, past_values=None):
        n = hidden.shape[1]
        start = 0 if past_keys is None else past_keys.shape[3]
        cos = self.cos[start:start + n][None, None]
        sin = self.sin[start:start + n][None, None]
        keys, values = [], []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = _rms_norm(layer.input_layernorm, hidden)
            shape = (1, n, -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            if past_keys is not None:
                k = torch.cat([past_keys[index], k], dim=2)
                v = torch.cat([past_values[index], v], dim=2)
            keys.append(k)
            values.append(v)
            # The prompt attends causally; a single new token attends to the whole cache.
            out = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v),
                                                 is_causal=past_keys is None, scale=attn.scaling)
            hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            residual = hidden
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            hidden = residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        logits = self.head(_rms_norm(self.norm, hidden[:, -1]))
        return logits, torch.stack(keys), torch.stack(values)


class PrefillGraph(nn.Module):
    def __init__(self, causal_lm):
        super().__init__()
        self.stack = _LlamaStack(causal_lm)

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor):
        text = self.stack.embed(input_ids)
        embeds = torch.cat([text[:, :1], image_embeds.to(text.dtype), text[:, 1:]], dim=1)
        return self.stack(embeds)


class DecodeGraph(nn.Module):
    def __init__(self, causal_lm):
        super().__init__()
        self.stack = _LlamaStack(causal_lm)

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        return self.stack(self.stack.embed(input_ids), past_keys, past_values)


def _export(module, args, path: Path, *, input_names, output_names, dynamic_shapes, opset: int, optimize: bool) -> None:
    with warnings.catch_warnings():
        # past_keys and past_values share the `past` axis on purpose; the exporter notes it each time.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=optimize,
                                    verbose=False)
    # external_data=None: weights go into a side file only when the graph would pass protobuf's 2 GB.
    program.save(str(path), external_data=None)


def export_onnx(checkpoint_dir, out_dir, *, opset: int = DEFAULT_OPSET, dtype: str = "float32",
                graphs=tuple(GRAPH_FILES), optimize: bool = True) -> Path:
    """Export the checkpoint's graphs and write manifest.json; returns the manifest path.

    `optimize` runs the exporter's graph optimiser (constant folding, fusions); onnxruntime optimises
    again at load time, so it mainly matters for other consumers (TensorRT) and costs export time.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; expected one of {sorted(EXPORT_DTYPES)}")
    if not 17 <= int(opset) <= 23:
        raise ValueError(f"opset must be between 17 and 23, got {opset}")
    unknown = sorted(set(graphs) - set(GRAPH_FILES))
    if unknown or not graphs:
        raise ValueError(f"graphs must be a non-empty subset of {sorted(GRAPH_FILES)}, got {list(graphs)}")
    checkpoint = Checkpoint.open(checkpoint_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = EXPORT_DTYPES[dtype]
    model = load_model(checkpoint, dtype=torch_dtype)
    arch = architecture_summary(checkpoint)
    L, KV, D, H, V = (arch["num_hidden_layers"], arch["num_key_value_heads"], arch["head_dim"],
                      arch["hidden_size"], arch["vocab_size"])
    channels = 3 * (2 if arch["use_fused_vision_backbone"] else 1)
    max_pos = arch["max_position_embeddings"]
    pixels = torch.zeros(1, channels, 224, 224, dtype=torch_dtype)
    started = time.perf_counter()
    with torch.no_grad():
        patches = VisionGraph(model).eval()(pixels)
    P = int(patches.shape[1])
    seq = torch.export.Dim("seq", min=2, max=max_pos - P)
    past = torch.export.Dim("past", min=2, max=max_pos - 1)
    specs = {
        "vision": {"file": GRAPH_FILES["vision"],
                   "inputs": {"pixel_values": [1, channels, 224, 224]},
                   "outputs": {"image_embeds": [1, P, H]}},
        "prefill": {"file": GRAPH_FILES["prefill"],
                    "inputs": {"input_ids": [1, "seq"], "image_embeds": [1, P, H]},
                    "outputs": {"logits": [1, V], "present_keys": [L, 1, KV, f"seq+{P}", D],
                                "present_values": [L, 1, KV, f"seq+{P}", D]}},
        "decode": {"file": GRAPH_FILES["decode"],
                   "inputs": {"input_ids": [1, 1], "past_keys": [L, 1, KV, "past", D], "past_values": [L, 1, KV, "past", D]},
                   "outputs": {"logits": [1, V], "present_keys": [L, 1, KV, "past+1", D],
                               "present_values": [L, 1, KV, "past+1", D]}},
    }
    with torch.no_grad():
        if "vision" in graphs:
            _export(VisionGraph(model).eval(), (pixels,), out / GRAPH_FILES["vision"], input_names=["pixel_values"],
                    output_names=["image_embeds"], dynamic_shapes=None, opset=opset, optimize=optimize)
        lm = model.language_model
        if "prefill" in graphs:
            ids = torch.ones(1, _EXAMPLE_SEQ, dtype=torch.long)
            _export(PrefillGraph(lm).eval(), (ids, patches), out / GRAPH_FILES["prefill"],
                    input_names=["input_ids", "image_embeds"], output_names=["logits", "present_keys", "present_values"],
                    dynamic_shapes={"input_ids": {1: seq}, "image_embeds": None}, opset=opset, optimize=optimize)
        if "decode" in graphs:
            ids = torch.ones(1, 1, dtype=torch.long)
            cache = torch.zeros(L, 1, KV, _EXAMPLE_PAST, D, dtype=torch_dtype)
            _export(DecodeGraph(lm).eval(), (ids, cache, cache.clone()), out / GRAPH_FILES["decode"],
                    input_names=["input_ids", "past_keys", "past_values"],
                    output_names=["logits", "present_keys", "present_values"],
                    dynamic_shapes={"input_ids": None, "past_keys": {3: past}, "past_values": {3: past}}, opset=opset, optimize=optimize)
    manifest = build_manifest("onnx", checkpoint, dtype=dtype, graphs={k: specs[k] for k in graphs},
                              extra={"opset": int(opset), "num_patches": P, "optimized": bool(optimize),
                                     "dynamic_axes": {"seq": [2, max_pos - P], "past": [2, max_pos - 1]},
                                     "export_seconds": round(time.perf_counter() - started, 2)})
    return write_manifest(out, manifest)


def add_export_onnx_parser(export_subparsers) -> argparse.ArgumentParser:
    """`openvla-ros export onnx --checkpoint DIR --out engines/NAME [--opset N] [--dtype float32|float16]`."""
    p = export_subparsers.add_parser("onnx", help="export vision, prefill and decode-step ONNX graphs + manifest.json")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (official OpenVLA format)")
    p.add_argument("--out", required=True, help="output directory, e.g. engines/tiny-onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES), help="weight/activation dtype")
    p.add_argument("--no-optimize", action="store_true", help="skip the exporter's graph optimiser (faster export)")
    p.set_defaults(func=cmd_export_onnx)
    return p


def cmd_export_onnx(args) -> int:
    import json

    path = export_onnx(args.checkpoint, args.out, opset=args.opset, dtype=args.dtype, optimize=not args.no_optimize)
    manifest = json.loads(path.read_text())
    print(json.dumps({"out": str(path.parent), "manifest": str(path), "dtype": manifest["dtype"],
                      "opset": manifest["opset"], "checkpoint_fingerprint": manifest["checkpoint"]["fingerprint"],
                      "export_seconds": manifest["export_seconds"]}))
    return 0
