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

# Largest image (width x height) any converter decodes: 4096 x 4096, 48 MiB as RGB. A camera frame
# is far smaller; a compressed frame that declares more is refused from its header, before a byte
# of pixels is allocated (a 187 KB PNG can declare 8000 x 8000 = 192 MB of pixels).
MAX_IMAGE_PIXELS = 4096 * 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...): they carry the frame size.
# 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


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


def check_image_size(width: int, height: int, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """ValueError unless 1 <= width, height and width * height <= max_pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} size must be positive, got {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(f"{what} of {width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels} pixels: refused")


def image_fields_to_rgb(encoding: str, height: int, width: int, step: int, data,
                        max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Pixels of a `sensor_msgs/Image` as a new contiguous HxWx3 uint8 RGB array.

    `step` is the row length in bytes; rows may carry padding after `width * channels` bytes,
    which is skipped. Images of more than `max_pixels` pixels are refused (ValueError).
    """
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(
            f"unsupported image encoding {encoding!r}; supported: {sorted(IMAGE_ENCODINGS)}"
        )
    channels, rgb_index = IMAGE_ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    check_image_size(width, height, f"{encoding} image", max_pixels)
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
    # A strided view of the rows (the last one may omit its padding): nothing is allocated for the
    # padding, however large `step` claims it is.
    flat = np.ascontiguousarray(flat)
    rows = np.lib.stride_tricks.as_strided(flat, shape=(height, row_bytes), strides=(step, 1), writeable=False)
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


def compressed_image_size(buffer: np.ndarray) -> tuple[str, int, int]:
    """(codec, width, height) read from a PNG or JPEG header, without decoding any pixels.

    ValueError when the bytes are neither, or the header is cut short.
    """
    head = buffer[:24].tobytes()
    if head.startswith(_PNG_SIGNATURE):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ValueError(f"PNG of {buffer.size} bytes has no IHDR header")
        return "png", int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head.startswith(b"\xff\xd8"):
        i, size = 2, buffer.size
        while i + 4 <= size:
            if buffer[i] != 0xFF:
                raise ValueError(f"JPEG of {size} bytes: no marker at byte {i}")
            marker = int(buffer[i + 1])
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            length = int(buffer[i + 2]) << 8 | int(buffer[i + 3])
            if marker in _JPEG_SOF_MARKERS:
                if i + 9 > size:
                    break
                height = int(buffer[i + 5]) << 8 | int(buffer[i + 6])
                width = int(buffer[i + 7]) << 8 | int(buffer[i + 8])
                return "jpeg", width, height
            if marker == 0xDA or length < 2:  # scan data before any frame header
                break
            i += 2 + length
        raise ValueError(f"JPEG of {size} bytes has no frame header")
    raise ValueError(f"compressed data of {buffer.size} bytes is neither PNG nor JPEG "
                     f"(starts with {head[:8].hex()})")


def decode_compressed_image(fmt: str, data, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Pixels of a `sensor_msgs/CompressedImage` (jpeg or png) as HxWx3 uint8 RGB.

    The size is read from the header first: images of more than `max_pixels` pixels are refused
    before decoding. Every failure is a ValueError naming the format and the problem.
    """
    import cv2  # imported here: only needed for compressed topics

    buffer = _as_uint8_buffer(data)
    if buffer.size == 0:
        raise ValueError(f"compressed image ({fmt!r}) has no data")
    try:
        codec, width, height = compressed_image_size(buffer)
    except ValueError as exc:
        raise ValueError(f"could not decode compressed image with format {fmt!r} ({buffer.size} bytes): {exc}; "
                         f"supported codecs: {', '.join(COMPRESSED_FORMATS)}") from None
    check_image_size(width, height, f"compressed {codec} image ({fmt!r})", max_pixels)
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV's own checks (corrupt data, its pixel limit) raise cv2.error
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not decode compressed {codec} image with format {fmt!r} "
                         f"({buffer.size} bytes): {reason}") from None
    if decoded is not None and (decoded.ndim != 3 or decoded.shape[2] != 3):
        raise ValueError(f"compressed {codec} image ({fmt!r}) decoded to shape {decoded.shape}, not HxWx3")
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
