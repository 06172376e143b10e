"""`remote` backend: an HTTP client for a server speaking OpenVLA's deploy.py `/act` protocol.

Works against deploy.py itself (answer: a bare json_numpy action; no /info, so the dims and the
control period come from the arguments or the release defaults) and against `openvla-ros serve`
(asked for `"return_chunk": true`, which deploy.py ignores, it also returns K x D chunks, tokens
and server timings; /info supplies dims, dt and unnorm keys). Standard library only (http.client).
A forced prefix travels as the optional `forced_prefix` field, only to servers whose /info says
`supports_forced_prefix` (deploy.py would ignore it and answer a chunk on the wrong timeline).

Transport failures (refused/reset connections, timeouts, 502/503/504) are retried with exponential
back-off; answers that are errors (`{"error": ...}`, deploy.py's bare `"error"`, 4xx/500, non-JSON)
are not retried and raise `RemoteEngineError` with the server's message.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import socket
import threading
import time
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from ..vla.constants import DEFAULT_ACTION_DIM_NAMES, DEFAULT_CONTROL_PERIOD_S
from . import json_numpy
from .base import ActionChunk, check_forced_prefix

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = (502, 503, 504)
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 0.2
DEFAULT_BACKOFF_MAX_S = 5.0


class RemoteEngineError(ValueError):
    """The server could not be reached, refused the request or answered something unusable."""


class _Transient(Exception):
    """A failure worth retrying (connection trouble, timeout, 502/503/504)."""


def backoff_delays(retries: int, base_s: float, max_s: float) -> list[float]:
    """Seconds to wait before retry 1..retries: base, 2*base, 4*base, ... capped at max_s."""
    return [min(max_s, base_s * 2 ** i) for i in range(retries)]


def parse_server_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path) of `http[s]://host[:port][/prefix]`; a trailing /act is dropped."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"remote engine needs a server URL like http://127.0.0.1:8000, got {url!r}")
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"server URL {url!r} must use http or https")
    if not parts.hostname:
        raise ValueError(f"server URL {url!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"server URL {url!r} has an invalid port") from None
    base = parts.path.rstrip("/")
    if base.endswith("/act"):
        base = base[: -len("/act")]
    return parts.scheme, parts.hostname, port, base


def _decode_answer(raw: bytes):
    """JSON answer -> Python value; a JSON string holding JSON (deploy.py's 'encoded' reply) is unwrapped."""
    try:
        value = json_numpy.loads(raw)
    except ValueError as exc:
        raise RemoteEngineError(f"server answered non-JSON ({exc}): {raw[:200]!r}") from None
    if isinstance(value, str):
        if value.strip().lower() == "error":
            raise RemoteEngineError("server answered 'error' (deploy.py's reply to any failure; see the server's log)")
        try:
            value = json_numpy.loads(value)
        except ValueError:
            raise RemoteEngineError(f"server answered a string that is not an action: {value[:200]!r}") from None
    if isinstance(value, dict) and "error" in value:
        field = f" (field {value['field']!r})" if value.get("field") else ""
        raise RemoteEngineError(f"server error{field}: {value['error']}")
    return value


class RemoteEngine:
    """`Engine` backend that sends each observation to a `/act` server."""

    name = "remote"

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                 backoff_max_s: float = DEFAULT_BACKOFF_MAX_S, unnorm_key: str | None = None,
                 dim_names=None, dt: float | None = None, encoded: bool = False, fetch_info: bool = True,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.perf_counter):
        self.scheme, self.host, self.port, self.base_path = parse_server_url(url)
        self.url = f"{self.scheme}://{self.host}:{self.port}{self.base_path}"
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not (math.isfinite(backoff_s) and backoff_s >= 0 and math.isfinite(backoff_max_s) and backoff_max_s >= 0):
            raise ValueError(f"back-off must be finite and >= 0, got base {backoff_s}, max {backoff_max_s}")
        self.token = token
        self.timeout_s = float(timeout_s)
        self.delays = backoff_delays(retries, backoff_s, backoff_max_s)
        self.encoded = bool(encoded)
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()  # one request at a time on the shared keep-alive connection
        self._conn: http.client.HTTPConnection | None = None
        self.server_info: dict | None = self.fetch_info() if fetch_info else None
        info = self.server_info or {}
        self.dim_names = list(dim_names) if dim_names is not None else list(info.get("dims") or DEFAULT_ACTION_DIM_NAMES)
        self.dt = float(dt) if dt is not None else float(info.get("dt") or DEFAULT_CONTROL_PERIOD_S)
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {self.dt}")
        self.chunk_len = int(info.get("chunk_len") or 1)
        self.supports_forced_prefix = bool(info.get("supports_forced_prefix", False))
        unnorm_keys = info.get("unnorm_keys")
        if unnorm_key is not None and unnorm_keys is not None and unnorm_key not in unnorm_keys:
            raise ValueError(f"unnorm_key {unnorm_key!r} is not known to the server at {self.url}; available: {unnorm_keys}")
        self.unnorm_key = unnorm_key

    # HTTP ----------------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn = self._connection()
            conn.request(method, self.base_path + path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            if response.getheader("Connection", "").lower() == "close" or response.will_close:
                self._close()
        except (socket.timeout, TimeoutError) as exc:
            self._close()
            raise _Transient(f"timed out after {self.timeout_s} s ({exc})") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            self._close()
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        if response.status in RETRYABLE_STATUS:
            raise _Transient(f"HTTP {response.status}: {data[:200]!r}")
        return response.status, data

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One HTTP exchange with retries and back-off; raises RemoteEngineError when all attempts fail."""
        attempts = len(self.delays) + 1
        with self._lock:
            for attempt in range(attempts):
                try:
                    return self._once(method, path, body)
                except _Transient as exc:
                    if attempt == attempts - 1:
                        raise RemoteEngineError(f"{method} {self.url}{path} failed after {attempts} attempt(s): {exc}") from None
                    delay = self.delays[attempt]
                    logger.warning("%s %s%s: %s; retry %d/%d in %.2f s", method, self.url, path, exc,
                                   attempt + 1, len(self.delays), delay)
                    self._sleep(delay)
        raise AssertionError("unreachable")

    def fetch_info(self) -> dict | None:
        """The server's /info, or None when it has none (deploy.py answers 404)."""
        status, data = self.request("GET", "/info")
        if status == 404:
            return None
        if status == 401:
            raise RemoteEngineError(f"server at {self.url} refused the token (HTTP 401)")
        if status != 200:
            logger.warning("GET %s/info answered HTTP %d; using default dims", self.url, status)
            return None
        try:
            info = json.loads(data)
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    # Engine protocol -----------------------------------------------------------------------------
    def info(self) -> dict:
        server = self.server_info or {}
        return {"engine": self.name, "url": self.url, "dims": self.dim_names, "dt": self.dt, "chunk_len": self.chunk_len,
                "unnorm_keys": server.get("unnorm_keys"), "unnorm_key": self.unnorm_key,
                "server_engine": server.get("engine"), "checkpoint": server.get("checkpoint"),
                "checkpoint_fingerprint": server.get("checkpoint_fingerprint")}

    def payload(self, image: np.ndarray, instruction: str, unnorm_key: str | None,
                forced_prefix: np.ndarray | None = None) -> bytes:
        """The request body: deploy.py's fields (+ return_chunk, which deploy.py ignores, and a
        non-empty forced prefix)."""
        fields = {"image": json_numpy.encode_array(image), "instruction": instruction, "return_chunk": True}
        if unnorm_key is not None:
            fields["unnorm_key"] = unnorm_key
        if forced_prefix is not None and np.size(forced_prefix):
            fields["forced_prefix"] = json_numpy.encode_array(np.asarray(forced_prefix, dtype=np.float64))
        if self.encoded:
            return json.dumps({json_numpy.ENCODED_KEY: json.dumps(fields)}).encode()
        return json.dumps(fields).encode()

    def predict(self, image: np.ndarray, instruction: str, *, stamp: float = 0.0,
                unnorm_key: str | None = None, forced_prefix: np.ndarray | None = None,
                prefix_soft_bins: int | None = None) -> ActionChunk:
        if prefix_soft_bins is not None:
            raise ValueError(f"prefix_soft_bins={prefix_soft_bins!r}: the /act protocol carries a forced prefix only, "
                             "not the soft variant; use forcing or a local engine")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        prefix = check_forced_prefix(forced_prefix, self.chunk_len, len(self.dim_names))
        forced_steps = int(prefix.shape[0])
        if forced_steps and not self.supports_forced_prefix:
            raise ValueError(f"the server at {self.url} does not support forced_prefix (its /info does not say "
                             "supports_forced_prefix: deploy.py, an older openvla-ros serve or an engine without it)")
        key = unnorm_key if unnorm_key is not None else self.unnorm_key
        t0 = self._clock()
        body = self.payload(image, instruction, key, prefix)
        status, data = self.request("POST", "/act", body)
        t1 = self._clock()
        value = _decode_answer(data)
        if status != 200:
            raise RemoteEngineError(f"POST {self.url}/act answered HTTP {status}: {data[:200]!r}")
        chunk = self._to_chunk(value, stamp=stamp, unnorm_key=key)
        if chunk.forced_steps != forced_steps:
            raise RemoteEngineError(f"asked the server to force {forced_steps} step(s), it answered with "
                                    f"forced_steps = {chunk.forced_steps}; refusing a chunk on the wrong timeline")
        chunk.timings_ms["request"] = (t1 - t0) * 1e3
        chunk.timings_ms["total"] = (self._clock() - t0) * 1e3
        return chunk

    def _to_chunk(self, value, *, stamp: float, unnorm_key: str | None) -> ActionChunk:
        extras: dict = {}
        if isinstance(value, dict) and "action" in value:  # openvla-ros serve with return_chunk
            extras, value = value, value["action"]
        try:
            actions = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise RemoteEngineError(f"server answer is not a numeric action: {str(value)[:200]}") from None
        dims = list(extras.get("dims") or self.dim_names)
        actions = actions.reshape(-1, actions.shape[-1]) if actions.ndim >= 1 else actions.reshape(1, 1)
        if actions.shape[1] != len(dims):
            raise RemoteEngineError(f"server sent actions of shape {list(actions.shape)}, expected {len(dims)} dims {dims}")
        if not np.all(np.isfinite(actions)):
            raise RemoteEngineError(f"server sent a non-finite action {actions.tolist()}")
        server_timings = {f"server_{k}": float(v) for k, v in (extras.get("timings_ms") or {}).items()
                          if isinstance(v, (int, float))}
        tokens = extras.get("tokens")
        normalised = extras.get("normalised")
        dt = float(extras.get("dt") or self.dt)
        forced_steps = extras.get("forced_steps") or 0
        if not isinstance(forced_steps, int) or forced_steps < 0:
            raise RemoteEngineError(f"server sent forced_steps {forced_steps!r}, expected an integer >= 0")
        forced_tokens = extras.get("forced_tokens")
        # The server decoded from its own stamp; the free actions start forced_steps*dt after ours.
        return ActionChunk(actions=actions, dim_names=dims, dt=dt, stamp=stamp + forced_steps * dt,
                           tokens=np.asarray(tokens, dtype=np.int64) if tokens else None,
                           normalised=np.asarray(normalised, dtype=np.float64) if normalised is not None else None,
                           timings_ms=server_timings, unnorm_key=extras.get("unnorm_key", unnorm_key),
                           forced_steps=forced_steps,
                           forced_tokens=np.asarray(forced_tokens, dtype=np.int64) if forced_tokens else None)


def add_remote_options(parser: argparse.ArgumentParser) -> None:
    """Options of `--engine remote` (predict, eval, serve-as-proxy): --url, --token, --timeout, --retries."""
    parser.add_argument("--url", default=None, help="remote engine: server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--remote-token", default=None, help="remote engine: bearer token (default: $OPENVLA_ROS_TOKEN)")
    parser.add_argument("--remote-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="remote engine: seconds per request")
    parser.add_argument("--remote-retries", type=int, default=DEFAULT_RETRIES, help="remote engine: retries on transport errors")


def remote_options_from_args(args) -> dict:
    """create_engine options for the remote backend from `add_remote_options` arguments."""
    import os

    token = getattr(args, "remote_token", None) or os.environ.get("OPENVLA_ROS_TOKEN") or None
    return {"url": args.url, "token": token, "timeout_s": args.remote_timeout, "retries": args.remote_retries}


def create_remote_engine(checkpoint=None, *, url: str | None = None, device: str | None = None,
                         dtype: str | None = None, center_crop: bool = False, rotate_180: bool = False,
                         **options) -> RemoteEngine:
    """ENGINE_FACTORIES entry: the URL comes from `url=` (or a checkpoint argument that is a URL).

    Preprocessing options belong to the server (start it with --center-crop/--rotate-180);
    device/dtype are the server's too, so only their local defaults are accepted here.
    """
    if url is None and isinstance(checkpoint, str) and checkpoint.startswith(("http://", "https://")):
        url = checkpoint
    if url is None:
        raise ValueError("the remote engine needs --url (the /act server's base URL, e.g. http://127.0.0.1:8000)")
    if center_crop or rotate_180:
        raise ValueError("center_crop/rotate_180 are applied by the server for the remote engine; "
                         "start `openvla-ros serve` with --center-crop/--rotate-180 instead")
    if device not in (None, "cpu") or dtype not in (None, "float32"):
        raise ValueError(f"device/dtype ({device!r}, {dtype!r}) are chosen by the server for the remote engine; "
                         "pass them to `openvla-ros serve`")
    return RemoteEngine(url, **options)
