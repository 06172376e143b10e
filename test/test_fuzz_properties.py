"""Property-based fuzzing of everything that parses untrusted bytes or numbers: camera images (raw
and compressed), json_numpy, /act requests, checkpoint configs and statistics, joint states and
twists. The property is always the same: an input is either accepted (and the result is within
its bounds) or refused with the typed error that names it; nothing else ever escapes, and no
joint target leaves the limits or outruns the velocity limit.

Example counts follow the Hypothesis profile in fuzz_profiles.py (HYPOTHESIS_PROFILE=nightly for a
long run).
"""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hostile_images import png_declaring
from conftest import ManualClock
from fuzz_profiles import TALLY, examples
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from openvla_ros.control.ik_controller import MAX_TICK_PERIODS, IkController, order_joint_positions
from openvla_ros.control.vla_controller import clamp_norm, map_gripper
from openvla_ros.engines import json_numpy
from openvla_ros.engines.server import (DEFAULT_MAX_IMAGE_SIDE, RequestError, _load_json, parse_act_request,
                                        parse_content_length)
from openvla_ros.imaging import (IMAGE_ENCODINGS, MAX_IMAGE_PIXELS, decode_compressed_image, encode_compressed_image,
                                 image_fields_to_rgb, rgb_to_image_fields)
from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import PANDA_ARM_JOINTS, PANDA_REST_POSTURE
from openvla_ros.vla.action_tokens import ActionStats
from openvla_ros.vla.checkpoint import CheckpointConfig, CheckpointError, validate_norm_stats
from openvla_ros.vla.tiny import default_norm_stats, tiny_config

FINITE = st.floats(allow_nan=False, allow_infinity=False)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
HOSTILE_INT = st.one_of(st.integers(-3, 300), st.sampled_from([0, -1, 2**31 - 1, 2**32 - 1, 2**63, 10**12]))
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), ANY_FLOAT, st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                               st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                          max_leaves=30)


def refused_or(fn, *args, errors=(ValueError,), **kwargs):
    """fn(*args) or the refusal; anything else than `errors` propagates and fails the property."""
    try:
        return True, fn(*args, **kwargs)
    except errors as exc:
        return False, exc


# images ------------------------------------------------------------------------------------------
@examples(200)
@given(encoding=st.one_of(st.sampled_from(sorted(IMAGE_ENCODINGS)), st.text(max_size=12)),
       height=HOSTILE_INT, width=HOSTILE_INT, step=HOSTILE_INT, data=st.none() | st.binary(max_size=4096))
def test_raw_image_fields_give_an_rgb_array_or_a_value_error(encoding, height, width, step, data):
    if data is None:  # as much data as the fields declare (when that is small): the checks past the size one
        data = bytes(min(max(step * height, 0), 200_000))
    ok, rgb = refused_or(image_fields_to_rgb, encoding, height, width, step, data)
    TALLY.record("raw image fields", accepted=ok)
    if ok:
        assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
        assert height * width <= MAX_IMAGE_PIXELS and rgb.flags.c_contiguous


@examples(100)
@given(rgb=hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))),
       encoding=st.sampled_from(sorted(set(IMAGE_ENCODINGS) - {"mono8"})), padding=st.integers(0, 9))
def test_raw_images_round_trip_through_their_message_fields(rgb, encoding, padding):
    f = rgb_to_image_fields(rgb, encoding, row_padding=padding)
    np.testing.assert_array_equal(image_fields_to_rgb(f.encoding, f.height, f.width, f.step, f.data), rgb)
    # The last row may omit its padding.
    short = f.data[: f.data.size - padding]
    np.testing.assert_array_equal(image_fields_to_rgb(f.encoding, f.height, f.width, f.step, short), rgb)
    TALLY.record("raw image round trip", accepted=True)


def _mutate(data: bytes, flips, cut, header) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    if header is not None and len(out) >= 24:
        out[16:24] = header  # PNG IHDR width/height (inside a JPEG: somewhere in its first segment)
    return bytes(out[: max(0, len(out) - cut)])


_VALID = {codec: encode_compressed_image(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8),
                                         codec)[1].tobytes() for codec in ("png", "jpeg")}




@examples(200)
@given(width=st.integers(0, 2**31 - 1) | st.integers(0, 64), height=st.integers(0, 2**31 - 1) | st.integers(0, 64))
def test_png_headers_declaring_any_size_decode_or_give_a_value_error(width, height):
    ok, rgb = refused_or(decode_compressed_image, "png", png_declaring(width, height))
    TALLY.record("png headers of any declared size", accepted=ok)
    if ok:
        assert rgb.shape[0] * rgb.shape[1] <= MAX_IMAGE_PIXELS


@examples(200)
@given(base=st.sampled_from(["png", "jpeg", "random"]), random_bytes=st.binary(max_size=512),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 64), header=st.none() | st.binary(min_size=8, max_size=8),
       fmt=st.sampled_from(["rgb8; png compressed bgr8", "rgb8; jpeg compressed rgb8", "jpeg", "", "\x00garbage"]))
def test_compressed_bytes_decode_to_rgb_or_a_value_error(base, random_bytes, flips, cut, header, fmt):
    data = random_bytes if base == "random" else _mutate(_VALID[base], flips, cut, header)
    ok, rgb = refused_or(decode_compressed_image, fmt, data)
    TALLY.record("compressed image bytes", accepted=ok)
    if ok:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert rgb.shape[0] * rgb.shape[1] <= MAX_IMAGE_PIXELS


# json_numpy --------------------------------------------------------------------------------------
DTYPES = st.one_of(st.sampled_from(["|u1", "<f8", ">i4", "<c16", "|b1", "O", "|V8", "<U4", "[('a','<f8')]", "<f2"]),
                   st.text(max_size=8))
SHAPES = st.one_of(st.lists(st.integers(-2, 2**64), max_size=6), st.lists(st.integers(0, 4), max_size=80),
                   st.sampled_from([[2**62, 4, 3], [2**63, 2], [2**64 + 1], [0, 2**70], [1] * 70]), JSON_VALUE)


@examples(200)
@given(data=st.one_of(st.text(max_size=64), st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                      JSON_SCALAR),
       dtype=st.one_of(DTYPES, JSON_SCALAR), shape=SHAPES, max_bytes=st.none() | st.integers(0, 1 << 20))
def test_json_numpy_objects_decode_or_raise_json_numpy_error(data, dtype, shape, max_bytes):
    obj = {"__numpy__": data, "dtype": dtype, "shape": shape}
    ok, array = refused_or(json_numpy.decode_array, obj, max_bytes=max_bytes, errors=(json_numpy.JsonNumpyError,))
    TALLY.record("json_numpy objects", accepted=ok)
    if ok:
        assert isinstance(array, np.ndarray) and list(array.shape) == list(shape)
        assert max_bytes is None or array.nbytes <= max_bytes


@examples(100)
@given(array=hnp.arrays(st.sampled_from([np.uint8, np.float64, np.int32, np.complex64, np.bool_]),
                        hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
def test_json_numpy_round_trips_every_plain_array(array):
    back = json_numpy.loads(json_numpy.dumps(array))
    np.testing.assert_array_equal(np.asarray(back), array)
    TALLY.record("json_numpy round trip", accepted=True)


# /act requests -----------------------------------------------------------------------------------
def _image_value(kind, side_h, side_w, channels, value):
    shape = (side_h, side_w) if channels == 0 else (side_h, side_w, channels)
    array = np.full(shape, value % 256, np.uint8)
    if kind == "json_numpy":
        return json_numpy.encode_array(array)
    if kind == "list":
        return array.tolist()
    if kind == "list_out_of_range":
        return np.full(shape, value, np.int64).tolist()
    return value


@examples(200)
@given(kind=st.sampled_from(["json_numpy", "list", "list_out_of_range", "scalar"]),
       side_h=st.integers(0, 6), side_w=st.integers(0, 6), channels=st.sampled_from([0, 1, 3, 4, 5]),
       value=st.integers(-300, 300), instruction=st.one_of(st.text(max_size=30), JSON_SCALAR),
       extra=st.dictionaries(st.sampled_from(["unnorm_key", "return_chunk", "junk"]), JSON_SCALAR, max_size=3),
       encode=st.booleans())
def test_structured_act_payloads_parse_or_give_a_4xx(kind, side_h, side_w, channels, value, instruction, extra, encode):
    payload = {"image": _image_value(kind, side_h, side_w, channels, value), "instruction": instruction, **extra}
    if encode:
        payload = {"encoded": json.dumps(payload)}
    ok, out = refused_or(parse_act_request, payload, unnorm_keys=["bridge"], errors=(RequestError,))
    TALLY.record("act payloads (structured)", accepted=ok)
    if ok:
        assert out.image.dtype == np.uint8 and out.image.ndim == 3 and out.image.shape[2] == 3
        assert min(out.image.shape[:2]) >= 2 and max(out.image.shape[:2]) <= DEFAULT_MAX_IMAGE_SIDE
        assert isinstance(out.instruction, str) and out.instruction.strip()
        out.instruction.encode("utf-8")
    else:
        assert 400 <= out.status < 500


@examples(200)
@given(payload=JSON_VALUE)
def test_arbitrary_json_values_parse_or_give_a_4xx(payload):
    ok, out = refused_or(parse_act_request, payload, errors=(RequestError,))
    TALLY.record("act payloads (arbitrary JSON)", accepted=ok)
    assert ok or 400 <= out.status < 500


@examples(200)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
                     st.integers(1, 5000).map(lambda n: b"1" * n)))
def test_request_bodies_load_as_json_or_give_a_400(raw):
    ok, out = refused_or(_load_json, raw, "body", errors=(RequestError,))
    TALLY.record("request bodies", accepted=ok)
    assert ok or out.status == 400


@examples(200)
@given(values=st.one_of(st.none(), st.lists(st.one_of(st.text(max_size=12), st.integers(-5, 10**20).map(str)),
                                            max_size=3)))
def test_content_length_values_parse_or_give_411_400_413(values):
    ok, out = refused_or(parse_content_length, values, 10_000, errors=(RequestError,))
    TALLY.record("Content-Length headers", accepted=ok)
    if ok:
        assert 0 <= out <= 10_000 and len({v.strip() for v in values}) == 1
    else:
        assert out.status in (400, 411, 413)


# checkpoint config and statistics ----------------------------------------------------------------
_CONFIG = tiny_config()
_CONFIG_KEYS = sorted(set(_CONFIG) - {"norm_stats"})
_TEXT_KEYS = sorted(_CONFIG["text_config"])


@examples(200)
@given(top=st.dictionaries(st.sampled_from(_CONFIG_KEYS), JSON_VALUE, max_size=3),
       text=st.dictionaries(st.sampled_from(_TEXT_KEYS), st.one_of(JSON_SCALAR, HOSTILE_INT), max_size=3),
       drop=st.lists(st.sampled_from(_CONFIG_KEYS), max_size=2), whole=st.none() | JSON_VALUE)
def test_checkpoint_configs_validate_or_give_a_checkpoint_error(top, text, drop, whole):
    raw = json.loads(json.dumps(_CONFIG))
    raw.update(top)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"].update(text)
    for key in drop:
        raw.pop(key, None)
    if whole is not None:
        raw = whole
    ok, config = refused_or(CheckpointConfig.from_dict, raw, errors=(CheckpointError,))
    TALLY.record("checkpoint configs", accepted=ok)
    if ok:
        assert math.isfinite(config.control_period_s) and config.control_period_s > 0
        assert 1 <= config.chunk_len and config.action_vocab_size > config.n_action_bins
        assert config.estimated_llm_bytes() < 2**64  # computable, never an overflow


_STATS = default_norm_stats()
_KEY = next(iter(_STATS))


@examples(200)
@given(field=st.sampled_from(["q01", "q99", "mask", "action", "entry", "whole"]),
       value=st.one_of(JSON_VALUE, st.lists(ANY_FLOAT, min_size=7, max_size=7)),
       normalised=st.lists(st.floats(-1, 1), min_size=7, max_size=7))
def test_statistics_validate_or_give_a_checkpoint_error_and_accepted_ones_unnormalise_finitely(field, value,
                                                                                              normalised):
    stats = json.loads(json.dumps(_STATS))
    if field == "entry":
        stats[_KEY] = value
    elif field == "whole":
        stats = value
    elif field == "action":
        stats[_KEY]["action"] = value
    else:
        stats[_KEY]["action"][field] = value
    ok, _ = refused_or(validate_norm_stats, stats, "stats", errors=(CheckpointError,))
    TALLY.record("action statistics", accepted=ok)
    if ok and isinstance(stats.get(_KEY), dict) and isinstance(stats[_KEY].get("action"), dict):
        action_stats = ActionStats.from_dict(stats[_KEY]["action"])
        if action_stats.dim == 7:
            out = action_stats.unnormalise(np.array(normalised))
            assert np.all(np.isfinite(out[action_stats.mask]))


# joint states and twists -------------------------------------------------------------------------
_KIN = panda_kinematics()
READY = np.array(PANDA_REST_POSTURE)
_JOINT = st.one_of(st.floats(-3.5, 3.5), st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 3.2]))
_EVENT = st.one_of(
    st.tuples(st.just("state"), st.integers(0, 6), _JOINT),  # the arm's reading with one joint changed
    st.tuples(st.just("state_echo"), st.just(0), st.just(0.0)),  # the arm at the last command
    st.tuples(st.just("state_names"), st.integers(0, 3), st.just(0.0)),  # missing/extra/shuffled names
    st.tuples(st.just("twist"), st.integers(0, 5), st.one_of(st.floats(-5, 5), ANY_FLOAT)),
    st.tuples(st.just("twist_frame"), st.just(0), st.just(0.0)),
    st.tuples(st.just("wait"), st.integers(0, 30), st.just(0.0)),
)


@examples(120)
@given(events=st.lists(_EVENT, min_size=1, max_size=60))
def test_any_joint_state_and_twist_stream_keeps_targets_inside_limits_and_velocity(events):
    clock = ManualClock(10.0)
    ctrl = IkController(_KIN, rate_hz=100.0, clock=clock)
    lower, upper, velocity = _KIN.position_lower, _KIN.position_upper, _KIN.velocity_limits
    period = ctrl.period
    reading = READY.copy()
    previous = None
    beyond = 0
    refused = 0
    for kind, index, value in events:
        try:
            if kind == "state":
                reading = reading.copy()
                reading[index] = value
                ctrl.on_joint_state(PANDA_ARM_JOINTS, reading)
            elif kind == "state_echo" and previous is not None:
                ctrl.on_joint_state(PANDA_ARM_JOINTS, previous)
            elif kind == "state_names":
                names = list(PANDA_ARM_JOINTS)
                names = [names[1:], names + ["extra"], names[::-1], []][index]
                ctrl.on_joint_state(names, list(READY)[: len(names)] + [0.0] * (len(names) - 7))
            elif kind == "twist":
                twist = np.zeros(6)
                twist[index] = value
                ctrl.on_twist("panda_link0", twist)
            elif kind == "twist_frame":
                ctrl.on_twist("not_the_base", np.zeros(6))
        except ValueError:
            refused += 1
        clock.advance(index * period if kind == "wait" else period)
        out = ctrl.tick()
        if out.q_target is None:
            continue
        q = out.q_target
        outside = bool(np.any(q < lower) or np.any(q > upper) or not np.all(np.isfinite(q)))
        reach = velocity * MAX_TICK_PERIODS * period + 1e-12
        jumped = previous is not None and bool(np.any(np.abs(q - previous) > reach))
        beyond += int(outside or jumped)
        previous = q
    TALLY.record("joint state / twist streams", beyond_limits=beyond)
    TALLY.record("joint state / twist messages", count=len(events))
    assert beyond == 0
    ctrl.status()  # always reportable


@examples(200)
@given(names=st.one_of(st.lists(st.one_of(st.sampled_from(PANDA_ARM_JOINTS), st.text(max_size=6)), max_size=9),
                      st.permutations(list(PANDA_ARM_JOINTS) + ["panda_finger_joint1"])),
       positions=st.one_of(st.lists(ANY_FLOAT, max_size=9), st.lists(JSON_SCALAR, max_size=9),
                           st.lists(FINITE, min_size=8, max_size=8)))
def test_joint_state_messages_order_or_give_a_value_error(names, positions):
    ok, q = refused_or(order_joint_positions, names, positions, PANDA_ARM_JOINTS)
    TALLY.record("joint state fields", accepted=ok)
    if ok:
        assert q.shape == (7,) and np.all(np.isfinite(q))


@examples(200)
@given(vector=st.lists(ANY_FLOAT, min_size=3, max_size=3), limit=st.floats(1e-6, 10.0),
       gripper=st.one_of(st.none(), ANY_FLOAT), mode=st.sampled_from(["identity", "signed", "binary"]),
       invert=st.booleans())
def test_twist_clamp_and_gripper_mapping_stay_within_their_bounds(vector, limit, gripper, mode, invert):
    v = np.array(vector)
    assume(np.all(np.isfinite(v)))  # the controller refuses non-finite commands before clamping
    with np.errstate(over="ignore"):  # a norm beyond float range: the clamp returns zero
        clamped, _ = clamp_norm(v, limit)
    assert np.linalg.norm(clamped) <= limit * (1 + 1e-9) or np.linalg.norm(v) <= limit
    g = map_gripper(gripper, mode, invert)
    assert g is None or -1.0 <= g <= 1.0
    TALLY.record("twist and gripper values", beyond_limits=0 if (g is None or abs(g) <= 1) else 1)
