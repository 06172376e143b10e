"""The `json_numpy` wire format of OpenVLA's deploy.py server, without the json_numpy package.

An array travels as `{"__numpy__": base64(raw C-order bytes), "dtype": "<u1", "shape": [H, W, 3]}`
(a numpy scalar has shape `[]`). Clients that cannot patch their JSON library send the whole
payload double-encoded as `{"encoded": "<json text>"}`. Only plain numeric dtypes are accepted:
nothing is unpickled and object/structured dtypes are refused.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

NUMPY_KEY = "__numpy__"
ENCODED_KEY = "encoded"
# Kinds decodable from raw bytes without code execution: bool, (u)int, float, complex.
_SAFE_KINDS = "biufc"
MAX_DIMS = 32  # numpy's own limit is 64; no image or action has more than a handful
_INT64_MAX = 2**63 - 1


class JsonNumpyError(ValueError):
    """A json_numpy object that cannot be decoded (bad base64, dtype, shape or size)."""


def encode_array(array) -> dict:
    """An ndarray or numpy scalar as a json_numpy object."""
    array = np.asarray(array)
    if array.dtype.kind not in _SAFE_KINDS:
        raise JsonNumpyError(f"cannot encode dtype {array.dtype} (only bool/int/float/complex)")
    return {NUMPY_KEY: base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
            "dtype": array.dtype.str, "shape": list(array.shape)}


def is_encoded_array(value) -> bool:
    return isinstance(value, dict) and NUMPY_KEY in value


def decode_array(obj: dict, *, max_bytes: int | None = None) -> np.ndarray:
    """A json_numpy object back to an ndarray (a 0-d array for scalars). Raises JsonNumpyError."""
    if not is_encoded_array(obj):
        raise JsonNumpyError(f"not a json_numpy object (no {NUMPY_KEY!r} key)")
    data, dtype_text, shape = obj.get(NUMPY_KEY), obj.get("dtype"), obj.get("shape")
    if not isinstance(data, str):
        raise JsonNumpyError(f"{NUMPY_KEY} must be a base64 string, got {type(data).__name__}")
    if not isinstance(dtype_text, str):
        raise JsonNumpyError(f"dtype must be a string like '<u1', got {dtype_text!r}")
    try:
        dtype = np.dtype(dtype_text)
    except TypeError:
        raise JsonNumpyError(f"unknown dtype {dtype_text!r}") from None
    if dtype.kind not in _SAFE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise JsonNumpyError(f"dtype {dtype_text!r} is not a plain numeric dtype")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise JsonNumpyError(f"shape must be a list of non-negative integers, got {shape!r:.200}")
    if len(shape) > MAX_DIMS:
        raise JsonNumpyError(f"shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    count = math.prod(shape)  # Python integers: a product beyond int64 is an error below, never a wrap-around
    if max_bytes is not None and count * dtype.itemsize > max_bytes:
        raise JsonNumpyError(f"array of shape {list(shape)} and dtype {dtype_text} exceeds {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise JsonNumpyError(f"{NUMPY_KEY} is not valid base64") from None
    if len(raw) != count * dtype.itemsize or any(n > _INT64_MAX for n in shape):
        raise JsonNumpyError(f"{len(raw)} bytes of data for shape {list(shape)} and dtype {dtype_text} "
                             f"(expected {count * dtype.itemsize})")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _default(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        return encode_array(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(value: Any, **kwargs) -> str:
    """json.dumps that writes numpy arrays and scalars as json_numpy objects."""
    return json.dumps(value, default=_default, **kwargs)


def _hook(obj: dict):
    return decode_array(obj) if NUMPY_KEY in obj else obj


def loads(text: str | bytes) -> Any:
    """json.loads that turns json_numpy objects back into arrays (numpy scalars for shape [])."""
    value = json.loads(text, object_hook=_hook)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value
