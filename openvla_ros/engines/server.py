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

Limits (every refusal is a JSON body naming it; /info lists the configurable ones):

- body: `max_body_bytes` (default 64 MiB), declared by exactly one ASCII-digit Content-Length
  (none: 411; malformed, duplicated with different values, or with Transfer-Encoding: 400). 401
  (token) and 413 (size) are answered from the headers before any of the body is read; the body is
  then drained, bounded by bytes and DRAIN_TIMEOUT_S, so a client still sending reads the answer.
- image: `max_image_side` px per side (413), at least MIN_IMAGE_SIDE (400); instruction: at most
  MAX_INSTRUCTION_CHARS characters of valid text (400); JSON nested deeper than Python parses: 400.
- connections: at most `max_connections` at once; the next gets 503 at once. Idle keep-alive
  connections close after IDLE_TIMEOUT_S.
- parsing memory: a body being parsed reserves PARSE_MEMORY_FACTOR x its size from a budget of
  `max_parse_bytes` (default 1 GiB; a single body may always take the whole budget); a request that
  cannot get its share within PARSE_WAIT_S gets 503.
- HTTP-level errors of the standard library's parser (unknown method 501 with Allow, request line
  too long 414, header fields too large 431, bad version 505, bad syntax 400) are JSON too.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from ..vla.constants import MAX_INSTRUCTION_CHARS, MIN_IMAGE_SIDE
from . import json_numpy
from .base import check_forced_prefix, supports_forced_prefix

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a 1080p image as a nested JSON list fits
# After a 413, up to this multiple of the limit is read and dropped (after a 401: up to the limit),
# for at most DRAIN_TIMEOUT_S, so a client still sending reads the answer; then the connection closes.
DRAIN_FACTOR = 16
DRAIN_TIMEOUT_S = 2.0
DEFAULT_MAX_IMAGE_SIDE = 4096
# Committed actions are a few steps of a few dims; this bounds the decoded array long before that matters.
MAX_FORCED_PREFIX_BYTES = 1 << 16
DEFAULT_MAX_CONNECTIONS = 32
IDLE_TIMEOUT_S = 30.0  # a connection silent this long (keep-alive or a stalled client) is closed
# Peak memory of parsing a body, per body byte: a nested-list image costs ~20x its JSON text.
PARSE_MEMORY_FACTOR = 24
DEFAULT_MAX_PARSE_BYTES = 1 << 30
PARSE_WAIT_S = 30.0
ALLOWED_METHODS = "GET, POST"
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is True, int("²") fails)
ACT_FIELDS = ("image", "instruction", "unnorm_key", "return_chunk", "forced_prefix")


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
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"image: {image.shape[0]}x{image.shape[1]} is too small (at least {MIN_IMAGE_SIDE} px per side)",
                           "image")
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
        payload = _load_json(text, "encoded")
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
    try:
        instruction.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"instruction: not valid text ({exc.reason} at character {exc.start})", "instruction") from None
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


def _load_json(text, field: str):
    """json.loads, every failure a 400 naming `field` (nesting too deep for Python is one of them)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{field}: JSON nested too deeply", field) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and integers too long to convert
        what = "body is" if field == "body" else f"{field}:"
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{what} not valid JSON ({str(exc)[:200]})", field) from None


def parse_content_length(values: list[str] | None, max_body_bytes: int) -> int:
    """The body length from the Content-Length header value(s); RequestError when missing (411),
    malformed or given twice with different values (400: request smuggling), or over the limit (413)."""
    if not values:
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required", "Content-Length")
    distinct = {v.strip() for v in values}
    if len(distinct) > 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length given {len(values)} times with different values "
                           f"{sorted(distinct)!r:.100}: refused", "Content-Length")
    (text,) = distinct
    if not _DIGITS.fullmatch(text):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a decimal byte count, got {text!r:.40}",
                           "Content-Length")
    length = int(text)
    if length > max_body_bytes:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {length} bytes exceeds the limit of {max_body_bytes}", "body")
    return length


class MemoryBudget:
    """Bytes reserved by the requests being parsed; a reservation waits (bounded) for room."""

    def __init__(self, total: int):
        self.total = int(total)
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, amount: int, timeout: float) -> int | None:
        """Reserve min(amount, total) bytes; None when that did not fit within `timeout` seconds."""
        amount = min(int(amount), self.total)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + amount <= self.total, timeout):
                return None
            self.used += amount
            return amount

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()


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
                 max_image_side: int = DEFAULT_MAX_IMAGE_SIDE, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES):
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        if max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {max_body_bytes}")
        if max_image_side < MIN_IMAGE_SIDE:
            raise ValueError(f"max_image_side must be >= {MIN_IMAGE_SIDE}, got {max_image_side}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if max_parse_bytes < 1 << 20:
            raise ValueError(f"max_parse_bytes must be >= 1 MiB, got {max_parse_bytes}")
        self.max_connections = int(max_connections)
        self.parse_budget = MemoryBudget(max_parse_bytes)
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
                           "max_image_side": self.max_image_side, "min_image_side": MIN_IMAGE_SIDE,
                           "max_instruction_chars": MAX_INSTRUCTION_CHARS, "max_connections": self.max_connections,
                           "max_parse_bytes": self.parse_budget.total, "auth": self.token is not None}}

    def act(self, payload) -> tuple[int, object]:
        try:
            request = parse_act_request(payload, max_image_side=self.max_image_side,
                                        unnorm_keys=self._info.get("unnorm_keys"))
        except RequestError as exc:
            return exc.status, exc.body()
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
            # Anything validation did not foresee is still the request's fault: a 400 naming it.
            logger.warning("unforeseen request error: %s: %s", type(exc).__name__, exc)
            return HTTPStatus.BAD_REQUEST, {"error": f"malformed request ({type(exc).__name__}: {str(exc)[:200]})"}
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
    timeout = IDLE_TIMEOUT_S  # a connection silent this long is closed
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed
    # ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True
    server: "ActHTTPServer"

    def log_message(self, format, *args):  # route http.server's stderr lines to logging
        logger.debug("%s - " + format, self.address_string(), *args)

    def _send(self, status: int, value, headers: dict | None = None) -> None:
        body = json.dumps(value, allow_nan=False, default=str).encode()
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if int(status) == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        for name, value_text in (headers or {}).items():
            self.send_header(name, value_text)
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer: nothing to do
            self.close_connection = True

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # no status line, no headers: nothing this server speaks
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/0.9 requests are not supported; use HTTP/1.1")
            return False
        return True

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (bad request line, unknown method, oversized
        headers, bad version) as JSON like every other answer, never HTML."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        if not hasattr(self, "command") or self.command is None or not isinstance(self.command, str):
            self.command = ""
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"  # a status line and headers even when the version was unusable
        headers = {"Allow": ALLOWED_METHODS} if int(code) in (HTTPStatus.NOT_IMPLEMENTED, HTTPStatus.METHOD_NOT_ALLOWED) else None
        self._send(code, {"error": f"{phrase}: {message or explain or phrase}"[:500]}, headers)

    def _reject(self, error: RequestError, drain_limit: int) -> None:
        """Answer `error` now, from the headers alone; then drop what the client still sends (at
        most `drain_limit` bytes, for at most DRAIN_TIMEOUT_S) and close the connection."""
        self.close_connection = True
        self._send(error.status, error.body())
        try:
            self.wfile.flush()
        except OSError:
            return
        values = self.headers.get_all("Content-Length") or []
        declared = int(values[0]) if len(values) == 1 and _DIGITS.fullmatch(values[0].strip()) else 0
        remaining = min(declared, drain_limit)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        try:
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:  # timeout or reset: the answer was sent, nothing more to do
            pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok", "engine": self.server.service.info()["engine"]})
        elif path == "/info":
            if self.server.service.authorised(self.headers.get("Authorization")):
                self._send(HTTPStatus.OK, self.server.service.info())
            else:
                self._reject(_unauthorised(), 0)
        elif path == "/act":
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /act"}, {"Allow": "POST"})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path!r:.200}; try POST /act, GET /health, GET /info"})

    def do_POST(self):
        service = self.server.service
        path = self.path.split("?", 1)[0]
        if path != "/act":
            self._reject(RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r:.200}; POST goes to /act"),
                         service.max_body_bytes)
            return
        if not service.authorised(self.headers.get("Authorization")):
            self._reject(_unauthorised(), service.max_body_bytes)
            return
        if self.headers.get("Transfer-Encoding") is not None:
            self._reject(RequestError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not supported: send the body "
                                      "with a Content-Length", "Transfer-Encoding"), 0)
            return
        try:
            length = parse_content_length(self.headers.get_all("Content-Length"), service.max_body_bytes)
        except RequestError as exc:
            self._reject(exc, DRAIN_FACTOR * service.max_body_bytes if exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE else 0)
            return
        reserved = service.parse_budget.acquire(PARSE_MEMORY_FACTOR * max(length, 1), PARSE_WAIT_S)
        if reserved is None:
            self._reject(RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "server busy parsing other requests; retry",
                                      "body"), service.max_body_bytes)
            return
        try:
            raw = self.rfile.read(length)
            if len(raw) != length:  # the client stopped sending (half-closed) before the declared end
                self.close_connection = True
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"body ended after {len(raw)} of the {length} bytes "
                                                             f"Content-Length declared", "field": "body"})
                return
            try:
                payload = _load_json(raw, "body")
            except RequestError as exc:
                self._send(exc.status, exc.body())
                return
            status, value = service.act(payload)
            del payload, raw
        finally:
            service.parse_budget.release(reserved)
        self._send(status, value)


def _unauthorised() -> RequestError:
    return RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer ...)",
                        "Authorization")


_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s")


class ActHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most `service.max_connections` at once."""

    daemon_threads = True

    def __init__(self, address, service: ActService):
        self.service = service
        self._slots = threading.BoundedSemaphore(service.max_connections)
        self.refused_connections = 0
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            body = json.dumps({"error": f"server busy: {self.service.max_connections} connections open; retry"}).encode()
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY_RESPONSE % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request, client_address):
        """A handler that raised: logged (socketserver would print a traceback to stderr)."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that vanished mid-exchange
            logger.debug("connection from %s ended: %r", client_address, exc)
        else:
            logger.exception("request from %s failed", client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

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
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="connections served at once; more get 503 (default %(default)s)")
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
    server = make_server(engine, args.host, args.port, token, max_body_bytes=max_body, max_image_side=args.max_image_side,
                         max_connections=args.max_connections)
    # One line on stdout so scripts (and tests) learn the actual port when --port 0 is used.
    print(json.dumps({"serving": server.url, "engine": engine.name, "auth": token is not None}), flush=True)
    serve_until_interrupted(server)
    return 0
