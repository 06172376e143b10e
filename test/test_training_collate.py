"""Collator and training forward (openvla_ros.training.collate / objective) are token-exact with the engine.

The engine's greedy tokens for an image are turned back into actions (through the checkpoint's own
statistics) and fed to the collator as the training target: the collator must rebuild exactly the
engine's prompt ids and those tokens, and the teacher-forced training forward must predict, at the
labelled positions, exactly the tokens the engine decoded (same embeddings, same positions).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openvla_ros.training.collate import IGNORE_INDEX, ActionCollator, TrainSample, augment_image, shift_image
from openvla_ros.training.objective import ActionObjective, multimodal_inputs
from openvla_ros.vla.checkpoint import Checkpoint

from conftest import random_image

N_PATCHES = 256


def _collator(engine, chunk_len):
    ckpt = engine.checkpoint
    key = engine.pipeline.default_unnorm_key
    return ActionCollator(ckpt, {key: ckpt.action_stats(key)}, chunk_len), key


def _batch_tensors(batch):
    return tuple(batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels"))


@pytest.fixture(scope="module")
def chunk_engine(tiny_chunk_checkpoint):
    from openvla_ros.engines.torch_engine import TorchEngine

    return TorchEngine(tiny_chunk_checkpoint)


@pytest.mark.parametrize("which", ["single", "chunk"])
def test_training_sequence_is_token_exact_with_inference(which, torch_engine, chunk_engine):
    engine = torch_engine if which == "single" else chunk_engine
    k, instruction = engine.chunk_len, "Reach the Red cube"
    image = random_image(7)
    chunk = engine.predict(image, instruction)
    collator, key = _collator(engine, k)
    sample = TrainSample(image=image, instruction=instruction, actions=chunk.actions,
                         action_mask=np.ones(k, bool), dataset=key)
    encoded = collator.encode(sample)
    prompt = engine.pipeline.input_ids(instruction)
    n_prompt, n_actions = len(prompt), k * 7
    assert encoded["input_ids"][:n_prompt] == prompt
    assert encoded["input_ids"][n_prompt:] == chunk.tokens.tolist() + [2]  # actions, then </s>
    assert collator.eos_token_id == engine.pipeline.tokenizer._tok.token_to_id("</s>")
    assert encoded["labels"] == [IGNORE_INDEX] * n_prompt + chunk.tokens.tolist() + [2]
    pixels, ids = engine.prepare(image, instruction)
    torch.testing.assert_close(encoded["pixel_values"], pixels[0], rtol=0, atol=0)

    batch = collator([sample])
    model = engine.model
    with torch.no_grad():
        embeds, mask, labels = multimodal_inputs(model, *_batch_tensors(batch))
        # The prompt part of the training sequence is the engine's prefill input, value for value.
        torch.testing.assert_close(embeds[:, :N_PATCHES + n_prompt], engine.multimodal_embeddings(pixels, ids), rtol=0, atol=0)
        assert (labels[0, 1:1 + N_PATCHES] == IGNORE_INDEX).all() and labels.shape[1] == embeds.shape[1]
        loss, predicted, target, selected = ActionObjective(model)(*_batch_tensors(batch))
    # Logits of position i predict token i+1: the first labelled position is the prefill's last.
    first = N_PATCHES + n_prompt - 1
    assert torch.nonzero(selected[0]).flatten().tolist() == list(range(first, first + n_actions + 1))
    assert target.tolist() == chunk.tokens.tolist() + [2]
    assert predicted[:n_actions].tolist() == chunk.tokens.tolist()  # teacher forcing = greedy decode
    assert float(loss) > 0


def test_padding_and_chunk_masks(chunk_engine):
    collator, key = _collator(chunk_engine, 4)
    actions = np.zeros((4, 7))
    long_sample = TrainSample(random_image(1), "pick up the red screw on the left side of the table", actions,
                              np.array([True, True, False, False]), key)
    short_sample = TrainSample(random_image(2), "wave", actions, np.ones(4, bool), key)
    batch = collator([long_sample, short_sample])
    lengths = [len(collator.encode(s)["input_ids"]) for s in (long_sample, short_sample)]
    assert lengths[0] > lengths[1]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][1, lengths[1]:] == collator.pad_token_id).all()
    labels = batch["labels"][0, :lengths[0]].tolist()
    n_prompt = lengths[0] - 4 * 7 - 1
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(v != IGNORE_INDEX for v in labels[n_prompt:n_prompt + 14])  # two valid steps x 7 dims
    assert labels[n_prompt + 14:n_prompt + 28] == [IGNORE_INDEX] * 14  # padded steps are not learnt
    assert labels[-1] == collator.eos_token_id
    # Right padding changes nothing for the shorter sequence.
    objective = ActionObjective(chunk_engine.model)
    with torch.no_grad():
        _, pred_both, target_both, _ = objective(*_batch_tensors(batch))
        _, pred_alone, target_alone, _ = objective(*_batch_tensors(collator([short_sample])))
    n_long = 14 + 1
    assert pred_both[n_long:].tolist() == pred_alone.tolist()
    assert target_both[n_long:].tolist() == target_alone.tolist()


def test_actions_are_normalised_with_their_dataset_key(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    stats = ckpt.action_stats(None)
    collator = ActionCollator(ckpt, {"a": stats}, 1)
    # q99 -> +1 -> last bin (token vocab-256); q01 -> -1 -> first bin (vocab-1); gripper 1.0 passes as +1.
    sample = TrainSample(random_image(3), "wave", np.stack([stats.q99]), np.ones(1, bool), "a")
    vocab = ckpt.config.action_vocab_size
    assert collator.action_token_ids(sample).tolist() == [[vocab - 256] * 7]
    sample.actions = np.stack([np.where(stats.mask, stats.q01, 0.0)])
    assert collator.action_token_ids(sample)[0, :6].tolist() == [vocab - 1] * 6
    with pytest.raises(ValueError, match="dataset 'b' has no statistics"):
        collator.encode(TrainSample(random_image(3), "wave", np.zeros((1, 7)), np.ones(1, bool), "b"))
    with pytest.raises(ValueError, match="non-finite"):
        collator.encode(TrainSample(random_image(3), "wave", np.full((1, 7), np.nan), np.ones(1, bool), "a"))


def test_augmentation_is_seeded_and_keeps_the_image_size():
    image = random_image(5, shape=(224, 224, 3))
    a, b, c = (np.asarray(augment_image(image, seed)) for seed in (1, 1, 2))
    assert a.shape == (224, 224, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
    assert np.abs(a.astype(int) - image.astype(int)).mean() > 1.0


def test_shift_augmentation_translates_the_image_and_repeats_its_edges(tiny_checkpoint):
    image = np.zeros((32, 40, 3), np.uint8)
    image[10:14, 20:24] = 255  # a white square, centre (11.5, 21.5)
    image[:, 0] = 50  # left column: repeated into the border when shifted right
    shifts = set()
    for seed in range(40):
        out = shift_image(image, seed, 3)
        assert out.shape == image.shape and out.flags["C_CONTIGUOUS"]
        ys, xs = np.nonzero(out[..., 0] == 255)
        dy, dx = ys.mean() - 11.5, xs.mean() - 21.5
        assert len(ys) == 16 and abs(dy) <= 3 and abs(dx) <= 3 and dy == int(dy) and dx == int(dx)
        if dx > 0:  # moved right: the left border is the repeated first column
            assert np.all(out[:, :int(dx) + 1, 0] == 50)
        shifts.add((int(dy), int(dx)))
        np.testing.assert_array_equal(out, shift_image(image, seed, 3))  # seeded
    assert len(shifts) > 15  # many of the 49 translations occur
    np.testing.assert_array_equal(shift_image(image, 0, 0), image)
    for bad in (-1, 32, 1.5):
        with pytest.raises(ValueError, match="max_shift_px"):
            shift_image(image, 0, bad)
    # In the collator: applied to seeded samples only, without the crop/jitter when crop_jitter is off.
    ckpt = Checkpoint.open(tiny_checkpoint)
    stats = ckpt.action_stats(None)
    photo = random_image(5, shape=(224, 224, 3))
    sample = TrainSample(photo, "wave", np.zeros((1, 7)), np.ones(1, bool), "a", aug_seed=3)
    shift_only = ActionCollator(ckpt, {"a": stats}, 1, crop_jitter=False, shift_px=8)
    plain = ActionCollator(ckpt, {"a": stats}, 1)
    expected = plain.pixel_values(TrainSample(shift_image(photo, 3, 8), "wave", np.zeros((1, 7)), np.ones(1, bool), "a"))
    torch.testing.assert_close(shift_only.pixel_values(sample), expected, rtol=0, atol=0)
    unseeded = TrainSample(photo, "wave", np.zeros((1, 7)), np.ones(1, bool), "a")
    torch.testing.assert_close(shift_only.pixel_values(unseeded), plain.pixel_values(unseeded), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shift_px"):
        ActionCollator(ckpt, {"a": stats}, 1, shift_px=-2)
