import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from openvla_ros.vla.backbones import DINO_NORM, SIGLIP_NORM
from openvla_ros.vla.preprocess import center_crop_box, prepare_image, to_pixel_values, validate_image


def test_pixel_values_match_torchvision_pipeline():
    # Independent computation: torchvision's Resize (bicubic, antialias) + ToTensor + Normalize per backbone.
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    ours = to_pixel_values(prepare_image(image), [DINO_NORM, SIGLIP_NORM])
    pil = Image.fromarray(image)
    resized = transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)(pil)
    tensor = transforms.ToTensor()(resized)
    ref = torch.cat([transforms.Normalize(DINO_NORM.mean, DINO_NORM.std)(tensor),
                     transforms.Normalize(SIGLIP_NORM.mean, SIGLIP_NORM.std)(tensor)]).unsqueeze(0)
    assert ours.shape == (1, 6, 224, 224)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_center_crop_keeps_90_percent_area():
    left, top, right, bottom = center_crop_box(1000, 1000)
    assert (right - left) * (bottom - top) == pytest.approx(0.9e6, rel=2e-3)
    assert left == top == (1000 - (right - left)) // 2


def test_rotate_180():
    image = np.zeros((224, 224, 3), np.uint8)
    image[0, 0] = 255
    rotated = np.asarray(prepare_image(image, rotate_180=True))
    assert rotated[223, 223].tolist() == [255, 255, 255] and rotated[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 10), np.uint8), "HxWx3"),
    (np.zeros((10, 10, 4), np.uint8), r"\(10, 10, 4\)"),
    (np.zeros((10, 10, 3), np.float32), "float32"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_image(bad)
