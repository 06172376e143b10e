"""Hostile input and faults, one regression test per defect found by probing as an attacker and a
clumsy user would: images, instructions, statistics, joint states, HTTP requests, checkpoints.

ROS-level and shutdown checks live in test_ros_hostile_inputs.py and test_ros_shutdown.py; the
property-based fuzz suite in test_fuzz_properties.py.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from hostile_images import png_declaring
from conftest import ManualClock

from openvla_ros.cli import main as cli_main
from openvla_ros.control.chunk_buffer import ChunkBuffer
from openvla_ros.control.ik_controller import STATE_BAD_JOINT_STATES, STATE_OK, STATE_RESEEDING, IkController
from openvla_ros.control.vla_controller import (BAD_CAMERA_MEMORY_S, HOLD_BAD_CAMERA, HOLD_NEW_INSTRUCTION, HOLD_UNDERRUN,
                                                LAST_ERROR_CLEAR_S, VlaController, map_gripper)
from openvla_ros.engines import json_numpy
from openvla_ros.engines.server import MemoryBudget, make_server, parse_act_request, RequestError
from openvla_ros.imaging import (MAX_IMAGE_PIXELS, decode_compressed_image, encode_compressed_image,
                                 image_fields_to_rgb)
from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import PANDA_ARM_JOINTS, PANDA_REST_POSTURE
from openvla_ros.vla.checkpoint import Checkpoint, CheckpointError
from openvla_ros.vla.constants import MAX_INSTRUCTION_CHARS

PERIOD = 0.01
WAIT_S = 10.0  # liveness bound for anything asynchronous; passing runs take milliseconds




# images ------------------------------------------------------------------------------------------
def test_a_png_declaring_60000_squared_pixels_is_a_value_error_not_a_cv2_error():
    data = png_declaring(60000, 60000)
    assert len(data) == 68
    with pytest.raises(ValueError, match="60000x60000"):
        decode_compressed_image("png", data)


def test_compressed_images_beyond_the_pixel_limit_are_refused_from_their_header():
    rgb = np.zeros((60, 80, 3), np.uint8)
    for codec in ("png", "jpeg"):
        fmt, data = encode_compressed_image(rgb, codec)
        assert decode_compressed_image(fmt, data).shape == (60, 80, 3)
        with pytest.raises(ValueError, match=f"{codec} image .*80x60 = 4800 pixels exceeds the limit of 4799"):
            decode_compressed_image(fmt, data, max_pixels=4799)
    # 8000 x 8000 of zeros compresses to ~190 KB but would decode to 192 MB.
    big = np.zeros((8000, 8000, 3), np.uint8)
    fmt, data = encode_compressed_image(big, "png")
    del big
    assert data.size < 400_000 and 8000 * 8000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="8000x8000"):
        decode_compressed_image(fmt, data)


def test_a_raw_image_with_a_huge_step_allocates_no_padding():
    # One row of 4 mono8 pixels whose step claims 2 GB: only the 4 bytes are real.
    rgb = image_fields_to_rgb("mono8", 1, 4, 2**31, bytes([1, 2, 3, 4]))
    np.testing.assert_array_equal(rgb[0, :, 0], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="exceeds the limit"):
        image_fields_to_rgb("mono8", 5000, 5000, 5000, bytes(5000 * 5000))


# vla controller ----------------------------------------------------------------------------------
class SilentEngine:
    """An engine that answers nothing until released (these tests are about what happens before a chunk)."""

    name, chunk_len, dt, dim_names = "silent", 1, 0.2, ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")

    def __init__(self):
        self.release = threading.Event()

    def info(self):
        return {"engine": self.name}

    def predict(self, image, instruction, stamp=0.0, unnorm_key=None):
        self.release.wait(WAIT_S)
        raise RuntimeError("released without an answer")


@pytest.fixture
def controller():
    clock = ManualClock(100.0)
    engine = SilentEngine()
    buffer = ChunkBuffer(control_period_s=PERIOD, clock=clock)
    ctrl = VlaController(engine, buffer, clock=clock, start_enabled=True).start()
    yield ctrl, clock
    engine.release.set()
    ctrl.shutdown()


def frame():
    return np.zeros((8, 8, 3), np.uint8)


def test_an_instruction_beyond_the_length_limit_is_refused_and_the_previous_one_stays(controller):
    ctrl, _ = controller
    assert ctrl.set_instruction("pick up the cube")
    assert not ctrl.set_instruction("x" * (MAX_INSTRUCTION_CHARS + 1))
    assert ctrl.instruction == "pick up the cube"
    assert f"{MAX_INSTRUCTION_CHARS + 1} characters (limit {MAX_INSTRUCTION_CHARS})" in ctrl.status()["last_error"]
    assert not ctrl.set_instruction("go \ud800")  # a lone surrogate no tokenizer can encode
    assert "not valid text" in ctrl.status()["last_error"]


def test_a_future_stamped_frame_is_refused_with_its_reason_and_the_camera_goes_stale(controller):
    ctrl, clock = controller
    ctrl.set_instruction("go")
    assert ctrl.on_image(frame(), clock())
    assert not ctrl.on_image(frame(), clock() + 1000.0)  # accepted, it would never go stale
    assert "1000.000 s in the future" in ctrl.status()["last_error"]
    clock.advance(0.4)
    assert not ctrl.on_image(frame(), clock() + 1000.0)
    clock.advance(0.2)  # the good frame is 0.6 s old; refused frames keep arriving
    assert ctrl.tick(PERIOD).state == HOLD_BAD_CAMERA
    assert ctrl.status()["state"] == HOLD_BAD_CAMERA
    clock.advance(BAD_CAMERA_MEMORY_S)  # nothing at all for a while
    assert ctrl.tick(PERIOD).state == "stale_camera"


def test_one_old_frame_among_good_ones_neither_refreshes_nor_flushes_the_plan(controller):
    ctrl, clock = controller
    ctrl.set_instruction("go")
    for _ in range(5):
        clock.advance(0.05)
        assert ctrl.on_image(frame(), clock())
    newest = clock()
    assert not ctrl.on_image(frame(), clock() - 10.0)  # out of order: not used
    assert ctrl.last_image_time == newest and ctrl.counters.out_of_order_images == 1
    clock.advance(0.05)
    epoch = ctrl.buffer.epoch
    assert ctrl.tick(PERIOD).state != "stale_camera" and ctrl.buffer.epoch == epoch


def test_an_instruction_flood_holds_as_new_instruction_not_underrun(controller):
    ctrl, clock = controller
    assert ctrl.on_image(frame(), clock())
    for i in range(50):
        ctrl.set_instruction(f"instruction {i}")
    out = ctrl.tick(PERIOD)
    assert out.state == HOLD_NEW_INSTRUCTION and not out.moving
    assert ctrl.status()["state"] == HOLD_NEW_INSTRUCTION
    ctrl._on_error(RuntimeError("engine failed"), "running")  # answered (with an error): plain underrun
    assert ctrl.tick(PERIOD).state == HOLD_UNDERRUN


def test_last_error_is_cleared_after_following_for_a_while(torch_engine):
    clock = ManualClock(100.0)
    buffer = ChunkBuffer(control_period_s=PERIOD, clock=clock, max_chunk_age_s=60.0)
    ctrl = VlaController(torch_engine, buffer, clock=clock, start_enabled=True, stale_image_timeout_s=60.0)
    try:
        ctrl.set_instruction("go")
        ctrl.on_bad_image("unsupported image encoding 'yuv422_weird'")
        chunk = torch_engine.predict(frame(), "go", stamp=clock())
        assert ctrl.on_image(frame(), clock())
        ctrl._on_chunk(chunk, ctrl.buffer.epoch)
        clock.advance(PERIOD)
        assert ctrl.tick(PERIOD).state == "ok" and "yuv422_weird" in ctrl.status()["last_error"]
        clock.advance(LAST_ERROR_CLEAR_S / 2)
        ctrl.on_image(frame(), clock())
        ctrl._on_chunk(torch_engine.predict(frame(), "go", stamp=clock()), ctrl.buffer.epoch)
        clock.advance(PERIOD)
        assert ctrl.tick(PERIOD).state == "ok" and ctrl.status()["last_error"] is not None
        clock.advance(LAST_ERROR_CLEAR_S / 2 + 0.1)
        ctrl.on_image(frame(), clock())
        ctrl._on_chunk(torch_engine.predict(frame(), "go", stamp=clock()), ctrl.buffer.epoch)
        clock.advance(PERIOD)
        assert ctrl.tick(PERIOD).state == "ok"
        assert ctrl.status()["last_error"] is None
    finally:
        ctrl.shutdown()


def test_the_gripper_command_stays_within_plus_minus_one_whatever_the_statistics_say():
    for mode in ("identity", "signed", "binary"):
        for invert in (False, True):
            for g in (1e300, -1e300, 3.0, -2.0):
                assert -1.0 <= map_gripper(g, mode, invert) <= 1.0
    assert map_gripper(1e300) == 1.0 and map_gripper(0.25) == 0.25


# ik controller -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kin():
    return panda_kinematics()


READY = np.array(PANDA_REST_POSTURE)


def test_one_wrong_joint_reading_while_idle_never_moves_the_command(kin):
    clock = ManualClock(10.0)
    ctrl = IkController(kin, rate_hz=100.0, clock=clock)
    ctrl.on_joint_state(PANDA_ARM_JOINTS, READY)
    targets = []
    for i in range(40):
        clock.advance(PERIOD)
        q = READY.copy()
        if i == 10:
            q[0] += 1.0  # one reading 1 rad off
        try:
            ctrl.on_joint_state(PANDA_ARM_JOINTS, q)
        except ValueError as exc:
            assert "implausible joint state: panda_joint1 jumped" in str(exc)
        targets.append(ctrl.tick().q_target)
    steps = np.abs(np.diff(np.array(targets), axis=0))
    assert steps.max() == 0.0, "a single wrong reading moved the command"
    assert ctrl.status()["counters"]["implausible_joint_states"] >= 1


@pytest.mark.parametrize("wrong", [3.2, 1e300, -1e300])
def test_readings_beyond_the_limits_are_refused_and_commands_stay_inside_them(kin, wrong):
    clock = ManualClock(10.0)
    ctrl = IkController(kin, rate_hz=100.0, clock=clock)
    lower, upper = kin.position_lower, kin.position_upper
    q = READY.copy()
    q[0] = wrong
    with pytest.raises(ValueError, match="beyond its limits"):
        ctrl.on_joint_state(PANDA_ARM_JOINTS, q)  # as the very first reading
    assert ctrl.tick().q_target is None  # nothing known: nothing commanded
    ctrl.on_joint_state(PANDA_ARM_JOINTS, READY)
    for _ in range(150):
        clock.advance(PERIOD)
        with pytest.raises(ValueError):
            ctrl.on_joint_state(PANDA_ARM_JOINTS, q)
        out = ctrl.tick()
        assert np.all(out.q_target >= lower) and np.all(out.q_target <= upper)
        np.testing.assert_array_equal(out.q_target, READY)
    assert out.state == STATE_BAD_JOINT_STATES and "beyond its limits" in ctrl.status()["last_error"]


def test_a_reset_that_persists_is_followed_at_the_velocity_limit_never_by_a_jump(kin):
    clock = ManualClock(10.0)
    ctrl = IkController(kin, rate_hz=100.0, clock=clock)
    ctrl.on_joint_state(PANDA_ARM_JOINTS, READY)
    previous = ctrl.tick().q_target
    moved = READY + np.array([0.8, -0.4, 0, 0.3, 0, 0, 0])
    states = []
    for _ in range(100):
        clock.advance(PERIOD)
        try:
            ctrl.on_joint_state(PANDA_ARM_JOINTS, moved)
        except ValueError:
            pass  # the first reading of the jump
        out = ctrl.tick()
        assert np.all(np.abs(out.q_target - previous) <= kin.velocity_limits * PERIOD + 1e-12)
        previous = out.q_target
        states.append(out.state)
    assert STATE_RESEEDING in states and states[-1] != STATE_RESEEDING
    np.testing.assert_allclose(previous, moved, atol=1e-9)


def test_a_tracking_lag_of_three_ticks_at_full_speed_does_not_reseed(kin):
    clock = ManualClock(10.0)
    ctrl = IkController(kin, rate_hz=100.0, clock=clock, command_timeout=1.0)  # default reseed_threshold
    ctrl.on_joint_state(PANDA_ARM_JOINTS, READY)
    history = [READY.copy()] * 3
    # A fast tool rotation drives joint 7 at its velocity limit (the IK scales the step down to it).
    twist = [0.0, 0.0, 0.0, 0.0, 0.0, 10.0]
    targets = []
    for _ in range(100):
        clock.advance(PERIOD)
        ctrl.on_twist("panda_link0", twist)
        out = ctrl.tick()
        targets.append(out.q_target)
        history.append(out.q_target)
        ctrl.on_joint_state(PANDA_ARM_JOINTS, history[-4])  # the arm is 3 ticks behind
    steps = np.diff(np.array(targets), axis=0)
    ratio = np.abs(steps) / (kin.velocity_limits * PERIOD)
    fastest = int(np.argmax(ratio.max(axis=0)))
    assert ratio[:, fastest].max() == pytest.approx(1.0, rel=1e-6)  # a joint moves at its velocity limit
    assert ctrl.status()["counters"].get("reseeds", 0) == 0
    direction = np.sign(steps[0, fastest])
    assert np.all(steps[:, fastest] * direction >= 0), "the command stepped backwards"


# json_numpy and the /act server -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [[2**62, 4, 3], [1] * 70, [2**70, 0]])
def test_json_numpy_shapes_that_overflow_are_a_json_numpy_error(shape):
    with pytest.raises(json_numpy.JsonNumpyError):
        json_numpy.decode_array({"__numpy__": "", "dtype": "|u1", "shape": shape}, max_bytes=1 << 20)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 50, 3), (50, 1, 3)])
def test_images_below_two_pixels_a_side_are_a_400(shape):
    with pytest.raises(RequestError) as info:
        parse_act_request({"image": np.zeros(shape, np.uint8).tolist(), "instruction": "go"})
    assert info.value.status == 400 and info.value.field == "image"


def test_a_lone_surrogate_instruction_is_a_400():
    payload = json.loads('{"image": [[[0,0,0],[0,0,0]],[[0,0,0],[0,0,0]]], "instruction": "go \\ud800"}')
    with pytest.raises(RequestError) as info:
        parse_act_request(payload)
    assert info.value.status == 400 and info.value.field == "instruction"


@pytest.fixture(scope="module")
def act_server(torch_engine):
    server = make_server(torch_engine, "127.0.0.1", 0, token="tok", max_body_bytes=100_000, max_connections=4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def raw_request(server, data: bytes, read_timeout: float = WAIT_S) -> tuple[int, dict, dict]:
    """Send raw bytes, read one response: (status, headers, JSON body). Socket timeouts are liveness bounds."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=read_timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock) -> tuple[int, dict, dict]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, json.loads(body[:length])


AUTH = b"Authorization: Bearer tok\r\n"


def post_bytes(body: bytes, extra: bytes = b"", auth: bytes = AUTH) -> bytes:
    return (b"POST /act HTTP/1.1\r\nHost: x\r\n" + auth + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_deeply_nested_json_is_a_400_not_a_dropped_connection(act_server):
    status, _, body = raw_request(act_server, post_bytes(b"[" * 50_000 + b"]" * 50_000))
    assert status == 400 and body["field"] == "body" and "nested too deeply" in body["error"]


def test_an_overflowing_json_numpy_shape_over_http_is_a_400(act_server):
    image = {"__numpy__": "", "dtype": "|u1", "shape": [2**62, 4, 3]}
    status, _, body = raw_request(act_server, post_bytes(json.dumps({"image": image, "instruction": "go"}).encode()))
    assert status == 400 and body["field"] == "image"


def test_a_content_length_of_superscript_two_is_a_400(act_server):
    request = b"POST /act HTTP/1.1\r\nHost: x\r\n" + AUTH + "Content-Length: ²\r\n\r\n".encode() + b"{}"
    status, _, body = raw_request(act_server, request)
    assert status == 400 and body["field"] == "Content-Length"


def test_two_different_content_lengths_are_a_400(act_server):
    request = b"POST /act HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
    status, _, body = raw_request(act_server, request)
    assert status == 400 and body["field"] == "Content-Length" and "different values" in body["error"]


@pytest.mark.parametrize("request_bytes, code", [
    (b"BREW /act HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/3.0\r\n\r\n", 505),
])
def test_http_level_errors_are_json(act_server, request_bytes, code):
    status, headers, body = raw_request(act_server, request_bytes)
    assert status == code and headers["content-type"] == "application/json" and body["error"]
    if code == 501:
        assert headers["allow"] == "GET, POST"


def test_413_and_401_are_answered_from_the_headers_before_any_body_is_read(act_server):
    # The body is declared but never sent: the answer must not wait for it (the old server waited
    # for its 120 s socket timeout, or read up to 16x the limit first).
    huge = b"Content-Length: 1000000\r\n\r\n"  # 10x the limit: the old server drained it before answering
    for auth, code in ((AUTH, 413), (b"", 401)):
        status, _, body = raw_request(act_server, b"POST /act HTTP/1.1\r\nHost: x\r\n" + auth + huge, read_timeout=5.0)
        assert status == code, body


def test_connections_beyond_the_cap_get_503_at_once(act_server):
    host, port = act_server.server_address[:2]
    idle = [socket.create_connection((host, port), timeout=WAIT_S) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the server accept them
        with socket.create_connection((host, port), timeout=WAIT_S) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_response(extra)
        assert status == 503 and "busy" in body["error"]
    finally:
        for sock in idle:
            sock.close()
    assert wait_for(lambda: raw_request(act_server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200)


def wait_for(predicate, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except AssertionError:
            pass
        time.sleep(0.05)
    return False


def test_the_parse_memory_budget_admits_one_large_body_at_a_time():
    budget = MemoryBudget(1000)
    first = budget.acquire(800, timeout=0)
    assert first == 800
    assert budget.acquire(800, timeout=0.01) is None  # waits, then gives up
    assert budget.acquire(10**9, timeout=0.01) is None  # capped to the whole budget, still no room
    budget.release(first)
    assert budget.acquire(10**9, timeout=0) == 1000  # one body may always take the whole budget


# checkpoints -------------------------------------------------------------------------------------
def broken_copy(tmp_path, tiny_checkpoint, edit=None, name="bad"):
    path = tmp_path / name
    shutil.copytree(tiny_checkpoint, path)
    if edit is not None:
        config = json.loads((path / "config.json").read_text())
        config = edit(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


def set_stats(path, key_edit):
    stats = json.loads((path / "dataset_statistics.json").read_text())
    key = next(iter(stats))
    key_edit(stats[key]["action"])
    (path / "dataset_statistics.json").write_text(json.dumps(stats))


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.__setitem__("q01", [float("nan")] * len(a["q01"])), "q01 must be finite"),
    (lambda a: a.__setitem__("q99", [float("inf")] * len(a["q99"])), "q99 must be finite"),
    (lambda a: a.__setitem__("q01", [1.0] * len(a["q01"])), "q01 must not exceed q99"),
])
def test_non_finite_or_inverted_statistics_are_refused_at_open(tmp_path, tiny_checkpoint, edit, message):
    path = broken_copy(tmp_path, tiny_checkpoint)
    set_stats(path, edit)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(path)


def test_an_infinite_control_period_is_refused(tmp_path, tiny_checkpoint):
    path = tmp_path / "inf"
    shutil.copytree(tiny_checkpoint, path)
    text = (path / "config.json").read_text()
    config = json.loads(text)
    config["control_period_s"] = float("inf")
    (path / "config.json").write_text(json.dumps(config))  # json writes Infinity
    assert "Infinity" in (path / "config.json").read_text()
    with pytest.raises(CheckpointError, match="control_period_s must be a finite number"):
        Checkpoint.open(path)


def with_text(key, value):
    def edit(config):
        config["text_config"][key] = value
        return config
    return edit


@pytest.mark.parametrize("edit, message", [
    (with_text("hidden_size", 10**9), "hidden_size = 1000000000 is outside"),
    (with_text("vocab_size", 10**12), "vocab_size = 1000000000000 is outside"),
    (with_text("num_hidden_layers", 10**6), "num_hidden_layers = 1000000 is outside"),
    (lambda c: {**c, "n_action_bins": 10**9}, "n_action_bins = 1000000000 is outside"),
    (with_text("num_attention_heads", 0), "num_attention_heads = 0 is outside"),
    (lambda c: {**c, "text_config": None}, "text_config must be an object"),
    (lambda c: [c], "must hold a JSON object, got list"),
])
def test_absurd_or_malformed_configs_are_one_line_errors_before_anything_is_built(tmp_path, tiny_checkpoint, capsys,
                                                                                 edit, message):
    path = broken_copy(tmp_path, tiny_checkpoint, edit)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(path)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "frame.png")
    assert cli_main(["predict", "--checkpoint", str(path), "--image", str(tmp_path / "frame.png"),
                     "--instruction", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and message.split(" ")[0] in err


def test_the_memory_estimate_refuses_a_model_larger_than_memory_before_building(tiny_checkpoint):
    import torch

    from openvla_ros.vla.loading import InsufficientMemoryError
    from openvla_ros.vla.model import check_config_fits

    config = Checkpoint.open(tiny_checkpoint).config
    need = check_config_fits(config, torch.float32, available=1 << 40)
    assert need == config.estimated_llm_bytes(4) > 0
    with pytest.raises(InsufficientMemoryError, match="GB RAM available: use --dtype bfloat16 or --engine bnb4"):
        check_config_fits(config, torch.float32, available=need - 1)
    big = dict(config.raw, text_config=dict(config.text_config, hidden_size=65536, vocab_size=1 << 20))
    from openvla_ros.vla.checkpoint import CheckpointConfig

    assert CheckpointConfig.from_dict(big).estimated_llm_bytes(4) > 500 * 2**30


def test_a_null_dataset_entry_is_a_one_line_error(tmp_path, tiny_checkpoint):
    path = broken_copy(tmp_path, tiny_checkpoint)
    (path / "dataset_statistics.json").write_text(json.dumps({"bridge": None}))
    with pytest.raises(CheckpointError, match="statistics of dataset 'bridge' must be an object"):
        Checkpoint.open(path)


def test_a_config_symlink_loop_is_a_one_line_error(tmp_path, tiny_checkpoint):
    path = broken_copy(tmp_path, tiny_checkpoint)
    (path / "config.json").unlink()
    (path / "loop").symlink_to(path / "config.json")
    (path / "config.json").symlink_to(path / "loop")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        Checkpoint.open(path)


def test_a_dangling_statistics_symlink_is_an_error_not_a_fallback(tmp_path, tiny_checkpoint):
    path = broken_copy(tmp_path, tiny_checkpoint)
    (path / "dataset_statistics.json").unlink()
    (path / "dataset_statistics.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(CheckpointError, match="dangling link .*dataset_statistics.json"):
        Checkpoint.open(path)
