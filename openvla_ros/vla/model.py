"""The OpenVLA network as nn.Modules with the checkpoint's weight names, and strict loading.

Top-level names match the released checkpoint: `vision_backbone.featurizer` (+ `fused_featurizer`),
`projector.fc1..fc3`, `language_model` (a transformers LlamaForCausalLM). timm's LayerScale `gamma`
is stored as `scale_factor` in checkpoints; the rename happens here in both directions.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbones import backbone_specs
from .checkpoint import Checkpoint, CheckpointConfig, CheckpointError

LAYERSCALE_STORED = "scale_factor"
LAYERSCALE_TIMM = "gamma"
PROJECTOR_ARCHS = {"fused-gelu-mlp": 3, "gelu-mlp": 2}


class VisionBackbone(nn.Module):
    """One or two timm ViTs; patch features of the second-to-last block, concatenated on channels."""

    def __init__(self, specs):
        super().__init__()
        self.specs = list(specs)
        self.featurizer = self.specs[0].create()
        self.fused_featurizer = self.specs[1].create() if len(self.specs) > 1 else None

    @property
    def embed_dim(self) -> int:
        dims = [self.featurizer.embed_dim]
        if self.fused_featurizer is not None:
            dims.append(self.fused_featurizer.embed_dim)
        return sum(dims)

    @staticmethod
    def _patch_features(vit, pixels: torch.Tensor) -> torch.Tensor:
        # Output of block len-2 (0-based), un-normalised, prefix/register tokens stripped: what the
        # reference's get_intermediate_layers(n={len(blocks) - 2}) returns. stop_early skips the last block.
        index = len(vit.blocks) - 2
        (features,) = vit.forward_intermediates(pixels, indices=[index], norm=False, output_fmt="NLC",
                                                intermediates_only=True, stop_early=True)
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fused_featurizer is None:
            return self._patch_features(self.featurizer, pixel_values)
        first = self._patch_features(self.featurizer, pixel_values[:, :3])
        fused = self._patch_features(self.fused_featurizer, pixel_values[:, 3:])
        return torch.cat([first, fused], dim=2)


class Projector(nn.Module):
    """GELU MLP from vision features to LLM embeddings (3 layers fused, 2 layers single)."""

    def __init__(self, vision_dim: int, llm_dim: int, n_layers: int):
        super().__init__()
        if n_layers == 3:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        elif n_layers == 2:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
            self.fc3 = None
        else:
            raise ValueError(f"projector must have 2 or 3 layers, got {n_layers}")
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act(self.fc1(x)))
        if self.fc3 is not None:
            x = self.fc3(self.act(x))
        return x


def projector_layers(arch_specifier: str) -> int:
    """Layer count from `arch_specifier` (e.g. "no-align+fused-gelu-mlp")."""
    kind = arch_specifier.split("+")[-1]
    if kind not in PROJECTOR_ARCHS:
        raise ValueError(f"unsupported arch_specifier {arch_specifier!r}; projector must be one of {sorted(PROJECTOR_ARCHS)}")
    return PROJECTOR_ARCHS[kind]


def llama_config(text_config: dict):
    from transformers import LlamaConfig

    fields = {k: v for k, v in text_config.items() if k not in ("model_type", "architectures", "torch_dtype", "dtype")}
    return LlamaConfig(**fields)


class OpenVLAModel(nn.Module):
    """vision_backbone + projector + language_model, named as in the released checkpoint."""

    def __init__(self, config: CheckpointConfig):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.vision_backbone = VisionBackbone(backbone_specs(config.vision_backbone_id, config.use_fused_vision_backbone))
        text = llama_config(config.text_config)
        self.projector = Projector(self.vision_backbone.embed_dim, text.hidden_size, projector_layers(config.arch_specifier))
        self.language_model = LlamaForCausalLM(text)

    @property
    def normalisations(self):
        return [spec.normalisation for spec in self.vision_backbone.specs]

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict with the checkpoint's names (LayerScale gamma -> scale_factor)."""
        return {to_stored_name(k): v for k, v in self.state_dict().items()}


def to_stored_name(name: str) -> str:
    if name.startswith("vision_backbone.") and name.endswith(f".{LAYERSCALE_TIMM}"):
        return name[: -len(LAYERSCALE_TIMM)] + LAYERSCALE_STORED
    return name


def to_module_name(name: str) -> str:
    if name.startswith("vision_backbone.") and name.endswith(f".{LAYERSCALE_STORED}"):
        return name[: -len(LAYERSCALE_STORED)] + LAYERSCALE_TIMM
    return name


def _name_list(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_config_fits(config: CheckpointConfig, dtype: torch.dtype, available: int | None = None,
                      device: str = "cpu") -> int:
    """The language model's weight bytes in `dtype` estimated from the config alone;
    InsufficientMemoryError when they cannot fit the memory available on `device` (measured unless
    given). Runs before anything is built: nn.Linear allocates each weight before accelerate moves
    it to the meta device, so a config too large for the machine must not get that far."""
    from .loading import check_fits, suggestions_for

    need = config.estimated_llm_bytes(torch.empty((), dtype=dtype).element_size())
    check_fits(need, device=device, what=f"in {str(dtype).removeprefix('torch.')}", available=available,
               suggestions=suggestions_for(dtype))
    return need


def load_model(checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantiser=None, check_memory: bool = True, available_bytes: int | None = None,
               on_quantised=None) -> OpenVLAModel:
    """Build the network without allocating weights, then stream every stored tensor into it (strictly).

    A missing or unexpected weight, or a shape mismatch, raises CheckpointError listing the names
    before any weight is read; so does a model that does not fit the memory available on `device`
    in `dtype` (InsufficientMemoryError, with what to choose instead; `available_bytes` overrides
    the probe). Weights go straight to `device` one tensor at a time (see `vla.loading`); a
    `quantiser` replaces its target layers as soon as each has arrived.
    """
    from accelerate import init_empty_weights

    from .loading import (check_fits, load_streamed, suggestions_for, tensor_entries, weight_bytes)

    if check_memory and quantiser is None:  # quantised layers take less than the dtype: checked below
        check_config_fits(checkpoint.config, dtype, available_bytes, device)
    # Parameters are created on the meta device; buffers (e.g. rotary inv_freq) stay real and fp32.
    with init_empty_weights(include_buffers=False):
        model = OpenVLAModel(checkpoint.config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    entries = tensor_entries(checkpoint)
    stored = {}
    for entry in entries:
        name = to_module_name(entry.name)
        if name in expected and expected[name] != entry.shape:
            raise CheckpointError(f"weight {entry.name} has shape {entry.shape}, the config "
                                  f"implies {expected[name]}")
        stored[name] = entry
    missing = set(expected) - set(stored)
    unexpected = set(stored) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights ({len(missing)}): {_name_list(to_stored_name(n) for n in missing)}")
        if unexpected:
            parts.append(f"unexpected weights ({len(unexpected)}): {_name_list(to_stored_name(n) for n in unexpected)}")
        raise CheckpointError(f"checkpoint {checkpoint.path} does not match its config: " + "; ".join(parts))
    if check_memory:
        per_weight = None
        if quantiser is not None:
            targets = quantiser.targets(model)

            def per_weight(entry):
                return quantiser.bytes_per_weight(entry, to_module_name(entry.name).rpartition(".")[0], targets)
        what = f"as {quantiser.name}" if quantiser is not None else f"in {str(dtype).removeprefix('torch.')}"
        check_fits(weight_bytes(entries, dtype, per_weight), device=device, what=what, available=available_bytes,
                   suggestions=suggestions_for(dtype) if quantiser is None else "use a smaller model or another device")
    load_streamed(model, entries, dtype=dtype, device=device, rename=to_module_name, quantiser=quantiser,
                  on_quantised=on_quantised)
    return model.eval()
