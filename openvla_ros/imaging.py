"""Conversion between ROS image messages and HxWx3 uint8 RGB numpy arrays, without ROS.

The functions work on the plain fields of `sensor_msgs/Image` (encoding, height, width, step, data)
and `sensor_msgs/CompressedImage` (format, data), so the same code serves messages deserialised by
`rosbags` (data is a numpy array) and by rclpy (data is an `array.array` or bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# encoding -> (channels, index of R, G, B in a pixel); mono8 repeats its single channel.
IMAGE_ENCODINGS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}

COMPRESSED_FORMATS = ("jpeg", "png")


def _as_uint8_buffer(data) -> np.ndarray:
    """A flat uint8 view of `data` (bytes, bytearray, memoryview, array.array('B'), numpy, list)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"image data must be uint8, got dtype {data.dtype}")
        return data.reshape(-1)
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        values = np.asarray(data)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError("image data holds values outside 0..255") from None
        return values.astype(np.uint8).reshape(-1)


def image_fields_to_rgb(encoding: str, height: int, width: int, step: int, data) -> np.ndarray:
    """Pixels of a `sensor_msgs/Image` as a new contiguous HxWx3 uint8 RGB array.

    `step` is the row length in bytes; rows may carry padding after `width * channels` bytes,
    which is skipped.
    """
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(
            f"unsupported image encoding {encoding!r}; supported: {sorted(IMAGE_ENCODINGS)}"
        )
    channels, rgb_index = IMAGE_ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} ({encoding})")
    row_bytes = width * channels
    if step < row_bytes:
        raise ValueError(
            f"image step {step} is shorter than a {encoding} row of width {width} ({row_bytes} bytes)"
        )
    flat = _as_uint8_buffer(data)
    needed = step * (height - 1) + row_bytes
    if flat.size < needed:
        raise ValueError(
            f"{encoding} image {width}x{height} with step {step} needs {needed} bytes, data has {flat.size}"
        )
    if flat.size < step * height:
        # The last row may legitimately omit its padding; pad so the strided view is rectangular.
        flat = np.concatenate([flat, np.zeros(step * height - flat.size, dtype=np.uint8)])
    rows = flat[: step * height].reshape(height, step)[:, :row_bytes]
    pixels = rows.reshape(height, width, channels)
    return np.ascontiguousarray(pixels[:, :, list(rgb_index)])


@dataclass
class ImageFields:
    """The fields of a `sensor_msgs/Image` (without header), ready to copy into a message."""

    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: np.ndarray  # flat uint8


def validate_rgb(image) -> np.ndarray:
    """`image` as HxWx3 uint8, or ValueError naming the shape/dtype that is wrong."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image must be HxWx3 RGB, got shape {array.shape}")
    return array


def rgb_to_image_fields(rgb, encoding: str = "rgb8", row_padding: int = 0) -> ImageFields:
    """Encode an HxWx3 uint8 RGB array (or HxW for mono8) as `sensor_msgs/Image` fields.

    `row_padding` extra bytes are appended to every row (step = width*channels + row_padding),
    as some camera drivers do.
    """
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(
            f"unsupported image encoding {encoding!r}; supported: {sorted(IMAGE_ENCODINGS)}"
        )
    if row_padding < 0:
        raise ValueError(f"row_padding must be >= 0, got {row_padding}")
    channels, rgb_index = IMAGE_ENCODINGS[encoding]
    array = np.asarray(rgb)
    if encoding == "mono8":
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim != 2 or array.dtype != np.uint8:
            raise ValueError(f"mono8 needs an HxW uint8 array, got shape {array.shape} dtype {array.dtype}")
        pixels = array[:, :, None]
    else:
        array = validate_rgb(array)
        pixels = np.empty(array.shape[:2] + (channels,), dtype=np.uint8)
        for src, dst in enumerate(rgb_index):
            pixels[:, :, dst] = array[:, :, src]
        if channels == 4:
            pixels[:, :, 3] = 255
    height, width = pixels.shape[:2]
    row_bytes = width * channels
    step = row_bytes + row_padding
    rows = np.zeros((height, step), dtype=np.uint8)
    rows[:, :row_bytes] = pixels.reshape(height, row_bytes)
    return ImageFields(height=height, width=width, encoding=encoding, is_bigendian=0, step=step,
                       data=rows.reshape(-1))


def _compressed_is_rgb_ordered(fmt: str) -> bool:
    # compressed_image_transport writes "<src>; <codec> compressed <order>"; bgr8 order (or no
    # order at all) means the codec holds BGR as OpenCV writes it.
    lowered = fmt.lower()
    return "compressed rgb" in lowered


def decode_compressed_image(fmt: str, data) -> np.ndarray:
    """Pixels of a `sensor_msgs/CompressedImage` (jpeg or png) as HxWx3 uint8 RGB."""
    import cv2  # imported here: only needed for compressed topics

    buffer = _as_uint8_buffer(data)
    if buffer.size == 0:
        raise ValueError(f"compressed image ({fmt!r}) has no data")
    decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError(
            f"could not decode compressed image with format {fmt!r} ({buffer.size} bytes); "
            f"supported codecs: {', '.join(COMPRESSED_FORMATS)}"
        )
    if _compressed_is_rgb_ordered(fmt):
        return np.ascontiguousarray(decoded)
    return np.ascontiguousarray(decoded[:, :, ::-1])


def encode_compressed_image(rgb, codec: str = "jpeg", jpeg_quality: int = 95) -> tuple[str, np.ndarray]:
    """(format string, bytes) for a `sensor_msgs/CompressedImage` holding `rgb` (HxWx3 uint8).

    The format string follows compressed_image_transport: ``"rgb8; jpeg compressed bgr8"``.
    """
    import cv2

    if codec not in COMPRESSED_FORMATS:
        raise ValueError(f"unsupported compression codec {codec!r}; supported: {list(COMPRESSED_FORMATS)}")
    if not 0 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 0..100, got {jpeg_quality}")
    array = validate_rgb(rgb)
    bgr = np.ascontiguousarray(array[:, :, ::-1])
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)] if codec == "jpeg" else []
    ok, encoded = cv2.imencode(".jpg" if codec == "jpeg" else ".png", bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} image as {codec}")
    return f"rgb8; {codec} compressed bgr8", encoded.reshape(-1)
