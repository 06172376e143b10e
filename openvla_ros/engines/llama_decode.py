"""Greedy decoding over a transformers Llama with a preallocated KV cache and no per-step framework work.

The weights, the attention function and every numerical op are transformers' own (same kernels in
the same order), so the tokens equal those of `generate()`; what is left out is the per-step
overhead of the generic path: causal-mask construction, cache re-allocation (torch.cat on every
step), logits processors and stopping criteria. The cache is a fixed buffer per layer, which is also
what a CUDA graph of the decode step needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:
    # Same ops as LlamaRMSNorm.forward: variance in float32, cast back before the weight.
    dtype = hidden.dtype
    h32 = hidden.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    h32 = h32 * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * h32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(layer, x):
    return F.linear(x, layer.weight, layer.bias)


class LlamaGreedyDecoder:
    """Prefill + one-token steps over a `LlamaForCausalLM` (single sequence, batch 1)."""

    def __init__(self, causal_lm, max_len: int):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        self.lm = causal_lm
        decoder = causal_lm.model
        cfg = causal_lm.config
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        self.embed = causal_lm.get_input_embeddings()
        self.head = causal_lm.lm_head
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager_attention_forward)
        self.max_len = int(max_len)
        weight = self.embed.weight
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = cfg.num_key_value_heads
        shape = (1, kv_heads, self.max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        positions = torch.arange(self.max_len, device=weight.device).unsqueeze(0)
        probe = torch.empty(1, 1, 1, dtype=weight.dtype, device=weight.device)
        # cos/sin are computed per position independently, so one table equals per-call values.
        self.cos, self.sin = decoder.rotary_emb(probe, position_ids=positions)
        self.length = 0

    def _stack(self, hidden: torch.Tensor) -> torch.Tensor:
        start, n = self.length, hidden.shape[1]
        end = start + n
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the decoder's cache of {self.max_len}")
        cos = self.cos[:, start:end].unsqueeze(1)
        sin = self.sin[:, start:end].unsqueeze(1)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = _rms_norm(layer.input_layernorm, hidden)
            shape = (1, n, -1, attn.head_dim)
            q = _linear(attn.q_proj, x).view(shape).transpose(1, 2)
            k = _linear(attn.k_proj, x).view(shape).transpose(1, 2)
            v = _linear(attn.v_proj, x).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self.keys[index][:, :, start:end] = k
            self.values[index][:, :, start:end] = v
            out, _ = self.attention(attn, q, self.keys[index][:, :, :end], self.values[index][:, :, :end], None,
                                    dropout=0.0, scaling=attn.scaling)
            hidden = residual + _linear(attn.o_proj, out.reshape(1, n, -1).contiguous())
            residual = hidden
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            hidden = residual + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
        self.length = end
        return _rms_norm(self.norm, hidden)

    def prefill(self, embeds: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Run the whole prompt (input embeddings [1, T, H]); returns the next greedy token [1, 1]
        (among the ids lo..hi when `window` = (lo, hi) is given)."""
        self.length = 0
        hidden = self._stack(embeds)
        return greedy(_linear(self.head, hidden[:, -1:, :]), window)

    def step(self, token: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Feed one token [1, 1]; returns the next greedy token [1, 1] (within `window` if given)."""
        return greedy(_linear(self.head, self._stack(self.embed(token))), window)


def greedy(logits: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
    """argmax over the last axis, or over the ids lo..hi (inclusive) only: the rest masked out."""
    if window is None:
        return logits.argmax(dim=-1)
    lo, hi = window
    return logits[..., lo:hi + 1].argmax(dim=-1) + lo
