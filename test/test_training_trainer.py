"""End-to-end fine-tuning on tiny checkpoints (openvla_ros.training.trainer / cli), on the CPU.

A tiny model overfits a handful of bag frames and the exported checkpoint reproduces their actions
through the unchanged TorchEngine; a stopped and resumed run repeats the uninterrupted one exactly;
two gloo processes under torchrun give the weights of one process with the same global batch.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from openvla_ros.engines.torch_engine import TorchEngine
from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.training.cli import add_train_arguments, config_from_args, train_main
from openvla_ros.training.collate import ActionCollator, TrainSample
from openvla_ros.training.data import EpisodeReadOptions
from openvla_ros.training.objective import ActionObjective
from openvla_ros.training.stats import stats_for
from openvla_ros.training.trainer import (CONFIG_KEY_TRAINING, DatasetConfig, TrainConfig, evaluate, list_snapshots, run_training,
                                          run_training_local_processes, snapshot_dir)
from openvla_ros.vla.checkpoint import Checkpoint

INSTRUCTION = "reach the red cube"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_bags(tmp_path_factory):
    """3 episodes x 4 frames: random images, random 7-D actions (gripper 0/1) on a Float64MultiArray topic."""
    root = tmp_path_factory.mktemp("bags")
    rng = np.random.default_rng(0)
    frames = []
    for e in range(3):
        with BagWriter(root / f"ep{e}") as w:
            w.write_string("/vla/instruction", 0.9, INSTRUCTION)
            for t in range(4):
                image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                action = np.concatenate([rng.uniform(-0.02, 0.02, 6), [float(t % 2)]])
                w.write_image("/camera/image_raw", 1 + 0.2 * t, image)
                w.write_float64_array("/act", 1 + 0.2 * t, action)
                frames.append((e, image, action))
    return root, frames


def _dataset(root, episodes=None):
    paths = [str(root / f"ep{e}") for e in episodes] if episodes is not None else [str(root)]
    return DatasetConfig("demo", paths, read=EpisodeReadOptions(action_topic="/act"))


def _weights(path):
    return {k: v for f in sorted(Path(path).glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


def _losses(log_path):
    with open(log_path) as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_lora_fine_tune_overfits_and_the_engine_reproduces_the_actions(tmp_path, tiny_checkpoint, demo_bags):
    root, frames = demo_bags
    out = tmp_path / "run"
    config = TrainConfig(out_dir=str(out), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint),
                         steps=100, batch_size=4, lr=3e-3, lora_rank=16, train_parts=["projector"], augment=False,
                         val_fraction=0.34, eval_every=50, progress=False, save_adapter=True)
    result = run_training(config)
    rows = list(csv.DictReader(open(result.log_path)))
    assert len(rows) == 100
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    assert rows[49]["val_token_accuracy"] != "" and rows[10]["val_token_accuracy"] == ""  # validated every 50 steps
    run = json.loads((out / "run_config.json").read_text())
    val_episode = run["val_episodes"][0][0]
    assert run["train_episodes"] == [[e for e in range(3) if e != val_episode]]
    assert (out / "lora_adapter" / "adapter_config.json").exists()

    # The exported checkpoint: statistics of the training episodes, loadable by the unchanged engine.
    ckpt = Checkpoint.open(out)
    assert ckpt.unnorm_keys == ["demo"] and ckpt.config.raw["openvla_ros_training"]["lora_rank"] == 16
    train_actions = np.stack([a for e, _, a in frames if e != val_episode])
    np.testing.assert_allclose(ckpt.action_stats("demo").q99, np.quantile(train_actions, 0.99, axis=0))
    engine = TorchEngine(out)
    stats = ckpt.action_stats("demo")
    bin_width = np.where(stats.mask, (stats.q99 - stats.q01) / 255, 2 / 255)
    samples = []
    for e, image, action in frames:
        if e == val_episode:
            continue
        chunk = engine.predict(image, INSTRUCTION)
        target = stats.unnormalise(stats.normalise(action))  # q01/q99 clip the extremes, as in training
        assert np.all(np.abs(chunk.actions[0] - target) <= bin_width * 0.51), (e, chunk.actions[0], target)
        samples.append(TrainSample(image, INSTRUCTION, action[None], np.ones(1, bool), "demo"))
    # Teacher-forced validation on the training frames through the exported weights: every token right.
    collator = ActionCollator(ckpt, stats_for(ckpt.norm_stats), 1)
    metrics = evaluate(ActionObjective(engine.model), collator, samples)
    assert metrics["val_token_accuracy"] == 1.0
    assert metrics["val_l1"] < np.max(np.abs(train_actions - stats.unnormalise(stats.normalise(train_actions)))) + bin_width.max()


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, tiny_checkpoint, demo_bags):
    root, _ = demo_bags

    def config(out, steps):
        return TrainConfig(out_dir=str(out), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint),
                           steps=steps, batch_size=2, grad_accum=2, lr=3e-3, lora_rank=4, lora_dropout=0.1,
                           train_parts=["projector"], augment=True, val_fraction=0.0, save_every=2, progress=False,
                           cache_dir=str(tmp_path / "cache"))

    straight = run_training(config(tmp_path / "straight", 4))
    run_training(config(tmp_path / "split", 2))
    resumed = run_training(config(tmp_path / "split", 4))
    assert resumed.steps == 4
    assert _losses(resumed.log_path) == _losses(straight.log_path)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # A changed configuration does not silently continue another run's state.
    changed = config(tmp_path / "split", 6)
    changed.lr = 1e-3
    with pytest.raises(ValueError, match="different configuration"):
        run_training(changed)


def test_weight_average_is_exported_and_resumed_exactly(tmp_path, tiny_checkpoint, demo_bags):
    """ema_decay: training is unchanged, the export is the running average, and it survives a resume."""
    root, _ = demo_bags

    def config(out, steps, decay):
        return TrainConfig(out_dir=str(out), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint),
                           steps=steps, batch_size=2, lr=3e-3, lora_rank=4, train_parts=["projector"], augment=False,
                           val_fraction=0.0, save_every=2, progress=False, cache_dir=str(tmp_path / "cache"),
                           ema_decay=decay)

    plain = run_training(config(tmp_path / "plain", 4, 0.0))
    straight = run_training(config(tmp_path / "ema", 4, 0.9))
    run_training(config(tmp_path / "split", 2, 0.9))
    run_training(config(tmp_path / "split", 4, 0.9))
    assert _losses(straight.log_path) == _losses(plain.log_path)  # the average does not train
    last, averaged, resumed = _weights(tmp_path / "plain"), _weights(tmp_path / "ema"), _weights(tmp_path / "split")
    init = _weights(tiny_checkpoint)
    trained = [n for n in last if not torch.equal(last[n], init[n])]
    assert trained
    for name in last:
        torch.testing.assert_close(resumed[name], averaged[name], rtol=0, atol=0, msg=name)
        if name not in trained:
            torch.testing.assert_close(averaged[name], last[name], rtol=0, atol=0, msg=name)
    # The average lags behind the last step's weights, towards where training started.
    for name in trained:
        assert (averaged[name] - init[name]).abs().sum() < (last[name] - init[name]).abs().sum(), name
    # A vanishing decay exports the last step's weights.
    run_training(config(tmp_path / "tiny_decay", 4, 1e-9))
    for name, value in _weights(tmp_path / "tiny_decay").items():
        torch.testing.assert_close(value, last[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="ema_decay"):
        config(tmp_path / "bad", 1, 1.0).validated()


def test_snapshots_are_complete_checkpoints_of_their_step_and_survive_a_resume(tmp_path, tiny_checkpoint, demo_bags):
    root, frames = demo_bags

    def config(out, steps):
        return TrainConfig(out_dir=str(out), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint),
                           steps=steps, batch_size=2, lr=3e-3, lora_rank=4, train_parts=["projector"], augment=False,
                           val_fraction=0.0, save_every=2, snapshot_every=2, progress=False,
                           cache_dir=str(tmp_path / "cache"))

    straight = run_training(config(tmp_path / "straight", 4))
    found = list_snapshots(straight.checkpoint_dir)
    assert [step for step, _ in found] == [2, 4]
    assert [path for _, path in found] == [snapshot_dir(straight.checkpoint_dir, s) for s in (2, 4)]
    final, last, first = (_weights(p) for p in (straight.checkpoint_dir, found[1][1], found[0][1]))
    assert final.keys() == last.keys() == first.keys()
    for name in final:
        torch.testing.assert_close(last[name], final[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(first[n], final[n]) for n in final)  # step 2 is an earlier model
    # Each snapshot is a checkpoint the engines load, and it says which step it is.
    engine = TorchEngine(found[0][1])
    assert engine.predict(frames[0][1], INSTRUCTION).actions.shape[1] == 7
    assert Checkpoint.open(found[0][1]).config.raw[CONFIG_KEY_TRAINING]["steps"] == 2
    # Stopped after the first snapshot and resumed: the same snapshots, bit for bit; a half-written
    # one (a run killed mid-export) is not listed.
    run_training(config(tmp_path / "split", 2))
    (tmp_path / "split" / "snapshots" / "step_000003.partial").mkdir()
    run_training(config(tmp_path / "split", 4))
    assert [step for step, _ in list_snapshots(tmp_path / "split")] == [2, 4]
    for (_, a), (_, b) in zip(found, list_snapshots(tmp_path / "split")):
        wa, wb = _weights(a), _weights(b)
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="snapshot_every must be an integer >= 0 .*got -1"):
        dataclasses.replace(config(tmp_path / "bad", 1), snapshot_every=-1).validated()


def test_gaussian_bin_targets_train_and_export_the_same_checkpoint_format(tmp_path, tiny_checkpoint, demo_bags):
    """action_bin_sigma changes the loss the model is trained on, not what is exported."""
    root, _ = demo_bags

    def config(out, sigma):
        return TrainConfig(out_dir=str(out), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint),
                           steps=3, batch_size=2, lr=3e-3, lora_rank=4, train_parts=["projector"], augment=False,
                           val_fraction=0.0, progress=False, cache_dir=str(tmp_path / "cache"), action_bin_sigma=sigma)

    plain, smoothed = run_training(config(tmp_path / "plain", 0.0)), run_training(config(tmp_path / "smoothed", 4.0))
    # Same first batch, different objective: a Gaussian target's cross-entropy includes its own
    # entropy, so the loss differs from the one-hot loss from the first step on.
    assert float(_losses(smoothed.log_path)[0][1]) != pytest.approx(float(_losses(plain.log_path)[0][1]))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "smoothed")
    assert a.keys() == b.keys() and any(not torch.equal(a[n], b[n]) for n in a)
    chunk = TorchEngine(tmp_path / "smoothed").predict(demo_bags[1][0][1], INSTRUCTION)
    assert chunk.actions.shape == (1, 7) and np.all(np.isfinite(chunk.actions))
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="action_bin_sigma"):
            config(tmp_path / "bad", bad).validated()


def test_continued_training_can_keep_the_base_checkpoints_action_statistics(tmp_path, tiny_checkpoint, demo_bags):
    """keep_base_statistics: a model trained on more data keeps its bins' meaning (DAgger rounds)."""
    root, _ = demo_bags

    def config(out, base, episodes, keep):
        return TrainConfig(out_dir=str(out), datasets=[_dataset(root, episodes)], base_checkpoint=str(base), steps=2,
                           batch_size=2, lora_rank=4, train_parts=["projector"], augment=False, val_fraction=0.0,
                           progress=False, cache_dir=str(tmp_path / "cache"), keep_base_statistics=keep)

    first = run_training(config(tmp_path / "first", tiny_checkpoint, [0, 1], False)).checkpoint_dir
    base_stats = Checkpoint.open(first).norm_stats["demo"]
    kept = Checkpoint.open(run_training(config(tmp_path / "kept", first, [2], True)).checkpoint_dir)
    own = Checkpoint.open(run_training(config(tmp_path / "own", first, [2], False)).checkpoint_dir)
    # Episode 2's actions alone have other percentiles; kept, the base's are exported unchanged.
    assert kept.norm_stats["demo"] == base_stats
    # The continued run's own records, not copies of the base run's.
    assert [step for step, _ in _losses(tmp_path / "kept" / "train_log.csv")] == [1, 2]
    assert json.loads((tmp_path / "kept" / "run_config.json").read_text())["config"]["out_dir"] == str(tmp_path / "kept")
    assert own.norm_stats["demo"]["action"]["q01"] != base_stats["action"]["q01"]
    with pytest.raises(ValueError, match="keep_base_statistics needs a base_checkpoint"):
        TrainConfig(out_dir=str(tmp_path / "x"), datasets=[_dataset(root)], from_scratch=True,
                    keep_base_statistics=True).validated()
    other = TrainConfig(out_dir=str(tmp_path / "other"), datasets=[DatasetConfig("other", [str(root / "ep2")],
                        read=EpisodeReadOptions(action_topic="/act"))], base_checkpoint=str(first), steps=1,
                        batch_size=2, lora_rank=4, augment=False, val_fraction=0.0, progress=False,
                        cache_dir=str(tmp_path / "cache"), keep_base_statistics=True)
    with pytest.raises(ValueError, match=r"statistics for \['demo'\], none of the datasets \['other'\]"):
        run_training(other)


def test_worker_processes_give_the_weights_of_the_in_process_loader(tmp_path, tiny_checkpoint, demo_bags):
    import multiprocessing

    root, _ = demo_bags

    def config(out, workers):
        return TrainConfig(out_dir=str(out), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint),
                           steps=3, batch_size=2, grad_accum=2, lr=3e-3, lora_rank=4, lora_dropout=0.1,
                           train_parts=["projector"], augment=True, val_fraction=0.0, progress=False,
                           num_workers=workers, cache_dir=str(tmp_path / "cache"))

    seen = []
    first = run_training(config(tmp_path / "w2a", 2), on_step=lambda step, seconds, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [1, 2, 3] and all(np.isfinite(l) and l > 0 for _, l in seen)
    assert seen[-1][1] == first.final_loss
    assert not multiprocessing.active_children()  # the workers are stopped when training ends
    run_training(config(tmp_path / "w2b", 2))
    run_training(config(tmp_path / "w0", 0))
    a, b, c = _weights(tmp_path / "w2a"), _weights(tmp_path / "w2b"), _weights(tmp_path / "w0")
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)  # same seed, 2 workers, twice
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)  # workers change nothing trained
    assert _losses(tmp_path / "w2a" / "train_log.csv") == _losses(tmp_path / "w0" / "train_log.csv")
    # The worker count is not part of a run's identity: a run resumes with a different one.
    assert run_training(config(tmp_path / "w0", 1)).steps == 3


def _scratch_args(root, out, *extra):
    return ["--from-scratch", "--data", str(root), "--out", str(out), "--action-topic", "/act", "--steps", "3",
            "--lr", "1e-3", "--val-fraction", "0", "--no-progress", "--seed", "5", *extra]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, demo_bags):
    root, _ = demo_bags
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
         "-m", "openvla_ros.training.cli", *_scratch_args(root, tmp_path / "ddp", "--batch-size", "2")],
        env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert train_main(_scratch_args(root, tmp_path / "single", "--batch-size", "4")) == 0
    assert train_main(_scratch_args(root, tmp_path / "accum", "--batch-size", "1", "--grad-accum", "4")) == 0
    # The same two ranks started from Python (what the demo does), no torchrun.
    parser = add_train_arguments(argparse.ArgumentParser())
    local = config_from_args(parser.parse_args(_scratch_args(root, tmp_path / "local", "--batch-size", "2")))
    result = run_training_local_processes(local, 2)
    assert result.steps == 3 and np.isfinite(result.final_loss) and result.checkpoint_dir == tmp_path / "local"
    assert "WORLD_SIZE" not in os.environ and not torch.distributed.is_initialized()
    for name in ("ddp", "local"):
        assert json.loads((tmp_path / name / "run_config.json").read_text())["world_size"] == 2
    single = _weights(tmp_path / "single")
    init = _weights(tmp_path / "single" / "init_checkpoint")
    moved = [n for n in single if not torch.equal(single[n], init[n])]
    assert len(moved) > 0.5 * len(single)  # full fine-tuning from scratch changed most tensors
    # Summation order differs between batch layouts (float noise ~1e-7 in gradients). Adam divides each
    # gradient by its own running magnitude, so on a near-zero gradient that noise can move a weight by a
    # small fraction of lr: allow 1% of lr per element (the updates themselves are up to 3 x lr).
    lr = 1e-3
    for other in ("ddp", "local", "accum"):
        weights = _weights(tmp_path / other)
        for name in single:
            torch.testing.assert_close(weights[name], single[name], rtol=0, atol=0.01 * lr, msg=f"{other}: {name}")
        total = sum(v.numel() for v in single.values())
        close = sum(int(((weights[n] - single[n]).abs() <= 1e-7).sum()) for n in single)
        assert close >= 0.999 * total  # all but a few near-zero-gradient elements agree to float noise
        assert [float(l) for _, l in _losses(tmp_path / other / "train_log.csv")] == pytest.approx(
            [float(l) for _, l in _losses(tmp_path / "single" / "train_log.csv")], rel=1e-4)
    # The checkpoint trained from scratch is a complete official-format directory.
    assert TorchEngine(tmp_path / "ddp").predict(demo_bags[1][0][1], INSTRUCTION).actions.shape == (1, 7)


def test_invalid_configurations_are_rejected(tmp_path, tiny_checkpoint, demo_bags):
    root, _ = demo_bags
    base = dict(out_dir=str(tmp_path / "x"), datasets=[_dataset(root)], base_checkpoint=str(tiny_checkpoint))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TrainConfig(**base, quantize="4bit").validated()
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(**base, lora_rank=0).validated()
    with pytest.raises(ValueError, match="exactly one of base_checkpoint and from_scratch"):
        TrainConfig(**base, from_scratch=True, lora_rank=0, train_parts=["projector"]).validated()
    with pytest.raises(ValueError, match="unknown train_parts"):
        TrainConfig(**base, train_parts=["head"]).validated()
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        TrainConfig(**base, num_workers=-1).validated()
    parser = add_train_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--checkpoint", "B", "--data", "a", "b", "--data", "c", "--dataset-name", "x",
                              "--dataset-name", "y", "--weight", "1", "--weight", "3", "--out", "O", "--full",
                              "--num-workers", "3", "--keep-base-stats", "--snapshot-every", "50"])
    cfg = config_from_args(args)
    assert cfg.num_workers == 3 and cfg.keep_base_statistics is True and cfg.snapshot_every == 50
    assert [(d.name, d.paths, d.weight) for d in cfg.datasets] == [("x", ["a", "b"], 1.0), ("y", ["c"], 3.0)]
    assert cfg.lora_rank == 0 and cfg.train_parts == ["vision_backbone", "projector", "language_model"]
    args = parser.parse_args(["--checkpoint", "B", "--data", "a", "--data", "c", "--weight", "2", "--out", "O"])
    with pytest.raises(ValueError, match="2 --data groups need as many"):
        config_from_args(args)


def test_mixture_schedule_follows_weights_and_covers_each_dataset_per_epoch():
    from openvla_ros.training.trainer import BatchSchedule

    schedule = BatchSchedule([5, 20], [1.0, 3.0], seed=0)
    cursors = [0, 0]
    refs = [ref for step in range(200) for ref in schedule.batch(step, 10, cursors)]
    share = np.mean([d for d, _ in refs])
    assert abs(share - 0.75) < 0.03  # 2000 draws, weight 3 of 4
    assert cursors == [sum(d == 0 for d, _ in refs), sum(d == 1 for d, _ in refs)]
    first_epoch = [r for d, r in refs if d == 0][:5]
    assert sorted(first_epoch) == list(range(5))  # each epoch is a permutation
    again = BatchSchedule([5, 20], [1.0, 3.0], seed=0)
    restart = list(cursors)
    assert again.batch(200, 10, restart) == schedule.batch(200, 10, list(cursors))


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from openvla_ros.training.trainer import _lr_at

    cfg = TrainConfig(out_dir="x", datasets=[DatasetConfig("d", ["p"])], from_scratch=True, steps=110,
                      warmup_steps=10, lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1)
    assert _lr_at(cfg, 0) == pytest.approx(1e-4)  # warm-up
    assert _lr_at(cfg, 10) == pytest.approx(1e-3)  # peak right after it
    assert _lr_at(cfg, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way down
    assert _lr_at(cfg, 110) == pytest.approx(1e-4) and _lr_at(cfg, 500) == pytest.approx(1e-4)
    lrs = [_lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    constant = TrainConfig(out_dir="x", datasets=[DatasetConfig("d", ["p"])], from_scratch=True, lr=1e-3)
    assert _lr_at(constant, 5000) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(out_dir="x", datasets=[DatasetConfig("d", ["p"])], from_scratch=True, lr_schedule="linear").validated()
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(out_dir="x", datasets=[DatasetConfig("d", ["p"])], from_scratch=True, min_lr_ratio=2.0).validated()
