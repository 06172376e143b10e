"""Prefix forcing: committed actions forced as a chunk's first tokens, the free rest decoded.

Checked against the plain decode of the same model given the same prefix, computed independently:
Hugging Face `generate()` on the multimodal embeddings with the forced tokens' embeddings appended,
and a cache-free greedy loop (one full forward per token).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openvla_ros.engines.base import ActionChunk, check_forced_prefix, supports_forced_prefix
from openvla_ros.engines.torch_engine import TorchEngine

from conftest import random_image

INSTRUCTIONS = ["reach the red cube", "Pick up the blue cube", "open the drawer"]
K, D = 4, 7  # the tiny chunk checkpoint's geometry


@pytest.fixture(scope="module")
def chunk_engine(tiny_chunk_checkpoint):
    return TorchEngine(tiny_chunk_checkpoint)


@pytest.fixture(scope="module")
def chunk_onnx_engine(tiny_chunk_checkpoint, tmp_path_factory):
    from openvla_ros.engines.onnx_engine import OnnxEngine
    from openvla_ros.engines.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx-prefix") / "k4"
    export_onnx(tiny_chunk_checkpoint, out, optimize=False)  # unoptimised: twice as fast to export
    return OnnxEngine(tiny_chunk_checkpoint, out)


def committed_plan(engine, seed: int, steps: int) -> np.ndarray:
    """A plan the arm could be executing: the first `steps` actions the model chose for another image."""
    return engine.predict(random_image(100 + seed), INSTRUCTIONS[(seed + 1) % 3]).actions[:steps]


def prompt_embeddings(engine, image, instruction) -> torch.Tensor:
    """[BOS] + patches + prompt, without any forced tokens."""
    pixel_values, ids = engine.prepare(image, instruction)
    return engine.multimodal_embeddings(pixel_values, ids)


def forced_embeddings(engine, forced_ids) -> torch.Tensor:
    ids = torch.tensor([list(forced_ids)], dtype=torch.long)
    return engine.model.language_model.get_input_embeddings()(ids)


def generate_after(engine, image, instruction, forced_ids, n_free: int) -> list[int]:
    """generate() on the prompt's embeddings with the forced tokens' embeddings appended."""
    with torch.inference_mode():
        embeds = torch.cat([prompt_embeddings(engine, image, instruction), forced_embeddings(engine, forced_ids)], dim=1)
        return engine.reference_tokens(embeds, n_free)[0]


def greedy_without_cache(engine, image, instruction, forced_ids, n_free: int) -> list[int]:
    """One full forward over the whole sequence per new token: no KV cache, no generate()."""
    lm = engine.model.language_model
    with torch.inference_mode():
        sequence = torch.cat([prompt_embeddings(engine, image, instruction), forced_embeddings(engine, forced_ids)], dim=1)
        tokens = []
        for _ in range(n_free):
            token = int(lm(inputs_embeds=sequence).logits[0, -1].argmax())
            tokens.append(token)
            sequence = torch.cat([sequence, forced_embeddings(engine, [token])], dim=1)
    return tokens


def test_forced_tokens_are_the_committed_plans_bins(chunk_engine):
    pipeline = chunk_engine.pipeline
    image = random_image(1)
    plan = chunk_engine.predict(image, "reach the red cube")
    for steps in (1, 2, 3):
        # A plan the model decoded maps back onto its own tokens (bin centres survive the round trip).
        forced = pipeline.forced_prefix_tokens(plan.actions[:steps])
        assert forced.tolist() == plan.tokens[:steps * D].tolist()
        chunk = chunk_engine.predict(image, "reach the red cube", forced_prefix=plan.actions[:steps])
        assert chunk.forced_tokens.tolist() == plan.tokens[:steps * D].tolist() and chunk.forced_steps == steps
    # Arbitrary committed actions: normalised with the key's q01/q99, binned as training does.
    stats = chunk_engine.checkpoint.action_stats("tiny_demo")
    committed = np.array([[0.01, -0.015, 0.0, 0.05, -0.02, 0.09, 0.3]])
    forced = pipeline.forced_prefix_tokens(committed)
    expected = pipeline.action_tokenizer.encode(2 * (committed[0, :6] - stats.q01[:6]) / (stats.q99[:6] - stats.q01[:6]) - 1)
    assert forced[:6].tolist() == expected.tolist()
    # The gripper is unmasked: its value is tokenised as it is (0.3, not 2*0.3-1).
    assert forced[6] == pipeline.action_tokenizer.encode(np.array([0.3]))[0]
    assert forced[6] != pipeline.action_tokenizer.encode(np.array([-0.4]))[0]
    # Beyond the statistics' range: clipped to the end bins.
    far = pipeline.forced_prefix_tokens(np.array([[1.0, -1.0, 0, 0, 0, 0, 5.0]]))
    first = pipeline.action_tokenizer.first_action_token
    assert far[0] == first and far[1] == pipeline.action_tokenizer.vocab_size - 1 and far[6] == first


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_free_tokens_equal_generate_and_a_cache_free_greedy_loop_given_the_same_prefix(chunk_engine, steps):
    for seed in range(2):
        image, instruction = random_image(seed), INSTRUCTIONS[seed]
        committed = committed_plan(chunk_engine, seed, steps)
        chunk = chunk_engine.predict(image, instruction, forced_prefix=committed)
        forced = chunk_engine.pipeline.forced_prefix_tokens(committed)
        n_free = (K - steps) * D
        assert chunk.tokens.shape == (n_free,)
        assert chunk.tokens.tolist() == generate_after(chunk_engine, image, instruction, forced, n_free)
        assert chunk.tokens.tolist() == greedy_without_cache(chunk_engine, image, instruction, forced, n_free)


def test_forcing_the_models_own_plan_reproduces_its_continuation_and_another_plan_changes_it(chunk_engine):
    changed = 0
    for seed in range(4):
        image, instruction = random_image(20 + seed), INSTRUCTIONS[seed % 3]
        plain = chunk_engine.predict(image, instruction)
        own = chunk_engine.predict(image, instruction, forced_prefix=plain.actions[:2])
        assert own.tokens.tolist() == plain.tokens[2 * D:].tolist()
        assert np.array_equal(own.actions, plain.actions[2:])
        other = chunk_engine.predict(image, instruction, forced_prefix=committed_plan(chunk_engine, seed, 2))
        changed += other.tokens.tolist() != plain.tokens[2 * D:].tolist()
    assert changed > 0  # the forced tokens condition the free ones: the test above is not vacuous


def test_the_chunks_timeline_starts_where_the_committed_actions_end(chunk_engine):
    image = random_image(5)
    committed = committed_plan(chunk_engine, 5, 3)
    chunk = chunk_engine.predict(image, "reach the red cube", stamp=10.0, forced_prefix=committed)
    assert chunk.chunk_len == K - 3 and chunk.actions.shape == (1, D) and chunk.normalised.shape == (1, D)
    assert chunk.stamp == pytest.approx(10.0 + 3 * chunk.dt) and chunk.dt == 0.2
    assert chunk.forced_steps == 3 and chunk.forced_tokens.shape == (3 * D,)
    body = chunk.as_dict()
    assert body["forced_steps"] == 3 and body["forced_tokens"] == chunk.forced_tokens.tolist()
    assert body["stamp"] == chunk.stamp and len(body["tokens"]) == D
    # actions are the un-normalised bin centres of the free tokens
    stats = chunk_engine.checkpoint.action_stats("tiny_demo")
    assert np.allclose(chunk.actions, stats.unnormalise(chunk_engine.pipeline.action_tokenizer.decode(chunk.tokens)[None]))
    assert {"prefill", "decode", "total"} <= set(chunk.timings_ms)


def test_no_prefix_or_an_empty_one_decodes_exactly_as_before(chunk_engine):
    image = random_image(6)
    plain = chunk_engine.predict(image, "open the drawer", stamp=2.0)
    for prefix in (None, np.zeros((0, D)), []):
        chunk = chunk_engine.predict(image, "open the drawer", stamp=2.0, forced_prefix=prefix)
        assert chunk.tokens.tolist() == plain.tokens.tolist() and np.array_equal(chunk.actions, plain.actions)
        assert chunk.stamp == 2.0 and chunk.forced_steps == 0 and chunk.forced_tokens is None
        assert chunk.chunk_len == K
    assert plain.as_dict()["forced_steps"] == 0 and plain.as_dict()["forced_tokens"] == []
    with torch.inference_mode():
        assert plain.tokens.tolist() == chunk_engine.reference_tokens(prompt_embeddings(chunk_engine, image, "open the drawer"))[0]


@pytest.mark.parametrize("prefix, message", [
    (np.zeros((4, D)), r"P = 4 steps.*P < K = 4"),
    (np.zeros((9, D)), r"P = 9 steps"),
    (np.zeros((2, 6)), r"\(P, 7\).*shape \(2, 6\)"),
    (np.zeros(D), r"shape \(7,\)"),
    (np.array([[0.0] * D, [0, 0, 0, np.nan, 0, 0, 0]]), r"non-finite value nan at step 1, dim 3"),
    (np.array([[np.inf] + [0.0] * (D - 1)]), r"non-finite value inf at step 0, dim 0"),
    ([["a"] * D], r"numeric \(P, D\) array"),
])
def test_bad_prefixes_are_refused_naming_the_value(chunk_engine, prefix, message):
    with pytest.raises(ValueError, match=message):
        chunk_engine.predict(random_image(0), "reach", forced_prefix=prefix)


def test_a_one_action_model_accepts_only_an_empty_prefix(torch_engine):
    assert supports_forced_prefix(torch_engine)
    image = random_image(2)
    assert torch_engine.predict(image, "reach", forced_prefix=np.zeros((0, D))).tokens.tolist() == \
        torch_engine.predict(image, "reach").tokens.tolist()
    with pytest.raises(ValueError, match=r"P = 1 steps.*P < K = 1"):
        torch_engine.predict(image, "reach", forced_prefix=np.zeros((1, D)))


def test_check_forced_prefix_and_chunk_fields():
    assert check_forced_prefix(None, 4, 7).shape == (0, 7)
    assert check_forced_prefix([[1, 2]], 2, 2).dtype == np.float64
    with pytest.raises(ValueError, match="forced_steps must be an integer >= 0, got -1"):
        ActionChunk(np.zeros((1, 2)), ["a", "b"], 0.1, forced_steps=-1)
    assert not supports_forced_prefix(object())


def test_onnx_engine_with_a_prefix_equals_the_torch_engine(chunk_onnx_engine, chunk_engine):
    engine = chunk_onnx_engine
    assert supports_forced_prefix(engine)
    seen = set()
    for seed in range(6):
        steps = seed % 3 + 1
        image, instruction = random_image(60 + seed), INSTRUCTIONS[seed % 3]
        committed = committed_plan(chunk_engine, seed, steps)
        ours = engine.predict(image, instruction, stamp=1.0, forced_prefix=committed)
        reference = chunk_engine.predict(image, instruction, stamp=1.0, forced_prefix=committed)
        assert ours.tokens.tolist() == reference.tokens.tolist(), seed
        assert ours.forced_tokens.tolist() == reference.forced_tokens.tolist()
        assert np.array_equal(ours.actions, reference.actions) and ours.stamp == reference.stamp
        assert ours.forced_steps == steps and ours.chunk_len == K - steps
        seen.add(tuple(ours.tokens.tolist()))
    assert len(seen) > 1
    with pytest.raises(ValueError, match=r"P = 4 steps"):
        engine.predict(random_image(0), "reach", forced_prefix=np.zeros((4, D)))


# Over HTTP: the /act server's optional forced_prefix field and the remote engine ------------------
def _start(engine):
    import threading

    from openvla_ros.engines.server import make_server

    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server):
    server.shutdown()
    server.server_close()


def _post(url, fields: dict):
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + "/act", data=json.dumps(fields).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class _PlainEngine:
    """A real engine behind a wrapper that does not declare forced-prefix support."""

    def __init__(self, engine):
        self.engine, self.name = engine, "plain"
        self.dim_names, self.dt, self.chunk_len = engine.dim_names, engine.dt, engine.chunk_len

    def info(self):
        return self.engine.info()

    def predict(self, image, instruction, **kwargs):
        return self.engine.predict(image, instruction, **kwargs)


def test_remote_engine_forces_a_prefix_through_the_server(chunk_engine):
    from openvla_ros.engines.remote import RemoteEngine

    server = _start(chunk_engine)
    try:
        remote = RemoteEngine(server.url)
        assert supports_forced_prefix(remote)
        for steps in (1, 3):
            image = random_image(70 + steps)
            committed = committed_plan(chunk_engine, steps, steps)
            local = chunk_engine.predict(image, "reach the red cube", stamp=5.0, forced_prefix=committed)
            chunk = remote.predict(image, "reach the red cube", stamp=5.0, forced_prefix=committed)
            assert chunk.tokens.tolist() == local.tokens.tolist() and np.array_equal(chunk.actions, local.actions)
            assert chunk.forced_steps == steps and chunk.forced_tokens.tolist() == local.forced_tokens.tolist()
            assert chunk.stamp == pytest.approx(5.0 + steps * chunk.dt) and chunk.chunk_len == K - steps
        plain = remote.predict(random_image(3), "reach the red cube", stamp=5.0)
        assert plain.chunk_len == K and plain.stamp == 5.0 and plain.forced_steps == 0
        with pytest.raises(ValueError, match="P = 4 steps"):  # refused before any request
            remote.predict(random_image(3), "reach", forced_prefix=np.zeros((4, D)))
        remote.close()
    finally:
        _stop(server)


def test_server_refuses_bad_forced_prefixes_naming_the_field_and_keeps_serving(chunk_engine):
    from openvla_ros.engines import json_numpy

    server = _start(chunk_engine)
    image = random_image(8, (32, 32, 3)).tolist()
    nan = np.zeros((2, D))
    nan[1, 2] = np.nan
    cases = [
        (np.zeros((4, D)).tolist(), "P = 4 steps"),
        (np.zeros((2, 3)).tolist(), "shape (2, 3)"),
        (json_numpy.encode_array(nan), "non-finite value nan at step 1, dim 2"),
        ([["left"] * D], "must hold numbers"),
        ([[0.0] * D, [0.0]], "not a rectangular"),
        ("0.1, 0.2", "expected a json_numpy array or a nested list, got str"),
        (json_numpy.encode_array(np.zeros((10000, D))), "exceeds 65536 bytes"),
    ]
    try:
        for prefix, message in cases:
            status, answer = _post(server.url, {"image": image, "instruction": "go", "forced_prefix": prefix})
            assert status == 400 and answer["field"] == "forced_prefix" and message in answer["error"], answer
            status, answer = _post(server.url, {"image": image, "instruction": "go", "return_chunk": True,
                                                "forced_prefix": np.zeros((1, D)).tolist()})
            assert status == 200 and answer["forced_steps"] == 1 and len(answer["tokens"]) == (K - 1) * D
    finally:
        _stop(server)


def test_a_server_without_forced_prefix_support_is_never_sent_one(chunk_engine):
    from openvla_ros.engines.remote import RemoteEngine

    server = _start(_PlainEngine(chunk_engine))
    try:
        remote = RemoteEngine(server.url)
        assert not supports_forced_prefix(remote)
        with pytest.raises(ValueError, match="does not support forced_prefix"):
            remote.predict(random_image(1), "reach", forced_prefix=np.zeros((1, D)))
        assert remote.predict(random_image(1), "reach", forced_prefix=np.zeros((0, D))).chunk_len == K
        status, answer = _post(server.url, {"image": random_image(1, (16, 16, 3)).tolist(), "instruction": "go",
                                            "forced_prefix": [[0.0] * D]})
        assert status == 400 and "plain engine cannot decode with a forced prefix" in answer["error"]
        remote.close()
    finally:
        _stop(server)


class _IgnoringEngine(_PlainEngine):
    """Claims support but decodes as if no prefix had been sent (a server that drops the field)."""

    supports_forced_prefix = True

    def predict(self, image, instruction, **kwargs):
        kwargs.pop("forced_prefix", None)
        return self.engine.predict(image, instruction, **kwargs)


def test_a_chunk_decoded_without_the_requested_prefix_is_refused(chunk_engine):
    from openvla_ros.engines.remote import RemoteEngine, RemoteEngineError

    server = _start(_IgnoringEngine(chunk_engine))
    try:
        remote = RemoteEngine(server.url)
        with pytest.raises(RemoteEngineError, match="force 2 step.*forced_steps = 0"):
            remote.predict(random_image(1), "reach", forced_prefix=np.zeros((2, D)))
        remote.close()
    finally:
        _stop(server)


# The bnb engines' decode path (module forwards + HF cache), and the GPU backends ------------------
def test_hf_greedy_decode_after_the_forced_tokens_equals_the_torch_engines_free_tokens(chunk_engine):
    from openvla_ros.engines.bnb_engine import hf_greedy_decode

    for steps in (1, 2):
        image = random_image(80 + steps)
        committed = committed_plan(chunk_engine, steps, steps)
        forced = chunk_engine.pipeline.forced_prefix_tokens(committed)
        with torch.inference_mode():
            embeds = chunk_engine.multimodal_embeddings(*chunk_engine.prepare(image, "reach the red cube", forced))
        tokens = hf_greedy_decode(chunk_engine.model.language_model, embeds, (K - steps) * D)
        assert tokens == chunk_engine.predict(image, "reach the red cube", forced_prefix=committed).tokens.tolist()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _has("bitsandbytes")), reason="needs CUDA and bitsandbytes")
def test_bnb4_engine_decodes_the_free_part_after_a_prefix(tiny_chunk_checkpoint, chunk_engine):
    from openvla_ros.engines import create_engine

    engine = create_engine("bnb4", tiny_chunk_checkpoint)
    assert supports_forced_prefix(engine)
    committed = committed_plan(chunk_engine, 0, 2)
    chunk = engine.predict(random_image(0), "reach the red cube", stamp=1.0, forced_prefix=committed)
    assert chunk.actions.shape == (K - 2, D) and chunk.stamp == pytest.approx(1.0 + 2 * chunk.dt) and chunk.is_finite
    assert chunk.forced_tokens.tolist() == chunk_engine.pipeline.forced_prefix_tokens(committed).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _has("tensorrt")), reason="needs CUDA and tensorrt")
def test_tensorrt_fp32_with_a_prefix_equals_torch(tiny_chunk_checkpoint, chunk_engine, tmp_path):
    from openvla_ros.engines import create_engine
    from openvla_ros.engines.onnx_export import export_onnx
    from openvla_ros.engines.tensorrt_engine import build_trt

    export_onnx(tiny_chunk_checkpoint, tmp_path / "onnx")
    build_trt(tiny_chunk_checkpoint, tmp_path / "onnx", tmp_path / "trt", precision="fp32", max_prompt_tokens=64)
    engine = create_engine("tensorrt", tiny_chunk_checkpoint, trt_dir=tmp_path / "trt")
    for seed in range(4):
        steps = seed % 3
        image = random_image(90 + seed)
        committed = committed_plan(chunk_engine, seed, steps)
        ours = engine.predict(image, "reach the red cube", forced_prefix=committed)
        reference = chunk_engine.predict(image, "reach the red cube", forced_prefix=committed)
        assert ours.tokens.tolist() == reference.tokens.tolist() and ours.forced_steps == steps
        soft = engine.predict(image, "reach the red cube", forced_prefix=committed, prefix_soft_bins=1)
        assert soft.tokens.tolist() == chunk_engine.predict(image, "reach the red cube", forced_prefix=committed,
                                                            prefix_soft_bins=1).tokens.tolist()


# Benchmark: forced tokens join the prefill, P*D decode steps fewer ---------------------------------
def test_bench_forced_prefix_rows_and_refusals(chunk_engine, torch_engine):
    from openvla_ros.engines.bench import bench_forced_prefix, bench_inputs, format_forced_prefix_table

    inputs = bench_inputs(2, "reach the red cube")
    result = bench_forced_prefix(chunk_engine, inputs, steps=[2], runs=1, warmup=0)
    assert [(r["forced_steps"], r["forced_tokens"], r["decoded_tokens"]) for r in result["rows"]] == [(0, 0, 28), (2, 14, 14)]
    assert result["rows"][0]["latency_ratio_to_plain"] == 1.0 and result["rows"][1]["latency_ms_p50"] > 0
    assert "x plain" in format_forced_prefix_table(result)
    with pytest.raises(ValueError, match=r"0\.\.3 \(P < K = 4\), got \[0, 4\]"):
        bench_forced_prefix(chunk_engine, inputs, steps=[4])
    with pytest.raises(ValueError, match=r"0\.\.0 \(P < K = 1\)"):
        bench_forced_prefix(torch_engine, inputs, steps=[1])


def test_cli_bench_engine_forced_steps(tiny_chunk_checkpoint, capsys):
    import json

    from openvla_ros.cli import main

    assert main(["bench", "engine", "--checkpoint", str(tiny_chunk_checkpoint), "--forced-steps", "3",
                 "--runs", "1", "--warmup", "0", "--images", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "forced_prefix" and [r["forced_steps"] for r in result["rows"]] == [0, 3]
    assert main(["bench", "engine", "--checkpoint", str(tiny_chunk_checkpoint), "--forced-steps", "3",
                 "--engine", "onnx"]) == 2
    assert "--forced-steps [3] benches the torch engine alone; drop --engine ['onnx']" in capsys.readouterr().err


@pytest.mark.bench
def test_bench_decode_time_with_forced_steps_against_none(tiny_chunk_checkpoint):
    """Printed (run with -s): p50 latency and language-model time with P = 0..3 forced steps on K = 4."""
    import json

    from openvla_ros.engines.bench import bench_forced_prefix, bench_inputs, format_forced_prefix_table

    engine = TorchEngine(tiny_chunk_checkpoint)
    result = bench_forced_prefix(engine, bench_inputs(3, "reach the red cube"), steps=[1, 2, 3], runs=30, warmup=3)
    print(format_forced_prefix_table(result))
    print(json.dumps(result["rows"]))
    # Forcing 3 of 4 actions removes 21 of 27 decode steps; the language model must get cheaper.
    assert result["rows"][-1]["lm_ratio_to_plain"] < 1.0


# Soft variant: the first P steps restricted to +-k bins of the committed plan ---------------------
def masked_greedy_without_cache(engine, image, instruction, windows, n_tokens: int) -> list[int]:
    """Cache-free greedy loop with every id outside windows[i] set to -inf for token i."""
    lm = engine.model.language_model
    with torch.inference_mode():
        sequence = prompt_embeddings(engine, image, instruction)
        tokens = []
        for i in range(n_tokens):
            logits = lm(inputs_embeds=sequence).logits[0, -1].clone()
            if i < len(windows):
                lo, hi = windows[i]
                mask = torch.full_like(logits, float("-inf"))
                mask[lo:hi + 1] = 0.0
                logits = logits + mask
            tokens.append(int(logits.argmax()))
            sequence = torch.cat([sequence, forced_embeddings(engine, tokens[-1:])], dim=1)
    return tokens


def test_soft_prefix_keeps_the_first_steps_within_k_bins_and_equals_a_masked_greedy_loop(chunk_engine):
    moved = 0
    for seed in range(3):
        steps, k = seed + 1, 2
        image, instruction = random_image(110 + seed), INSTRUCTIONS[seed]
        committed = committed_plan(chunk_engine, seed, steps)
        plan_tokens = chunk_engine.pipeline.forced_prefix_tokens(committed)
        chunk = chunk_engine.predict(image, instruction, stamp=4.0, forced_prefix=committed, prefix_soft_bins=k)
        # All K actions, on the observation's own timeline: nothing was forced.
        assert chunk.chunk_len == K and chunk.stamp == 4.0 and chunk.forced_steps == 0 and chunk.forced_tokens is None
        head = chunk.tokens[:steps * D]
        assert np.all(np.abs(head - plan_tokens) <= k), (head, plan_tokens)
        windows = chunk_engine.pipeline.soft_prefix_windows(plan_tokens, k)
        assert chunk.tokens.tolist() == masked_greedy_without_cache(chunk_engine, image, instruction, windows, K * D)
        plain = chunk_engine.predict(image, instruction)
        moved += plain.tokens[:steps * D].tolist() != head.tolist()
    assert moved > 0  # the windows bound the choice: without them some step leaves them


def test_soft_prefix_with_zero_bins_equals_forcing(chunk_engine):
    for steps in (1, 3):
        image = random_image(120 + steps)
        committed = committed_plan(chunk_engine, steps, steps)
        forced = chunk_engine.predict(image, "reach the red cube", forced_prefix=committed)
        soft = chunk_engine.predict(image, "reach the red cube", forced_prefix=committed, prefix_soft_bins=0)
        assert soft.tokens[:steps * D].tolist() == forced.forced_tokens.tolist()
        assert soft.tokens[steps * D:].tolist() == forced.tokens.tolist()


def test_soft_windows_stay_inside_the_action_bins_and_bad_widths_are_refused(chunk_engine):
    pipeline = chunk_engine.pipeline
    first, last = pipeline.action_tokenizer.first_action_token, pipeline.action_tokenizer.vocab_size - 1
    assert pipeline.soft_prefix_windows([first, last, first + 10], 3) == [(first, first + 3), (last - 3, last),
                                                                          (first + 7, first + 13)]
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"prefix_soft_bins must be an integer >= 0.*got {bad!r}"):
            chunk_engine.predict(random_image(0), "reach", forced_prefix=np.zeros((1, D)), prefix_soft_bins=bad)
    image = random_image(1)
    assert chunk_engine.predict(image, "reach", prefix_soft_bins=3).tokens.tolist() == \
        chunk_engine.predict(image, "reach").tokens.tolist()


def test_onnx_soft_prefix_equals_torch(chunk_onnx_engine, chunk_engine):
    engine = chunk_onnx_engine
    for seed in range(3):
        image = random_image(130 + seed)
        committed = committed_plan(chunk_engine, seed, seed + 1)
        ours = engine.predict(image, INSTRUCTIONS[seed], forced_prefix=committed, prefix_soft_bins=1)
        reference = chunk_engine.predict(image, INSTRUCTIONS[seed], forced_prefix=committed, prefix_soft_bins=1)
        assert ours.tokens.tolist() == reference.tokens.tolist() and ours.chunk_len == K


def test_remote_refuses_the_soft_variant(chunk_engine):
    from openvla_ros.engines.remote import RemoteEngine

    server = _start(chunk_engine)
    try:
        remote = RemoteEngine(server.url)
        with pytest.raises(ValueError, match="prefix_soft_bins=2: the /act protocol carries a forced prefix only"):
            remote.predict(random_image(1), "reach", forced_prefix=np.zeros((1, D)), prefix_soft_bins=2)
        remote.close()
    finally:
        _stop(server)
