"""What the quantised backends (bnb4/bnb8, int8/int4) quantise, and how many bytes that leaves.

The targets are every nn.Linear inside the Llama decoder layers (and, on request, the projector's
layers); the embedding, the LM head, the norms and the vision towers stay in the load dtype, as in
the reference's QLoRA / 8-bit setups. Each backend's `Quantiser` (see `vla.loading`) swaps a target
for its quantised layer as soon as the target's weights have been read, so loading never holds the
full-precision language model.
"""
from __future__ import annotations

from torch import nn

LANGUAGE_MODEL_PREFIX = "language_model."
PROJECTOR_PREFIX = "projector."


def quantisable_linears(language_model: nn.Module) -> list[str]:
    """Names (relative to the language model) of the linear layers that get quantised:
    every nn.Linear inside the decoder layers; embedding and lm_head stay in full precision."""
    return [name for name, module in language_model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}"]


def quantisation_targets(model: nn.Module, *, projector: bool = False) -> set[str]:
    """Module names (relative to the OpenVLA model) a quantiser replaces."""
    targets = {LANGUAGE_MODEL_PREFIX + name for name in quantisable_linears(model.language_model)}
    if projector:
        targets |= {PROJECTOR_PREFIX + name for name, module in model.projector.named_modules()
                    if isinstance(module, nn.Linear)}
    return targets


class LinearQuantiser:
    """Shared part of the backends' quantisers: the targets and the loaded size of their weights.

    Subclasses set `name`, `weight_bytes_per_element` (packed weight + scales, per element) and
    implement `quantise(module, device)`.
    """

    name = "quantised"
    weight_bytes_per_element = 1.0

    def __init__(self, *, projector: bool = False):
        self.projector = bool(projector)

    def targets(self, model: nn.Module) -> set[str]:
        return quantisation_targets(model, projector=self.projector)

    def bytes_per_weight(self, entry, module_name: str, targets: set[str]) -> float | None:
        if module_name in targets and entry.name.endswith(".weight"):
            return self.weight_bytes_per_element
        return None

    def quantise(self, module: nn.Module, device: str) -> nn.Module:
        raise NotImplementedError
