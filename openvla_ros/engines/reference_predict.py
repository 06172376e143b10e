"""A faithful re-run of OpenVLA's own `predict_action` (its Hugging Face modeling code, greedy
`generate()`), on this project's loaded weights: the yardstick for this engine's speed.

What the reference does per action, and this re-run repeats step for step:
- the vision towers run through every block: its patched `get_intermediate_layers(n={len - 2})`
  (timm 0.9) walks all blocks and keeps the second-to-last one's output;
- the first forward pass (prefill) projects the patches, splices them after BOS, and runs the
  language model on the whole multimodal sequence with an all-ones attention mask, computing the
  logits of every position (its forward passes no `logits_to_keep`);
- each later step feeds the last token with the key/value cache (a DynamicCache grown by
  concatenation) and an attention mask grown by one column, as `generate()` does, and takes the
  argmax of the last logits; exactly K*D new tokens (no EOS stop).
The weights, the timm/transformers modules and their kernels are the engine's own, so the tokens
must equal the engine's in float32 (checked by the benchmark).
"""
from __future__ import annotations

import torch


def _all_blocks_features(vit, pixels: torch.Tensor) -> torch.Tensor:
    index = len(vit.blocks) - 2
    (features,) = vit.forward_intermediates(pixels, indices=[index], norm=False, output_fmt="NLC",
                                            intermediates_only=True, stop_early=False)
    return features


def reference_vision(backbone, pixel_values: torch.Tensor) -> torch.Tensor:
    if backbone.fused_featurizer is None:
        return _all_blocks_features(backbone.featurizer, pixel_values)
    first = _all_blocks_features(backbone.featurizer, pixel_values[:, :3])
    fused = _all_blocks_features(backbone.fused_featurizer, pixel_values[:, 3:])
    return torch.cat([first, fused], dim=2)


@torch.inference_mode()
def reference_predict_tokens(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, n_tokens: int) -> list[int]:
    """The K*D greedy action tokens as predict_action computes them (see the module docstring)."""
    lm = model.language_model
    patches = model.projector(reference_vision(model.vision_backbone, pixel_values))
    text = lm.get_input_embeddings()(input_ids)
    embeds = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    generated = input_ids
    cache = out.past_key_values
    for step in range(n_tokens):
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated = torch.cat([generated, token], dim=1)
        if step == n_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        out = lm(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return generated[0, -n_tokens:].tolist()
