"""An HTTP `/act` server for any Engine, compatible with clients of OpenVLA's deploy.py.

    POST /act   {"image": <json_numpy uint8 HxWx3 | nested list>, "instruction": str,
                 "unnorm_key": optional str, "return_chunk": optional bool,
                 "forced_prefix": optional json_numpy | nested list (P, D) committed actions}
                or {"encoded": "<the same object as JSON text>"}
       -> the action as a json_numpy float64 array ((D,) for K = 1, (K, D) for chunks), exactly
          like deploy.py (a JSON string holding json_numpy text for the "encoded" form); with
          "return_chunk": true an object with the action and the chunk's metadata (dims, dt,
          tokens, timings) that `RemoteEngine` reads. With "forced_prefix" (engines that support
          it) the answer holds the K-P actions after the committed ones (see Engine.predict).
    GET /health -> {"status": "ok"}          GET /info -> engine.info() + server limits

Unlike the reference: malformed requests get 4xx `{"error": "...", "field": "..."}` naming the
field, the body size and image size are bounded, an optional bearer token is enforced (on /act and
/info; /health stays open for probes), nothing is unpickled, and one lock serialises engine calls
(requests are parsed concurrently). Default bind address is loopback.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from . import json_numpy
from .base import check_forced_prefix, supports_forced_prefix

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a 1080p image as a nested JSON list fits
# An oversized body up to this multiple of the limit is read and dropped before the 413 answer.
DRAIN_FACTOR = 16
DEFAULT_MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 2000
ACT_FIELDS = ("image", "instruction", "unnorm_key", "return_chunk", "forced_prefix")
# Committed actions are a few steps of a few dims; this bounds the decoded array long before that matters.
MAX_FORCED_PREFIX_BYTES = 1 << 16


class RequestError(ValueError):
    """A request the server refuses: HTTP status, the offending field (or None) and a message."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.field = field

    def body(self) -> dict:
        body = {"error": str(self)}
        if self.field is not None:
            body["field"] = self.field
        return body


@dataclass
class ActRequest:
    image: np.ndarray  # HxWx3 uint8
    instruction: str
    unnorm_key: str | None
    return_chunk: bool
    double_encoded: bool
    forced_prefix: np.ndarray | None = None  # (P, D) float64 committed actions, or None


def _forced_prefix_from_field(value) -> np.ndarray | None:
    """The optional `forced_prefix` field as a float64 array (shape checks need the engine: `ActService`)."""
    if value is None:
        return None
    if json_numpy.is_encoded_array(value):
        try:
            prefix = json_numpy.decode_array(value, max_bytes=MAX_FORCED_PREFIX_BYTES)
        except json_numpy.JsonNumpyError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"forced_prefix: {exc}", "forced_prefix") from None
    elif isinstance(value, list):
        try:
            prefix = np.asarray(value)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "forced_prefix: nested list is not a rectangular (P, D) array",
                               "forced_prefix") from None
        if prefix.nbytes > MAX_FORCED_PREFIX_BYTES:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"forced_prefix: {prefix.nbytes} bytes exceed the limit of "
                               f"{MAX_FORCED_PREFIX_BYTES}", "forced_prefix")
    else:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"forced_prefix: expected a json_numpy array or a nested list, got {type(value).__name__}",
                           "forced_prefix")
    if prefix.size and prefix.dtype.kind not in "iuf":
        raise RequestError(HTTPStatus.BAD_REQUEST, f"forced_prefix: must hold numbers, got {prefix.dtype} values",
                           "forced_prefix")
    return prefix.astype(np.float64)


def _image_from_field(value, max_side: int) -> np.ndarray:
    if json_numpy.is_encoded_array(value):
        try:
            image = json_numpy.decode_array(value, max_bytes=max_side * max_side * 4 * 8)
        except json_numpy.JsonNumpyError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image: {exc}", "image") from None
        if image.dtype != np.uint8:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image: dtype must be uint8 ('|u1'), got {image.dtype.str!r}", "image")
    elif isinstance(value, list):
        try:
            image = np.asarray(value)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "image: nested list is not a rectangular HxWx3 array", "image") from None
        if image.dtype == object or image.dtype.kind not in "iu":
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"image: nested list must hold integers 0..255, got {image.dtype} values", "image")
        if image.size and (image.min() < 0 or image.max() > 255):
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"image: values must lie in 0..255, got {int(image.min())}..{int(image.max())}", "image")
        image = image.astype(np.uint8)
    else:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"image: expected a json_numpy array or a nested list, got {type(value).__name__}", "image")
    if image.ndim == 3 and image.shape[2] == 4:  # RGBA: deploy.py converts to RGB too
        image = np.ascontiguousarray(image[:, :, :3])
    elif image.ndim == 2:  # greyscale
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"image: shape must be HxWx3 (or HxWx4, HxW), got {list(image.shape)}", "image")
    if max(image.shape[:2]) > max_side:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"image: {image.shape[0]}x{image.shape[1]} exceeds the limit of {max_side} px per side", "image")
    return image


def parse_act_request(payload, *, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                      unnorm_keys: list[str] | None = None) -> ActRequest:
    """Validate a decoded /act JSON body (plain JSON: json_numpy objects are still dicts here)."""
    double_encoded = False
    if isinstance(payload, dict) and json_numpy.ENCODED_KEY in payload:
        extra = sorted(set(payload) - {json_numpy.ENCODED_KEY})
        if extra:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"encoded: an 'encoded' payload must have no other keys, got {extra}", "encoded")
        text = payload[json_numpy.ENCODED_KEY]
        if not isinstance(text, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"encoded: must be a JSON string, got {type(text).__name__}", "encoded")
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"encoded: not valid JSON ({exc})", "encoded") from None
        double_encoded = True
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object, got {type(payload).__name__}")
    for name in ("image", "instruction"):
        if name not in payload:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: missing required field", name)
    instruction = payload["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise RequestError(HTTPStatus.BAD_REQUEST, f"instruction: must be a non-empty string, got {instruction!r:.80}", "instruction")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"instruction: {len(instruction)} characters exceed the limit of {MAX_INSTRUCTION_CHARS}", "instruction")
    unnorm_key = payload.get("unnorm_key")
    if unnorm_key is not None:
        if not isinstance(unnorm_key, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unnorm_key: must be a string or null, got {unnorm_key!r:.80}", "unnorm_key")
        if unnorm_keys is not None and unnorm_key not in unnorm_keys:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unnorm_key: unknown key {unnorm_key!r}; available: {unnorm_keys}", "unnorm_key")
    return_chunk = payload.get("return_chunk", False)
    if not isinstance(return_chunk, bool):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"return_chunk: must be true or false, got {return_chunk!r:.80}", "return_chunk")
    image = _image_from_field(payload["image"], max_image_side)
    return ActRequest(image=image, instruction=instruction, unnorm_key=unnorm_key, return_chunk=return_chunk,
                      double_encoded=double_encoded, forced_prefix=_forced_prefix_from_field(payload.get("forced_prefix")))


def act_response(chunk, request: ActRequest, engine_name: str):
    """The JSON value to send back for a chunk (deploy.py's shape unless the request asked for more)."""
    action = chunk.actions[0] if chunk.chunk_len == 1 else chunk.actions
    encoded = json_numpy.encode_array(np.asarray(action, dtype=np.float64))
    if request.return_chunk:
        body = chunk.as_dict()
        body.update({"action": encoded, "chunk_len": chunk.chunk_len, "engine": engine_name,
                     "normalised": None if chunk.normalised is None else np.asarray(chunk.normalised).tolist()})
        return body
    if request.double_encoded:
        # deploy.py answers the "encoded" form with json_numpy text inside a JSON string.
        return json.dumps(encoded)
    return encoded


class ActService:
    """The transport-free part of the server: validation, the engine lock, responses as (status, JSON value)."""

    def __init__(self, engine, *, token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_image_side: int = DEFAULT_MAX_IMAGE_SIDE):
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        if max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {max_body_bytes}")
        if max_image_side < 1:
            raise ValueError(f"max_image_side must be >= 1, got {max_image_side}")
        self.engine = engine
        self.token = token
        self.max_body_bytes = int(max_body_bytes)
        self.max_image_side = int(max_image_side)
        self.lock = threading.Lock()
        self._info = engine.info()
        self.requests_served = 0

    def authorised(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].encode(), self.token.encode())

    def info(self) -> dict:
        return {**self._info, "engine": getattr(self.engine, "name", self._info.get("engine")),
                "dims": list(self.engine.dim_names), "dt": self.engine.dt, "chunk_len": self.engine.chunk_len,
                "supports_forced_prefix": supports_forced_prefix(self.engine),
                "server": {"protocol": "openvla-deploy", "max_body_bytes": self.max_body_bytes,
                           "max_image_side": self.max_image_side, "auth": self.token is not None}}

    def act(self, payload) -> tuple[int, object]:
        try:
            request = parse_act_request(payload, max_image_side=self.max_image_side,
                                        unnorm_keys=self._info.get("unnorm_keys"))
        except RequestError as exc:
            return exc.status, exc.body()
        options = {}
        if request.forced_prefix is not None and request.forced_prefix.size:
            try:
                if not supports_forced_prefix(self.engine):
                    raise ValueError(f"the {getattr(self.engine, 'name', 'server')} engine cannot decode with a forced prefix")
                options["forced_prefix"] = check_forced_prefix(request.forced_prefix, self.engine.chunk_len,
                                                               len(self.engine.dim_names))
            except ValueError as exc:
                return HTTPStatus.BAD_REQUEST, {"error": f"forced_prefix: {exc}", "field": "forced_prefix"}
        try:
            with self.lock:
                chunk = self.engine.predict(request.image, request.instruction, unnorm_key=request.unnorm_key, **options)
                self.requests_served += 1
        except Exception as exc:  # any engine failure becomes a 500 naming it; the server keeps serving
            logger.exception("engine %s failed", getattr(self.engine, "name", "?"))
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"engine failed: {type(exc).__name__}: {exc}"}
        if not chunk.is_finite:
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "engine returned a non-finite action; refusing to send it"}
        return HTTPStatus.OK, act_response(chunk, request, getattr(self.engine, "name", "engine"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: RemoteEngine reuses one connection
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed
    # ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True
    server: "ActHTTPServer"

    def log_message(self, format, *args):  # route http.server's stderr lines to logging
        logger.debug("%s - " + format, self.address_string(), *args)

    def _send(self, status: int, value) -> None:
        body = json.dumps(value, allow_nan=False, default=str).encode()
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if int(status) == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def _check_token(self) -> bool:
        if self.server.service.authorised(self.headers.get("Authorization")):
            return True
        self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token (Authorization: Bearer ...)",
                                             "field": "Authorization"})
        return False

    def _discard_body(self) -> None:
        """Read and drop the request body before answering an error, so the client (still sending)
        gets the answer instead of a broken pipe. Bodies beyond DRAIN_FACTOR x the limit are not
        read: the connection is closed instead."""
        length = self.headers.get("Content-Length")
        if not (length and length.isdigit()) or int(length) > DRAIN_FACTOR * self.server.service.max_body_bytes:
            self.close_connection = True
            return
        remaining = int(length)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok", "engine": self.server.service.info()["engine"]})
        elif path == "/info":
            if self._check_token():
                self._send(HTTPStatus.OK, self.server.service.info())
        elif path == "/act":
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /act"})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path!r}; try POST /act, GET /health, GET /info"})

    def do_POST(self):
        service = self.server.service
        path = self.path.split("?", 1)[0]
        if path != "/act":
            self._discard_body()
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path!r}; POST goes to /act"})
            return
        if not service.authorised(self.headers.get("Authorization")):
            self._discard_body()
            self._check_token()
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length header required", "field": "Content-Length"})
            return
        length = int(length_text)
        if length > service.max_body_bytes:
            self._discard_body()  # drained (bounded) so the client reads the 413, never parsed
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"body of {length} bytes exceeds the limit of {service.max_body_bytes}", "field": "body"})
            return
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON ({exc})", "field": "body"})
            return
        status, value = service.act(payload)
        self._send(status, value)


class ActHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, service: ActService):
        self.service = service
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
                **limits) -> ActHTTPServer:
    """A bound (not yet serving) server; `port=0` picks a free port (see `.url`)."""
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    return ActHTTPServer((host, int(port)), ActService(engine, token=token, **limits))


def serve(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, **limits) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(engine, host, port, token, **limits)
    logger.info("serving %s on %s (auth %s)", getattr(engine, "name", "engine"), server.url, "on" if token else "off")
    serve_until_interrupted(server)


def serve_until_interrupted(server) -> None:
    """Run `server` until Ctrl-C, then close its socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# CLI ---------------------------------------------------------------------------------------------
def add_serve_parser(subparsers, add_engine_options=None) -> argparse.ArgumentParser:
    """`openvla-ros serve --checkpoint DIR [engine options] [--host] [--port] [--token]`.

    `add_engine_options(parser)` adds the CLI's shared --checkpoint/--engine/... options; the caller
    builds the engine from them and passes it to `cmd_serve(args, engine)`.
    """
    p = subparsers.add_parser("serve", help="serve an engine over HTTP (deploy.py-compatible POST /act, /health, /info)")
    if add_engine_options is not None:
        add_engine_options(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default: {DEFAULT_HOST}, loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on /act and /info "
                                                 "(default: $OPENVLA_ROS_TOKEN if set, else no auth)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20, help="request size limit in MiB")
    p.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE, help="largest accepted image side in px")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args, engine=None) -> int:
    import os

    if engine is None:  # the CLI passes the engine it built from the shared engine flags
        raise ValueError("cmd_serve needs an engine")
    token = args.token if args.token is not None else os.environ.get("OPENVLA_ROS_TOKEN") or None
    max_body = int(args.max_body_mb * 2**20)
    if not math.isfinite(args.max_body_mb) or max_body < 1024:
        raise ValueError(f"--max-body-mb must be a positive size of at least 1 KiB, got {args.max_body_mb}")
    server = make_server(engine, args.host, args.port, token, max_body_bytes=max_body, max_image_side=args.max_image_side)
    # One line on stdout so scripts (and tests) learn the actual port when --port 0 is used.
    print(json.dumps({"serving": server.url, "engine": engine.name, "auth": token is not None}), flush=True)
    serve_until_interrupted(server)
    return 0
