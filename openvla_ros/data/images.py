"""Encoded images (JPEG/PNG bytes, as datasets store them) to HxWx3 uint8 RGB.

A standard JPEG or PNG holds RGB pixels: decoded here they come out in that order, whatever the
decoder's native order (OpenCV's is BGR). Some recorders (ACT's HDF5 writer among them) pass RGB
arrays to `cv2.imencode`, which takes them for BGR: their files hold swapped channels, and
``stored="bgr"`` undoes that.
"""
from __future__ import annotations

import numpy as np

STORED_ORDERS = ("rgb", "bgr")


def decode_image_bytes(data, stored: str = "rgb", where: str = "image") -> np.ndarray:
    """HxWx3 uint8 RGB of one encoded image (grey images are repeated over three channels)."""
    import cv2

    if stored not in STORED_ORDERS:
        raise ValueError(f"stored channel order must be one of {STORED_ORDERS}, got {stored!r}")
    buffer = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else \
        np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if buffer.size == 0:
        raise ValueError(f"{where}: empty image buffer")
    decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)  # B, G, R of the file's R, G, B
    if decoded is None:
        raise ValueError(f"{where}: not a decodable image ({buffer.size} bytes)")
    if stored == "bgr":  # the file's "R" holds blue: OpenCV's order is then already RGB
        return np.ascontiguousarray(decoded)
    return np.ascontiguousarray(decoded[:, :, ::-1])


def encode_image_bytes(rgb: np.ndarray, codec: str = "jpeg", quality: int = 95) -> bytes:
    """A standard JPEG/PNG of an HxWx3 uint8 RGB array (what a viewer shows as `rgb`)."""
    import cv2

    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {array.shape} {array.dtype}")
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(codec)
    if ext is None:
        raise ValueError(f"codec must be jpeg or png, got {codec!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(array[:, :, ::-1]), params)
    if not ok:
        raise ValueError(f"could not encode a {array.shape} image as {codec}")
    return buffer.tobytes()
