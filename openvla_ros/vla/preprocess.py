"""Image preprocessing exactly as the OpenVLA image processor does it.

`resize-naive`: a plain bicubic resize (PIL, antialiased) of the RGB image to 224x224, then one
normalisation per vision backbone, stacked on the channel axis ([1, 6, 224, 224] for DINOv2+SigLIP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .constants import CENTER_CROP_AREA, IMAGE_SIZE, MIN_IMAGE_SIDE

RESIZE_STRATEGIES = ("resize-naive",)


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def validate_image(image) -> np.ndarray:
    """Return `image` as a contiguous HxWx3 uint8 RGB array, or raise ValueError saying what is wrong."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (HxWx3 uint8 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape HxWx3 (RGB), got {image.shape}")
    if image.shape[0] < MIN_IMAGE_SIDE or image.shape[1] < MIN_IMAGE_SIDE:
        raise ValueError(f"image is too small: {image.shape} (at least {MIN_IMAGE_SIDE} px per side)")
    return np.ascontiguousarray(image)


def center_crop_box(width: int, height: int, area: float = CENTER_CROP_AREA) -> tuple[int, int, int, int]:
    """Box (left, top, right, bottom) of the centred crop keeping `area` of the image area."""
    if not 0.0 < area <= 1.0:
        raise ValueError(f"crop area must be in (0, 1], got {area}")
    scale = math.sqrt(area)
    crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def prepare_image(image, *, center_crop: bool = False, rotate_180: bool = False,
                  size: int = IMAGE_SIZE) -> Image.Image:
    """Validated, optionally rotated/cropped, resized RGB PIL image (the model's view of the scene)."""
    array = validate_image(image)
    if rotate_180:  # cameras mounted upside down
        array = np.ascontiguousarray(array[::-1, ::-1])
    pil = Image.fromarray(array, mode="RGB")
    if center_crop:
        # The reference crops the central 90% of the area and resizes back; cropping the same
        # relative region before the single resize below keeps one resampling step.
        pil = pil.crop(center_crop_box(*pil.size))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    return pil


def to_pixel_values(image: Image.Image, normalisations: Sequence[Normalisation]) -> torch.Tensor:
    """[1, 3*len(normalisations), H, W] float32 tensor: the image normalised once per backbone."""
    base = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    planes = []
    for norm in normalisations:
        mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
        planes.append((base - mean) / std)
    return torch.cat(planes, dim=0).unsqueeze(0)
