import numpy as np
import pytest
import torch

from openvla_ros.engines import create_engine
from openvla_ros.engines.base import ActionChunk, Engine
from openvla_ros.engines.torch_engine import TorchEngine
from openvla_ros.vla.action_tokens import ActionTokenizer
from openvla_ros.vla.checkpoint import Checkpoint

from conftest import random_image

INSTRUCTIONS = ["reach the red cube", "Pick up the blue cube", "open the drawer"]


def reference_tokens(engine, image, instruction):
    with torch.inference_mode():
        pixel_values, ids = engine.prepare(image, instruction)
        return engine.reference_tokens(engine.multimodal_embeddings(pixel_values, ids))[0]


def test_protocol_and_chunk(torch_engine, scene_image):
    assert isinstance(torch_engine, Engine)
    chunk = torch_engine.predict(scene_image, "reach the red cube", stamp=12.5)
    assert isinstance(chunk, ActionChunk)
    assert chunk.actions.shape == (1, 7) and chunk.tokens.shape == (7,)
    assert chunk.dim_names == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    assert chunk.dt == 0.2 and chunk.stamp == 12.5 and chunk.unnorm_key == "tiny_demo"
    assert {"preprocess", "vision", "prefill", "decode", "total"} <= set(chunk.timings_ms)
    # actions are the un-normalised bin centres of the tokens
    stats = Checkpoint.open(torch_engine.checkpoint.path).action_stats("tiny_demo")
    centres = ActionTokenizer(512).decode(chunk.tokens)
    assert np.allclose(chunk.actions[0], stats.unnormalise(centres))


def test_input_ids_end_with_space_piece(torch_engine):
    ids = torch_engine.pipeline.input_ids("reach the red cube")
    tok = torch_engine.pipeline.tokenizer
    assert ids[0] == tok.bos_token_id == 1
    assert ids[-1] == tok.space_token_id
    assert ids.count(tok.space_token_id) == 1


def test_same_input_same_tokens_ten_times(torch_engine, scene_image):
    tokens = {tuple(torch_engine.predict(scene_image, "reach the red cube").tokens.tolist()) for _ in range(10)}
    assert len(tokens) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_loop_equals_generate(torch_engine, seed):
    image = random_image(seed)
    instruction = INSTRUCTIONS[seed]
    ours = torch_engine.predict(image, instruction).tokens.tolist()
    assert ours == reference_tokens(torch_engine, image, instruction)


def test_decode_loop_equals_generate_bfloat16(tiny_checkpoint):
    engine = TorchEngine(tiny_checkpoint, dtype="bfloat16")
    for seed in range(3):
        image = random_image(10 + seed)
        assert engine.predict(image, INSTRUCTIONS[seed]).tokens.tolist() == reference_tokens(engine, image, INSTRUCTIONS[seed])


def test_chunked_checkpoint_returns_k_by_d(tiny_chunk_checkpoint):
    engine = create_engine("torch", tiny_chunk_checkpoint)
    image = random_image(4)
    chunk = engine.predict(image, "reach the blue cube")
    assert engine.chunk_len == 4
    assert chunk.actions.shape == (4, 7) and chunk.tokens.shape == (28,)
    assert chunk.tokens.tolist() == reference_tokens(engine, image, "reach the blue cube")
    assert len(chunk.as_dict()["action"]) == 4


def test_outputs_depend_on_image_and_instruction(torch_engine):
    by_image = {tuple(torch_engine.predict(random_image(s), "reach the red cube").tokens.tolist()) for s in range(6)}
    assert len(by_image) > 1
    # an untrained tiny model attends weakly to the text, but some scene must show it
    varies = [len({tuple(torch_engine.predict(random_image(s), t).tokens.tolist()) for t in INSTRUCTIONS}) > 1
              for s in range(4)]
    assert any(varies)


@pytest.mark.parametrize("image, message", [
    (np.zeros((64, 64), np.uint8), "HxWx3"),
    (np.zeros((64, 64, 3), np.float64), "float64"),
])
def test_bad_image(torch_engine, image, message):
    with pytest.raises(ValueError, match=message):
        torch_engine.predict(image, "reach")


def test_empty_instruction(torch_engine):
    with pytest.raises(ValueError, match="instruction is empty"):
        torch_engine.predict(random_image(0), "  ")


def test_unknown_engine_and_device(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown engine 'tensorflow'"):
        create_engine("tensorflow", tiny_checkpoint)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        TorchEngine(tiny_checkpoint, device="tpu")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        TorchEngine(tiny_checkpoint, dtype="float8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_matches_generate(tiny_checkpoint):
    engine = TorchEngine(tiny_checkpoint, device="cuda", dtype="bfloat16")
    image = random_image(7)
    assert engine.predict(image, "reach").tokens.tolist() == reference_tokens(engine, image, "reach")


def test_patch28_backbone_gives_64_image_tokens_and_generate_identical_tokens(tmp_path):
    from openvla_ros.vla.tiny import tiny_config, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "p28", seed=3, chunk=2,
                                 config=tiny_config(chunk=2, vision_backbone_id="tiny-dinosiglip-224px-p28"))
    engine = TorchEngine(ckpt)
    image = random_image(7)
    with torch.inference_mode():
        pixel_values, ids = engine.prepare(image, "reach the red cube")
        embeddings = engine.multimodal_embeddings(pixel_values, ids)
    assert embeddings.shape[1] == 64 + ids.shape[1]  # an 8x8 grid of 28 px cells, then the prompt
    chunk = engine.predict(image, "reach the red cube")
    assert chunk.actions.shape == (2, 7)
    assert chunk.tokens.tolist() == reference_tokens(engine, image, "reach the red cube")
