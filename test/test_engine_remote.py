"""The /act server (real http.server on loopback, real TorchEngine) and the remote engine against it."""
from __future__ import annotations

import base64
import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from openvla_ros.engines import create_engine, json_numpy
from openvla_ros.engines.base import Engine
from openvla_ros.engines.remote import RemoteEngine, RemoteEngineError, backoff_delays, parse_server_url
from openvla_ros.engines.server import make_server, parse_act_request, RequestError

from conftest import random_image

TOKEN = "s3cret-token"


def start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def server(torch_engine):
    srv = start(make_server(torch_engine, "127.0.0.1", 0))
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def token_server(torch_engine):
    srv = start(make_server(torch_engine, "127.0.0.1", 0, token=TOKEN, max_body_bytes=200_000, max_image_side=128))
    yield srv
    srv.shutdown()
    srv.server_close()


def post(url, body: bytes, headers=None):
    """A deploy.py-style client: plain urllib, JSON body. Returns (status, parsed JSON or raw bytes)."""
    request = urllib.request.Request(url + "/act", data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# json_numpy ----------------------------------------------------------------------------------------
def test_json_numpy_encodes_raw_bytes_in_base64():
    encoded = json_numpy.encode_array(np.array([[1, 2, 3]], dtype=np.uint8))
    assert encoded == {"__numpy__": "AQID", "dtype": "|u1", "shape": [1, 3]}
    # the '<u1' spelling json_numpy clients may send decodes the same
    assert json_numpy.decode_array({**encoded, "dtype": "<u1"}).tolist() == [[1, 2, 3]]
    floats = np.array([0.5, -2.0], dtype="<f8")
    assert base64.b64decode(json_numpy.encode_array(floats)["__numpy__"]) == floats.tobytes()


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([True, False]),
                                   np.arange(6, dtype=">i4").reshape(2, 3)[:, ::2], np.float64(3.25)])
def test_json_numpy_round_trip(array):
    back = json_numpy.loads(json_numpy.dumps({"x": array, "y": [array]}))
    for value in (back["x"], back["y"][0]):
        assert np.asarray(value).dtype == np.asarray(array).dtype
        assert np.array_equal(value, array)


@pytest.mark.parametrize("obj, message", [
    ({"__numpy__": "@@@", "dtype": "|u1", "shape": [1]}, "base64"),
    ({"__numpy__": "AQID", "dtype": "|u1", "shape": [2, 2]}, "3 bytes"),
    ({"__numpy__": "AQID", "dtype": "|O", "shape": [3]}, "not a plain numeric"),
    ({"__numpy__": "AQID", "dtype": "nonsense", "shape": [3]}, "unknown dtype"),
    ({"__numpy__": "AQID", "dtype": "|u1", "shape": [-3]}, "shape"),
    ({"__numpy__": "AQID", "dtype": "|u1", "shape": [1000, 1000]}, "exceeds"),
])
def test_json_numpy_rejects_bad_objects(obj, message):
    with pytest.raises(json_numpy.JsonNumpyError, match=message):
        json_numpy.decode_array(obj, max_bytes=10_000)


# request validation (no HTTP) ----------------------------------------------------------------------
@pytest.mark.parametrize("payload, field", [
    ({"instruction": "go"}, "image"),
    ({"image": [[[0, 0, 0]]]}, "instruction"),
    ({"image": [[[0, 0, 0]]], "instruction": ""}, "instruction"),
    ({"image": [[[0, 0, 0]]], "instruction": "go", "unnorm_key": 3}, "unnorm_key"),
    ({"image": [[[0, 0, 0]]], "instruction": "go", "unnorm_key": "bridge_orig"}, "unnorm_key"),
    ({"image": [[[0, 0, 0]]], "instruction": "go", "return_chunk": "yes"}, "return_chunk"),
    ({"image": [[[0, 0, 300]]], "instruction": "go"}, "image"),
    ({"image": [[[0.5, 0, 0]]], "instruction": "go"}, "image"),
    ({"image": [[[0, 0]], [[0, 0, 0]]], "instruction": "go"}, "image"),
    ({"image": "abc", "instruction": "go"}, "image"),
    ({"image": json_numpy.encode_array(np.zeros((4, 4, 3), np.float32)), "instruction": "go"}, "image"),
    ({"image": json_numpy.encode_array(np.zeros((4, 4, 2), np.uint8)), "instruction": "go"}, "image"),
    ({"encoded": {"image": 1}}, "encoded"),
    ({"encoded": "{not json"}, "encoded"),
    ({"encoded": "{}", "instruction": "go"}, "encoded"),
])
def test_parse_act_request_names_the_bad_field(payload, field):
    with pytest.raises(RequestError) as info:
        parse_act_request(payload, unnorm_keys=["tiny_demo"])
    assert info.value.status == 400 and info.value.field == field
    assert field in str(info.value)


def test_parse_act_request_accepts_lists_rgba_grey_and_encoded():
    rgb = random_image(1, (5, 6, 3))
    from_list = parse_act_request({"image": rgb.tolist(), "instruction": "go"})
    assert from_list.image.dtype == np.uint8 and np.array_equal(from_list.image, rgb)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(parse_act_request({"image": json_numpy.encode_array(rgba), "instruction": "go"}).image, rgb)
    grey = parse_act_request({"image": rgb[:, :, 0].tolist(), "instruction": "go"}).image
    assert grey.shape == (5, 6, 3) and np.array_equal(grey[:, :, 2], rgb[:, :, 0])
    encoded = parse_act_request({"encoded": json.dumps({"image": json_numpy.encode_array(rgb), "instruction": "go",
                                                        "unnorm_key": "tiny_demo"})}, unnorm_keys=["tiny_demo"])
    assert encoded.double_encoded and encoded.unnorm_key == "tiny_demo" and np.array_equal(encoded.image, rgb)
    with pytest.raises(RequestError) as info:
        parse_act_request({"image": rgb.tolist(), "instruction": "go"}, max_image_side=5)
    assert info.value.status == 413 and info.value.field == "image"


# server + remote over HTTP -------------------------------------------------------------------------
def test_remote_engine_returns_the_local_engines_actions(server, torch_engine):
    remote = RemoteEngine(server.url)
    assert isinstance(remote, Engine)
    assert remote.dim_names == list(torch_engine.dim_names) and remote.dt == torch_engine.dt
    assert remote.info()["checkpoint_fingerprint"] == torch_engine.checkpoint.fingerprint()
    for seed, instruction in [(0, "reach the red cube"), (1, "pick up the screw"), (2, "open the drawer")]:
        image = random_image(seed)
        local = torch_engine.predict(image, instruction)
        chunk = remote.predict(image, instruction, stamp=7.5)
        assert np.array_equal(chunk.actions, local.actions)
        assert chunk.tokens.tolist() == local.tokens.tolist()
        assert chunk.stamp == 7.5 and chunk.unnorm_key == "tiny_demo"
        assert chunk.timings_ms["request"] > 0 and "server_total" in chunk.timings_ms
    remote.close()


def test_remote_through_create_engine_and_encoded_form(server, torch_engine):
    remote = create_engine("remote", None, url=server.url + "/act", encoded=True, unnorm_key="tiny_demo")
    image = random_image(5)
    assert np.array_equal(remote.predict(image, "reach the blue cube").actions,
                          torch_engine.predict(image, "reach the blue cube").actions)
    with pytest.raises(ValueError, match="not known to the server"):
        RemoteEngine(server.url, unnorm_key="bridge_orig")
    with pytest.raises(ValueError, match="--url"):
        create_engine("remote", "/some/checkpoint")


def test_deploy_style_client_json_numpy_lists_and_encoded(server, torch_engine):
    image = random_image(3, (64, 80, 3))
    expected = torch_engine.predict(image, "reach the red cube").actions[0]
    # 1) json_numpy body, bare json_numpy answer (what deploy.py returns)
    status, answer = post(server.url, json.dumps({"image": json_numpy.encode_array(image), "instruction": "reach the red cube"}).encode())
    assert status == 200 and set(answer) == {"__numpy__", "dtype", "shape"} and answer["shape"] == [7]
    assert np.array_equal(json_numpy.decode_array(answer), expected)
    # 2) image as a nested list
    status, answer = post(server.url, json.dumps({"image": image.tolist(), "instruction": "reach the red cube"}).encode())
    assert status == 200 and np.array_equal(json_numpy.decode_array(answer), expected)
    # 3) the double-encoded form: the answer is a JSON string of json_numpy text
    inner = json.dumps({"image": json_numpy.encode_array(image), "instruction": "reach the red cube", "unnorm_key": "tiny_demo"})
    status, answer = post(server.url, json.dumps({"encoded": inner}).encode())
    assert status == 200 and isinstance(answer, str)
    assert np.array_equal(json_numpy.loads(answer), expected)


def test_health_and_info(server, torch_engine):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "engine": "torch"}
    with urllib.request.urlopen(server.url + "/info", timeout=10) as response:
        info = json.loads(response.read())
    assert info["engine"] == "torch" and info["unnorm_keys"] == ["tiny_demo"] and info["chunk_len"] == 1
    assert info["dims"] == list(torch_engine.dim_names) and info["checkpoint"] == str(torch_engine.checkpoint.path)


def test_chunk_checkpoint_over_http(tiny_chunk_checkpoint):
    engine = create_engine("torch", tiny_chunk_checkpoint)
    srv = start(make_server(engine, "127.0.0.1", 0))
    try:
        image = random_image(9)
        chunk = RemoteEngine(srv.url).predict(image, "reach the blue cube")
        local = engine.predict(image, "reach the blue cube")
        assert chunk.actions.shape == (4, 7) and np.array_equal(chunk.actions, local.actions)
        status, answer = post(srv.url, json.dumps({"image": image.tolist(), "instruction": "reach the blue cube"}).encode())
        assert status == 200 and answer["shape"] == [4, 7]
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_requests_get_4xx_and_the_server_keeps_serving(token_server, torch_engine):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    small = random_image(4, (32, 32, 3))
    good = json.dumps({"image": json_numpy.encode_array(small), "instruction": "reach the red cube"}).encode()
    cases = [
        (good, {}, 401, "Authorization"),
        (good, {"Authorization": "Bearer wrong"}, 401, "Authorization"),
        (b"{not json", auth, 400, "body"),
        (json.dumps({"image": json_numpy.encode_array(small)}).encode(), auth, 400, "instruction"),
        (json.dumps({"image": json_numpy.encode_array(small.astype(np.float32)), "instruction": "go"}).encode(), auth, 400, "image"),
        (json.dumps({"image": json_numpy.encode_array(random_image(5, (130, 100, 3))), "instruction": "go"}).encode(), auth, 413, "image"),
        (json.dumps({"image": random_image(6, (200, 200, 3)).tolist(), "instruction": "go"}).encode(), auth, 413, "body"),
    ]
    for body, headers, status, field in cases:
        got_status, answer = post(token_server.url, body, headers)
        assert (got_status, answer.get("field")) == (status, field), answer
        assert isinstance(answer["error"], str) and answer["error"]
        # still serving after each refusal
        ok_status, action = post(token_server.url, good, auth)
        assert ok_status == 200
    assert np.array_equal(json_numpy.decode_array(action), torch_engine.predict(small, "reach the red cube").actions[0])
    with pytest.raises(RemoteEngineError, match="401"):
        RemoteEngine(token_server.url, token="wrong")
    remote = RemoteEngine(token_server.url, token=TOKEN)
    with pytest.raises(RemoteEngineError, match="field 'image'"):
        remote.predict(random_image(7, (200, 100, 3)), "go")
    assert remote.predict(small, "reach the red cube").actions.shape == (1, 7)


class _FailingEngine:
    """A real engine whose predict fails for one instruction (to exercise the 500 path)."""

    def __init__(self, engine):
        self.engine, self.name = engine, "failing"
        self.dim_names, self.dt, self.chunk_len = engine.dim_names, engine.dt, engine.chunk_len

    def info(self):
        return self.engine.info()

    def predict(self, image, instruction, **kwargs):
        if instruction == "explode":
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.engine.predict(image, instruction, **kwargs)


def test_engine_failure_is_a_500_naming_it(torch_engine):
    srv = start(make_server(_FailingEngine(torch_engine), "127.0.0.1", 0))
    try:
        image = random_image(8, (32, 32, 3))
        status, answer = post(srv.url, json.dumps({"image": image.tolist(), "instruction": "explode"}).encode())
        assert status == 500 and "RuntimeError: CUDA out of memory (simulated)" in answer["error"]
        remote = RemoteEngine(srv.url, retries=3, sleep=lambda s: pytest.fail("500 must not be retried"))
        with pytest.raises(RemoteEngineError, match="out of memory"):
            remote.predict(image, "explode")
        assert remote.predict(image, "reach the red cube").actions.shape == (1, 7)
    finally:
        srv.shutdown()
        srv.server_close()


# client-side transport behaviour -------------------------------------------------------------------
def test_backoff_delays_and_url_parsing():
    assert backoff_delays(4, 0.5, 3.0) == [0.5, 1.0, 2.0, 3.0]
    assert backoff_delays(0, 0.5, 3.0) == []
    assert parse_server_url("http://10.0.0.2:8000/act") == ("http", "10.0.0.2", 8000, "")
    assert parse_server_url("localhost:9000/vla/") == ("http", "localhost", 9000, "/vla")
    assert parse_server_url("https://robot.example") == ("https", "robot.example", 443, "")
    for bad in ("ftp://x", "", "http://:80", "http://host:99999"):
        with pytest.raises(ValueError):
            parse_server_url(bad)


def test_refused_connection_is_retried_with_backoff_then_fails():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slept = []
    with pytest.raises(RemoteEngineError, match="3 attempt") as info:
        RemoteEngine(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.25, sleep=slept.append)
    assert "ConnectionRefusedError" in str(info.value)
    assert slept == [0.25, 0.5]


def test_timeout_is_reported():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts connections into the backlog, never answers
    try:
        slept = []
        with pytest.raises(RemoteEngineError, match="timed out") as info:
            RemoteEngine(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=0.2, retries=1, sleep=slept.append)
        assert "2 attempt" in str(info.value) and slept == [DEFAULT_BACKOFF]
    finally:
        listener.close()


DEFAULT_BACKOFF = 0.2


class _DeployLikeHandler(BaseHTTPRequestHandler):
    """A stand-in for deploy.py: no /info, a bare json_numpy answer, 503 on the first /act."""

    answers = []

    def log_message(self, *args):
        pass

    def _reply(self, status, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(404, b'{"detail":"Not Found"}')

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).answers.append(payload)
        if len(type(self).answers) == 1:
            self._reply(503, b"busy")
        elif payload.get("instruction") == "fail":
            self._reply(200, b'"error"')
        elif payload.get("instruction") == "html":
            self._reply(200, b"<html>oops</html>")
        else:
            self._reply(200, json.dumps(json_numpy.encode_array(np.linspace(-1, 1, 7))).encode())


def test_against_a_deploy_py_like_server():
    srv = start(ThreadingHTTPServer(("127.0.0.1", 0), _DeployLikeHandler))
    try:
        slept = []
        remote = RemoteEngine(f"http://127.0.0.1:{srv.server_address[1]}", sleep=slept.append, dt=0.1)
        assert remote.server_info is None and remote.dim_names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
        image = random_image(2, (16, 16, 3))
        chunk = remote.predict(image, "reach the red cube")
        assert slept == [DEFAULT_BACKOFF]  # the 503 was retried once
        assert np.array_equal(chunk.actions[0], np.linspace(-1, 1, 7)) and chunk.dt == 0.1 and chunk.tokens is None
        sent = _DeployLikeHandler.answers[-1]
        assert np.array_equal(json_numpy.decode_array(sent["image"]), image) and sent["instruction"] == "reach the red cube"
        with pytest.raises(RemoteEngineError, match="answered 'error'"):
            remote.predict(image, "fail")
        with pytest.raises(RemoteEngineError, match="non-JSON"):
            remote.predict(image, "html")
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            remote.predict(image.astype(np.float32), "go")
    finally:
        srv.shutdown()
        srv.server_close()




def test_serve_command_in_a_subprocess(tiny_checkpoint, torch_engine):
    """`serve` through its argparse spec in its own process; the remote engine gets the same actions."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENVLA_ROS_TOKEN": TOKEN}
    process = subprocess.Popen([sys.executable, "-m", "openvla_ros.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        started = json.loads(line)
        assert started["engine"] == "torch" and started["auth"] is True and started["serving"].startswith("http://127.0.0.1:")
        image = random_image(11)
        status, answer = post(started["serving"], json.dumps({"image": image.tolist(), "instruction": "go"}).encode())
        assert status == 401 and answer["field"] == "Authorization"
        chunk = RemoteEngine(started["serving"], token=TOKEN).predict(image, "reach the red cube")
        assert np.array_equal(chunk.actions, torch_engine.predict(image, "reach the red cube").actions)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.bench
def test_bench_http_round_trip(server, scene_image):
    """Median client-side latency vs the server's own engine time: the cost of HTTP + JSON (run with -s)."""
    import statistics

    results = {}
    for encoded in (False, True):
        remote = RemoteEngine(server.url, encoded=encoded)
        totals, overheads = [], []
        for i in range(23):
            chunk = remote.predict(scene_image, "reach the red cube")
            if i >= 3:
                totals.append(chunk.timings_ms["total"])
                overheads.append(chunk.timings_ms["total"] - chunk.timings_ms["server_total"])
        results["encoded" if encoded else "json_numpy"] = {
            "client_total_ms": round(statistics.median(totals), 2),
            "overhead_ms": round(statistics.median(overheads), 2), "image_shape": list(scene_image.shape)}
        remote.close()
    print(json.dumps({"benchmark": "remote_round_trip_tiny_cpu", **results}))
    assert results["json_numpy"]["overhead_ms"] > 0
