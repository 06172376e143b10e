"""ROS image fields <-> RGB arrays (openvla_ros.imaging), checked against hand-built buffers."""
from __future__ import annotations

import array

import numpy as np
import pytest

from openvla_ros.imaging import (
    decode_compressed_image,
    encode_compressed_image,
    image_fields_to_rgb,
    rgb_to_image_fields,
)


def _rgb(h=3, w=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_bgra8_with_row_padding_decodes_by_hand_layout():
    rgb = _rgb()
    h, w = rgb.shape[:2]
    step = w * 4 + 5
    buffer = np.full((h, step), 77, dtype=np.uint8)  # padding bytes are 77 and must be ignored
    for y in range(h):
        for x in range(w):
            r, g, b = rgb[y, x]
            buffer[y, 4 * x: 4 * x + 4] = [b, g, r, 9]
    out = image_fields_to_rgb("bgra8", h, w, step, buffer.tobytes())
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("padding", [0, 3])
def test_colour_encodings_round_trip(encoding, padding):
    rgb = _rgb(5, 7, seed=1)
    fields = rgb_to_image_fields(rgb, encoding, row_padding=padding)
    channels = 4 if encoding.endswith("a8") else 3
    assert fields.step == 7 * channels + padding
    assert fields.data.size == fields.step * 5
    # rclpy hands data over as array.array('B'); rosbags as numpy; both must work.
    as_array = array.array("B", fields.data.tobytes())
    np.testing.assert_array_equal(image_fields_to_rgb(encoding, 5, 7, fields.step, as_array), rgb)
    np.testing.assert_array_equal(image_fields_to_rgb(encoding, 5, 7, fields.step, fields.data), rgb)


def test_mono8_repeats_the_grey_value():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    fields = rgb_to_image_fields(grey, "mono8", row_padding=2)
    out = image_fields_to_rgb("mono8", 3, 4, fields.step, fields.data)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_bgr_channel_order_of_a_pure_red_pixel():
    out = image_fields_to_rgb("bgr8", 1, 1, 3, bytes([0, 0, 255]))
    assert out[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("encoding,height,width,step,size,needle", [
    ("yuv422", 2, 2, 4, 8, "yuv422"),
    ("rgb8", 2, 2, 5, 10, "step 5"),
    ("rgb8", 2, 2, 6, 7, "needs 12 bytes"),
    ("rgb8", 0, 2, 6, 0, "2x0"),
])
def test_bad_image_fields_name_the_problem(encoding, height, width, step, size, needle):
    with pytest.raises(ValueError, match=needle):
        image_fields_to_rgb(encoding, height, width, step, bytes(size))


def test_png_round_trip_is_exact_and_rgb_ordered():
    rgb = _rgb(16, 20, seed=2)
    fmt, data = encode_compressed_image(rgb, "png")
    assert fmt == "rgb8; png compressed bgr8"
    np.testing.assert_array_equal(decode_compressed_image(fmt, data), rgb)


def test_jpeg_keeps_colours_in_rgb_order():
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200  # red
    fmt, data = encode_compressed_image(rgb, "jpeg", jpeg_quality=95)
    out = decode_compressed_image(fmt, bytes(data))
    assert abs(int(out[16, 16, 0]) - 200) <= 3 and int(out[16, 16, 2]) <= 3


def test_undecodable_compressed_data_is_a_clear_error():
    with pytest.raises(ValueError, match="could not decode compressed image with format 'jpeg' \\(4 bytes\\)"):
        decode_compressed_image("jpeg", b"\x00\x01\x02\x03")


def test_encoding_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="HxWx3"):
        rgb_to_image_fields(np.zeros((4, 4, 4), dtype=np.uint8), "rgb8")
    with pytest.raises(ValueError, match="uint8"):
        encode_compressed_image(np.zeros((4, 4, 3), dtype=np.float32), "png")
