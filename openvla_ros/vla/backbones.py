"""Vision backbone registry: the timm architectures behind each `vision_backbone_id` of config.json.

The released ids map to the timm models the reference builds (no pretrained download: weights come
from the checkpoint). The `tiny-*` ids are this project's: the same timm architectures (so the same
code paths, weight names, register tokens and LayerScale) shrunk to a few thousand parameters, used
by tests and the laptop demo.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from .preprocess import Normalisation

DINOV2_ARCH = "vit_large_patch14_reg4_dinov2"
SIGLIP_ARCH = "vit_so400m_patch14_siglip_224"
DINO_NORM = Normalisation(IMAGENET_MEAN, IMAGENET_STD)
SIGLIP_NORM = Normalisation(SIGLIP_MEAN, SIGLIP_STD)

# Small sizes for tiny checkpoints: head dims of 16, three blocks (features come from the
# second-to-last one, so at least two are needed).
TINY_DINO_KWARGS = {"embed_dim": 32, "depth": 3, "num_heads": 2, "init_values": 0.1}
TINY_SIGLIP_KWARGS = {"embed_dim": 48, "depth": 3, "num_heads": 3}
# The laptop demo's backbone: 28 px patches (an 8x8 grid, 64 image tokens instead of 256), so a
# training step costs about a third and the same minutes train three times the steps; wider, since
# each token now carries a 28 px cell. A 4-5 cm cube seen from the demo camera still fills most of a cell.
TINY_P28_DINO_KWARGS = {"embed_dim": 48, "depth": 3, "num_heads": 3, "init_values": 0.1, "patch_size": 28}
TINY_P28_SIGLIP_KWARGS = {"embed_dim": 64, "depth": 3, "num_heads": 4, "patch_size": 28}


@dataclass(frozen=True)
class BackboneSpec:
    """One timm model: architecture name, constructor overrides, input normalisation."""

    arch: str
    normalisation: Normalisation
    kwargs: dict = field(default_factory=dict)

    def create(self):
        import timm

        return timm.create_model(self.arch, pretrained=False, num_classes=0, img_size=IMAGE_SIZE, **self.kwargs)


# vision_backbone_id -> (featurizer, fused_featurizer or None)
VISION_BACKBONES: dict[str, tuple[BackboneSpec, BackboneSpec | None]] = {
    "dinosiglip-vit-so-224px": (BackboneSpec(DINOV2_ARCH, DINO_NORM), BackboneSpec(SIGLIP_ARCH, SIGLIP_NORM)),
    "dinov2-vit-l": (BackboneSpec(DINOV2_ARCH, DINO_NORM), None),
    "siglip-vit-so400m": (BackboneSpec(SIGLIP_ARCH, SIGLIP_NORM), None),
    "tiny-dinosiglip-224px": (
        BackboneSpec(DINOV2_ARCH, DINO_NORM, TINY_DINO_KWARGS),
        BackboneSpec(SIGLIP_ARCH, SIGLIP_NORM, TINY_SIGLIP_KWARGS),
    ),
    "tiny-siglip-224px": (BackboneSpec(SIGLIP_ARCH, SIGLIP_NORM, TINY_SIGLIP_KWARGS), None),
    "tiny-dinosiglip-224px-p28": (
        BackboneSpec(DINOV2_ARCH, DINO_NORM, TINY_P28_DINO_KWARGS),
        BackboneSpec(SIGLIP_ARCH, SIGLIP_NORM, TINY_P28_SIGLIP_KWARGS),
    ),
}


def backbone_specs(vision_backbone_id: str, use_fused: bool) -> list[BackboneSpec]:
    """The timm specs for a config's backbone id, checked against `use_fused_vision_backbone`."""
    if vision_backbone_id not in VISION_BACKBONES:
        raise ValueError(f"unknown vision_backbone_id {vision_backbone_id!r}; known: {sorted(VISION_BACKBONES)}")
    first, fused = VISION_BACKBONES[vision_backbone_id]
    if use_fused and fused is None:
        raise ValueError(f"vision_backbone_id {vision_backbone_id!r} is a single backbone but use_fused_vision_backbone is true")
    if not use_fused and fused is not None:
        raise ValueError(f"vision_backbone_id {vision_backbone_id!r} is fused but use_fused_vision_backbone is false")
    return [first] if fused is None else [first, fused]
