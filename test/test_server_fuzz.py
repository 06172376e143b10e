"""HTTP fuzzing of the /act server (real http.server on loopback, real tiny TorchEngine).

1. A catalogue of hostile requests and seeded random mutations of a valid one, each on its own
   connection: every one gets an answer, a JSON body, and a typed status (4xx, 503 when busy, or
   200 when a mutation happens to stay valid) - never a 5xx, never silence.
2. Good clients (8 x 25 requests on keep-alive connections) while hostile clients run alongside:
   slow ("slowloris") clients, clients declaring large bodies and trickling them, idle
   connections, and the hostile catalogue again. Every good request must succeed; latency is
   measured (p50/p99 into the fuzz tally), bounded only by a generous liveness timeout.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
from fuzz_profiles import PROFILE, TALLY

from openvla_ros.engines import json_numpy
from openvla_ros.engines.server import make_server

LIVENESS_S = 60.0  # no request may take longer than this; typical ones take milliseconds
GOOD_CLIENTS, REQUESTS_PER_CLIENT = 8, 25
MUTATIONS = {"ci": 120, "dev": 30, "nightly": 3000}[PROFILE]


@pytest.fixture(scope="module")
def server(torch_engine):
    srv = make_server(torch_engine, "127.0.0.1", 0, max_body_bytes=200_000, max_connections=32)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def good_body(seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return json.dumps({"image": json_numpy.encode_array(image), "instruction": "pick up the cube"}).encode()


def request(body: bytes, method=b"POST", path=b"/act", headers=b"") -> bytes:
    return (method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def exchange(server, data: bytes, timeout: float = LIVENESS_S) -> tuple[int | None, object]:
    """Send `data`, half-close, read the answer: (status, parsed JSON body), (None, why) when none."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking everything: read the answer
        buf = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\r\n\r\n" in buf:
                    head, body = buf.split(b"\r\n\r\n", 1)
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= length[0]:
                        break
        except (ConnectionResetError, socket.timeout) as exc:
            if not buf:
                return None, repr(exc)
    if b"\r\n\r\n" not in buf:
        return None, f"connection closed without an HTTP answer: {buf[:100]!r}"
    head, body = buf.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    body = body[: length[0]] if length else body  # only the first answer (a mutation may pipeline another)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body[:200]


HOSTILE = {  # name: (request bytes, the status it must get)
    "garbage line": (b"\x00\x01\x02 garbage \xff\r\n\r\n",
        400),
    "unknown method": (b"BREW /act HTTP/1.1\r\nHost: x\r\n\r\n",
        501),
    "HTTP/0.9 style": (b"GET /health\r\n",
        505),
    "version 9.9": (b"GET /health HTTP/9.9\r\n\r\n",
        505),
    "request line 70 KB": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        414),
    "header 70 KB": (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        431),
    "200 headers": (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
        431),
    "no Content-Length": (b"POST /act HTTP/1.1\r\nHost: x\r\n\r\n{}",
        411),
    "Content-Length: superscript two": (b"POST /act HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n{}",
        400),
    "Content-Length: -1": (b"POST /act HTTP/1.1\r\nContent-Length: -1\r\n\r\n{}",
        400),
    "Content-Length: 1e3": (b"POST /act HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n{}",
        400),
    "Content-Length 99 digits": (b"POST /act HTTP/1.1\r\nContent-Length: " + b"9" * 99 + b"\r\n\r\n{}",
        400),
    "two Content-Lengths": (b"POST /act HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        400),
    "chunked": (b"POST /act HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        400),
    "declared 1 GB, sent nothing": (b"POST /act HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n",
        413),
    "declared 1 MB (5x the limit)": (b"POST /act HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000,
        413),
    "body shorter than declared": (b"POST /act HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"image\":",
        400),
    "not JSON": (request(b"not json"),
        400),
    "invalid UTF-8": (request(b"\xff\xfe\xfd"),
        400),
    "JSON nested 100000 deep": (request(b"[" * 100_000 + b"]" * 100_000),
        400),
    "JSON number 5000 digits": (request(b"1" * 5000),
        400),
    "JSON NaN image": (request(b'{"image": [[[NaN, 0, 0]]], "instruction": "go"}'),
        400),
    "image 1x1": (request(json.dumps({"image": [[[0, 0, 0]]], "instruction": "go"}).encode()),
        400),
    "image 1x50": (request(json.dumps({"image": [[[0, 0, 0]] * 50], "instruction": "go"}).encode()),
        400),
    "image overflowing shape": (request(json.dumps({"image": {"__numpy__": "", "dtype": "|u1",
                                                             "shape": [2**62, 4, 3]}, "instruction": "go"}).encode()),
        400),
    "image 70 dims": (request(json.dumps({"image": {"__numpy__": "", "dtype": "|u1", "shape": [1] * 70},
                                         "instruction": "go"}).encode()),
        400),
    "image object dtype": (request(json.dumps({"image": {"__numpy__": "AA==", "dtype": "O", "shape": [1]},
                                              "instruction": "go"}).encode()),
        400),
    "image values 256": (request(json.dumps({"image": [[[256, 0, 0]] * 2] * 2, "instruction": "go"}).encode()),
        400),
    "image ragged": (request(json.dumps({"image": [[[0, 0, 0]], [[0, 0]]], "instruction": "go"}).encode()),
        400),
    "instruction lone surrogate": (request(b'{"image": [[[0,0,0],[0,0,0]],[[0,0,0],[0,0,0]]], "instruction": "\\ud800"}'),
        400),
    "instruction 100k chars": (request(json.dumps({"image": [[[0, 0, 0]] * 2] * 2, "instruction": "x" * 100_000}).encode()),
        400),
    "instruction not a string": (request(json.dumps({"image": [[[0, 0, 0]] * 2] * 2, "instruction": 5}).encode()),
        400),
    "encoded not JSON": (request(json.dumps({"encoded": "[[["}).encode()),
        400),
    "encoded nested deep": (request(json.dumps({"encoded": "[" * 100_000}).encode()),
        400),
    "unknown unnorm_key": (request(json.dumps({"image": [[[0, 0, 0]] * 2] * 2, "instruction": "go",
                                              "unnorm_key": "nope"}).encode()),
        400),
    "POST elsewhere": (request(b"{}", path=b"/admin"),
        404),
    "GET /act": (b"GET /act HTTP/1.1\r\nHost: x\r\n\r\n",
        405),
    "path 404": (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        404),
}


def typed(status, body) -> bool:
    """A refusal that says why: a JSON error body with a 4xx (or 503 busy) status."""
    return status is not None and isinstance(body, dict) and "error" in body and (400 <= status < 500 or status == 503)


def test_every_hostile_request_gets_a_typed_json_4xx(server):
    failures = []
    for name, (data, expected) in HOSTILE.items():
        status, body = exchange(server, data)
        ok = status == expected and isinstance(body, dict) and bool(body.get("error"))
        TALLY.record("HTTP hostile catalogue", survived=status is not None, accepted=False)
        if not ok:
            failures.append((name, status, body))
    assert not failures, failures
    assert exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # still serving


def test_random_mutations_of_a_valid_request_get_200_or_a_typed_4xx(server):
    rng = np.random.default_rng(19)
    valid = request(good_body())
    failures, answered = [], 0
    for _ in range(MUTATIONS):
        data = bytearray(valid)
        for _ in range(int(rng.integers(1, 6))):
            op = rng.integers(0, 4)
            at = int(rng.integers(0, len(data)))
            if op == 0:
                data[at] = int(rng.integers(0, 256))
            elif op == 1:
                del data[at: at + int(rng.integers(1, 40))]
            elif op == 2:
                data[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))
            else:
                data = data[:at]
        status, body = exchange(server, bytes(data))
        answered += status is not None
        ok = status == 200 or typed(status, body)
        TALLY.record("HTTP random mutations", survived=status is not None, accepted=status == 200)
        if not ok:
            failures.append((bytes(data[:120]), status, body))
    assert not failures, failures[:5]


class Hostile(threading.Thread):
    """A hostile client loop running beside the good clients until `stop` is set."""

    def __init__(self, server, kind: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.server, self.kind, self.stop, self.sent = server, kind, stop, 0

    def run(self):
        host, port = self.server.server_address[:2]
        while not self.stop.is_set():
            try:
                if self.kind == "catalogue":
                    for data, _ in HOSTILE.values():
                        if self.stop.is_set():
                            break
                        exchange(self.server, data, timeout=5.0)
                        self.sent += 1
                    continue
                with socket.create_connection((host, port), timeout=5.0) as sock:
                    if self.kind == "slowloris":  # one header byte at a time
                        for byte in b"POST /act HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                            if self.stop.is_set():
                                break
                            sock.send(bytes([byte]))
                            time.sleep(0.05)
                    elif self.kind == "trickle":  # a large declared body, sent slowly
                        sock.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 150000\r\n\r\n")
                        for _ in range(100):
                            if self.stop.is_set():
                                break
                            sock.sendall(b"[" * 100)
                            time.sleep(0.05)
                    elif self.kind == "idle":
                        self.stop.wait(2.0)
                    self.sent += 1
            except OSError:
                self.sent += 1  # refused or reset by the server: also an outcome


def test_good_clients_are_served_while_hostile_and_slow_clients_hammer_the_server(server):
    stop = threading.Event()
    hostile = [Hostile(server, kind, stop) for kind in ("catalogue", "slowloris", "slowloris", "trickle", "trickle",
                                                        "idle", "idle", "idle")]
    for thread in hostile:
        thread.start()
    host, port = server.server_address[:2]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def good_client(index: int):
        conn = http.client.HTTPConnection(host, port, timeout=LIVENESS_S)
        body = good_body(index)
        for _ in range(REQUESTS_PER_CLIENT):
            start = time.perf_counter()
            try:
                conn.request("POST", "/act", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = json.loads(response.read())
                ok = response.status == 200 and json_numpy.is_encoded_array(answer)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                ok, answer = False, repr(exc)
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=LIVENESS_S)
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors.append(str(answer)[:200])
        conn.close()

    try:
        clients = [threading.Thread(target=good_client, args=(i,)) for i in range(GOOD_CLIENTS)]
        started = time.perf_counter()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(LIVENESS_S * REQUESTS_PER_CLIENT)
        wall = time.perf_counter() - started
    finally:
        stop.set()
        for thread in hostile:
            thread.join(10.0)
    total = GOOD_CLIENTS * REQUESTS_PER_CLIENT
    ms = np.array(latencies) * 1e3
    TALLY.measure("server: good clients x requests", f"{GOOD_CLIENTS} x {REQUESTS_PER_CLIENT}")
    TALLY.measure("server: good requests succeeded", f"{len(latencies)} of {total}")
    if len(ms):
        TALLY.measure("server: good request latency ms p50/p99/max",
                      [round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 99)), 1),
                       round(float(ms.max()), 1)])
    TALLY.measure("server: good requests per second", round(len(latencies) / wall, 1))
    TALLY.measure("server: hostile client actions alongside", sum(t.sent for t in hostile))
    TALLY.record("HTTP good requests under attack", count=total, survived=True)
    assert not errors, errors[:5]
    assert len(latencies) == total
    assert exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
