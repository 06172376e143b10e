"""Fine-tuning loop: LoRA (peft) or full fine-tuning, DDP through torchrun, validation, exact resume, export.

`run_training(TrainConfig)` caches the data, computes the statistics, loads the base checkpoint (or
writes a randomly initialised tiny one for `from_scratch`), trains with AdamW and gradient
accumulation, validates periodically (action-token accuracy, L1 of de-normalised actions), logs a
CSV, saves a resumable state, and finally writes a merged checkpoint in the official format into
`out_dir` (config.json, safetensors, tokenizer files copied from the base,
dataset_statistics.json of the training data) that `TorchEngine(out_dir)` loads unchanged.

Determinism: the samples of step s, their augmentation seeds and the dropout seed are functions of
(seed, step, slot / rank), and the loss is normalised by the number of labelled tokens of the whole
global batch. So a resumed run repeats the uninterrupted one exactly, and N processes with batch b
compute the same update as one process with batch N*b (`torchrun --nproc_per_node N`; gloo on CPU,
NCCL on CUDA).

Batches are built (image decoding, augmentation, tokenisation) by a torch DataLoader, in the
training process (`num_workers=0`) or in worker processes. Which samples fill a step and their
augmentation seeds are decided in the training process by the schedule, so the workers only do
the work: the batches, and so the weights, do not depend on the number of workers.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..vla import constants as C
from ..vla.checkpoint import CONFIG_FILE, STATISTICS_FILE, WEIGHTS_INDEX_FILE, Checkpoint
from ..vla.model import load_model
from .collate import IGNORE_INDEX, ActionCollator, TrainSample
from .data import CachedDataset, EpisodeReadOptions, cache_dataset, chunk_indices, split_episodes
from .diagnostics import learning_check, normalised_mean
from .objective import ActionObjective
from .stats import DEFAULT_NORMALIZATION, NORMALIZATION_TYPES, dataset_entry, stats_for, write_statistics

log = logging.getLogger(__name__)

MODEL_PARTS = ("vision_backbone", "projector", "language_model")
LORA_SCOPES = ("language_model", "all")
QUANTIZE_MODES = ("4bit", "8bit")
STATE_DIR = "train_state"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.csv"
LOCAL_RESULT_FILE = "local_ranks_result.json"  # rank 0's result, for the process that started local ranks
RUN_CONFIG_FILE = "run_config.json"
ADAPTER_DIR = "lora_adapter"
SNAPSHOTS_DIR = "snapshots"  # out_dir/snapshots/step_NNNNNN: checkpoints exported during training
INIT_DIR = "init_checkpoint"
LOG_COLUMNS = ("step", "samples", "loss", "lr", "grad_norm", "samples_per_s", "val_loss", "val_token_accuracy", "val_l1",
               "heldout_error", "mean_predictor_error", "shuffled_image_error", "swapped_instruction_error")
RUN_SUMMARY_FILE = "run_summary.json"
CONFIG_KEY_TRAINING = "openvla_ros_training"  # run summary stored in config.json (ignored by loaders)
MAX_SHARD_BYTES = 4 * 1024 ** 3
SKIPPED_BASE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # weights are rewritten, not copied
# A base that is itself a training run's output carries that run's records: this run writes its own.
RUN_RECORD_FILES = (LOG_FILE, RUN_CONFIG_FILE, LOCAL_RESULT_FILE, RUN_SUMMARY_FILE)
# Fields that may change between a run and its resumption (everything else must match).
LR_SCHEDULES = ("constant", "cosine")
REPORT_TO = ("tensorboard", "wandb")
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "snapshot_every", "log_every", "progress", "max_val_samples", "resume",
                     "save_adapter", "out_dir", "num_workers", "learning_check_samples", "report_to"}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is present, else 'cpu'; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class DatasetConfig:
    """One dataset of the mixture: its own statistics key and sampling weight."""

    name: str
    paths: list[str]
    weight: float = 1.0
    read: EpisodeReadOptions = field(default_factory=EpisodeReadOptions)


@dataclass
class TrainConfig:
    out_dir: str
    datasets: list[DatasetConfig]
    base_checkpoint: str | None = None
    from_scratch: bool = False  # random tiny model (full fine-tuning of everything)
    scratch_hidden: int = 64
    scratch_layers: int = 2
    scratch_heads: int = 4
    scratch_vision_backbone: str = "tiny-dinosiglip-224px"
    chunk_len: int | None = None  # None: the base checkpoint's
    normalization: str = DEFAULT_NORMALIZATION
    val_fraction: float = 0.1
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after the warm-up, down to min_lr_ratio * lr at `steps`)
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    lora_rank: int = 32  # 0: no LoRA
    lora_alpha: float | None = None  # None: min(rank, 16), as the reference
    lora_dropout: float = 0.0
    lora_scope: str = "language_model"  # "all": every linear layer of the model except the LM head
    train_parts: list[str] = field(default_factory=list)  # parts trained fully (MODEL_PARTS)
    quantize: str | None = None  # "4bit" / "8bit" base weights (QLoRA), CUDA only
    gradient_checkpointing: bool = False
    augment: bool = True  # the reference's random crop + colour jitter (and centre crop at inference)
    # Random translation by up to this many pixels (edge-padded), with or without `augment`; the
    # checkpoint needs no crop at inference for it.
    augment_shift_px: int = 0
    # Exponential moving average of the trained weights, exported instead of the last step's
    # (0 = off): ema <- decay * ema + (1 - decay) * weights after every step.
    ema_decay: float = 0.0
    # Gaussian targets over neighbouring action bins (std in bins; 0 = one-hot cross-entropy): see
    # training/objective.py. The checkpoint is the same format either way.
    action_bin_sigma: float = 0.0
    # Normalise with the base checkpoint's statistics for the datasets it has them for (by key)
    # instead of the new data's: a model trained on more data keeps the meaning of its action bins,
    # and values beyond the base's bounds clip to the end bins (as at inference).
    keep_base_statistics: bool = False
    num_workers: int = 0  # DataLoader worker processes building batches; 0: in the training process
    device: str = "auto"  # auto: CUDA when present, else the CPU
    # Experiment trackers besides the CSV log: "tensorboard" (when installed), "wandb".
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    eval_every: int = 100
    save_every: int = 100
    # Also export a complete checkpoint (loadable by every engine) every this many steps, under
    # out_dir/snapshots/step_NNNNNN, to evaluate or pick intermediate models; 0: none.
    snapshot_every: int = 0
    log_every: int = 1
    max_val_samples: int = 256
    # Held-out samples the learning check decodes greedily at each evaluation (model vs mean
    # predictor vs shuffled images vs swapped instructions; see training/diagnostics.py); 0: off.
    learning_check_samples: int = 64
    cache_dir: str | None = None  # None: out_dir/cache
    resume: bool = True
    save_adapter: bool = False
    progress: bool = True

    @property
    def augments(self) -> bool:
        """Whether training samples are augmented at all (each then gets its own seed)."""
        return bool(self.augment or self.augment_shift_px)

    def validated(self) -> "TrainConfig":
        if isinstance(self.action_bin_sigma, bool) or not (isinstance(self.action_bin_sigma, (int, float))
                                                            and math.isfinite(self.action_bin_sigma)
                                                            and 0.0 <= self.action_bin_sigma <= 64.0):
            raise ValueError(f"action_bin_sigma must be a number of bins in [0, 64], got {self.action_bin_sigma!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if isinstance(self.augment_shift_px, bool) or not isinstance(self.augment_shift_px, int) \
                or not 0 <= self.augment_shift_px <= 64:
            raise ValueError(f"augment_shift_px must be an integer in [0, 64], got {self.augment_shift_px!r}")
        if not self.datasets:
            raise ValueError("at least one dataset is needed")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        for d in self.datasets:
            if not (math.isfinite(d.weight) and d.weight > 0):
                raise ValueError(f"dataset {d.name!r}: weight must be > 0, got {d.weight}")
        if self.from_scratch == (self.base_checkpoint is not None):
            raise ValueError("give exactly one of base_checkpoint and from_scratch")
        if self.keep_base_statistics and self.from_scratch:
            raise ValueError("keep_base_statistics needs a base_checkpoint (a from-scratch model has no statistics)")
        if self.normalization not in NORMALIZATION_TYPES:
            raise ValueError(f"normalization must be one of {NORMALIZATION_TYPES}, got {self.normalization!r}")
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size), ("grad_accum", self.grad_accum)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(self.snapshot_every, bool) or not isinstance(self.snapshot_every, int) or self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be an integer >= 0 (0: no snapshots), got {self.snapshot_every!r}")
        if isinstance(self.num_workers, bool) or int(self.num_workers) != self.num_workers or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if isinstance(self.learning_check_samples, bool) or not isinstance(self.learning_check_samples, int) \
                or self.learning_check_samples < 0:
            raise ValueError(f"learning_check_samples must be an integer >= 0 (0: off), got {self.learning_check_samples!r}")
        if self.chunk_len is not None and self.chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {self.chunk_len}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"lora_scope must be one of {LORA_SCOPES}, got {self.lora_scope!r}")
        bad = [p for p in self.train_parts if p not in MODEL_PARTS]
        if bad:
            raise ValueError(f"unknown train_parts {bad}; choose from {MODEL_PARTS}")
        if self.from_scratch and (self.lora_rank or set(self.train_parts) != set(MODEL_PARTS)):
            raise ValueError("from_scratch trains every part fully: set lora_rank=0 and train_parts to all parts")
        if self.lora_rank == 0 and not self.train_parts:
            raise ValueError("nothing to train: lora_rank is 0 and no train_parts are given")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_MODES:
                raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {self.quantize!r}")
            if not resolve_device(self.device).startswith("cuda") or not torch.cuda.is_available():
                raise ValueError(f"quantize={self.quantize!r} (QLoRA with bitsandbytes) needs a CUDA device; "
                                 f"device is {self.device!r}, CUDA available: {torch.cuda.is_available()}")
            if self.lora_rank == 0 or "language_model" in self.train_parts:
                raise ValueError("quantized base weights are frozen: use LoRA and do not train the language model fully")
        bad = [r for r in self.report_to if r not in REPORT_TO]
        if bad:
            raise ValueError(f"report_to {bad}: choose from {list(REPORT_TO)}")
        if "wandb" in self.report_to:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("report_to wandb needs the wandb package (pip install wandb)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        return self

    def to_json(self) -> dict:
        out = asdict(self)
        for d in out["datasets"]:
            d["read"]["action_dim_names"] = None if d["read"]["action_dim_names"] is None else list(d["read"]["action_dim_names"])
        return out


@dataclass
class TrainResult:
    checkpoint_dir: Path
    steps: int
    final_loss: float | None
    metrics: dict
    log_path: Path


# --- distributed ---------------------------------------------------------------------------------


@dataclass
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> DistContext:
    """torchrun's environment -> process group (gloo on CPU, NCCL on CUDA); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistContext(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _free_local_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_rank_main(rank: int, world: int, port: int, config: "TrainConfig", threads: int | None) -> None:
    # torchrun's environment, set in the child only (the caller's process stays single-process).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = run_training(config)
        if rank == 0:
            (Path(config.out_dir) / LOCAL_RESULT_FILE).write_text(json.dumps(
                {"steps": result.steps, "final_loss": result.final_loss, "metrics": result.metrics}))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()



def run_training_local_processes(config: "TrainConfig", processes: int, *, threads_per_process: int | None = 1) -> TrainResult:
    """`run_training` as `processes` data-parallel processes on this machine (what torchrun starts).

    Each process trains on its `batch_size` per step, so the update is that of one process with
    `processes * batch_size` (see the module docstring). On a small CPU, two single-threaded
    processes train ~1.4x the samples per second of one process with the same global batch
    (a training step is many small kernels one thread cannot keep a second core busy with).
    `threads_per_process` sets the started processes' torch threads. An exception in a process is
    raised here with its traceback.
    """
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    if processes == 1:  # in this process, with its own thread settings
        return run_training(config)
    if config.device == "auto":
        config = replace(config, device="cpu")
    if config.device != "cpu":
        raise ValueError(f"local processes train on the CPU (gloo); for GPUs use torchrun, got device {config.device!r}")
    import torch.multiprocessing as tmp

    out_dir = Path(config.out_dir)
    (out_dir / LOCAL_RESULT_FILE).unlink(missing_ok=True)
    tmp.start_processes(_local_rank_main, args=(processes, _free_local_port(), config, threads_per_process),
                        nprocs=processes, join=True, start_method="spawn")
    done = json.loads((out_dir / LOCAL_RESULT_FILE).read_text())
    return TrainResult(checkpoint_dir=out_dir, steps=int(done["steps"]), final_loss=done["final_loss"],
                       metrics=done["metrics"], log_path=out_dir / LOG_FILE)


# --- data ----------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """Sample table of one split: (dataset index, episode, step) plus each step's chunk indices."""

    datasets: list[CachedDataset]
    episodes: list[list[int]]  # per dataset: episode indices in this split
    samples: list[np.ndarray]  # per dataset: (M, 2) [episode, step]
    chunks: dict = field(default_factory=dict)  # (dataset, episode) -> (indices (N, K), mask (N, K))

    def sample(self, dataset: int, row: int, aug_seed: int | None) -> TrainSample:
        ds = self.datasets[dataset]
        episode, step = (int(v) for v in self.samples[dataset][row])
        ep = ds.episodes[episode]
        index, mask = self.chunks[(dataset, episode)]
        return TrainSample(image=np.asarray(ep.images[step]), instruction=ep.instructions[step],
                           actions=ep.actions[index[step]], action_mask=mask[step], dataset=ds.name,
                           aug_seed=aug_seed)

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.samples]


def build_split(datasets: list[CachedDataset], episodes: list[list[int]], chunk_len: int) -> SplitData:
    samples, chunks = [], {}
    for d, (ds, chosen) in enumerate(zip(datasets, episodes)):
        rows = []
        for e in chosen:
            ep = ds.episodes[e]
            chunks[(d, e)] = chunk_indices(ep.stamps, ep.dt, chunk_len)
            rows.extend((e, t) for t in range(len(ep)))
        samples.append(np.asarray(rows, dtype=np.int64).reshape(-1, 2))
    return SplitData(datasets=datasets, episodes=episodes, samples=samples, chunks=chunks)


class BatchSchedule:
    """Which samples fill each slot of each global batch: the dataset by weight, then the next sample
    of that dataset's endless stream of seeded permutations (an epoch per permutation)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.sizes = [int(s) for s in sizes]
        w = np.asarray(weights, dtype=np.float64) * (np.asarray(self.sizes) > 0)
        if w.sum() <= 0:
            raise ValueError("no training samples in any dataset")
        self.probabilities = w / w.sum()
        self.seed = int(seed)
        self._perm_cache: dict = {}

    def _row(self, dataset: int, position: int) -> int:
        epoch, offset = divmod(position, self.sizes[dataset])
        key = (dataset, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != dataset}
            self._perm_cache[key] = np.random.default_rng([self.seed, 1, dataset, epoch]).permutation(self.sizes[dataset])
        return int(self._perm_cache[key][offset])

    def batch(self, step: int, size: int, cursors: list[int]) -> list[tuple[int, int]]:
        """(dataset, row) for each slot of step `step`; advances `cursors` (per-dataset positions)."""
        rng = np.random.default_rng([self.seed, 2, step])
        if len(self.sizes) == 1:
            choice = np.zeros(size, dtype=np.int64)
        else:
            choice = rng.choice(len(self.sizes), size=size, p=self.probabilities)
        out = []
        for d in choice:
            d = int(d)
            out.append((d, self._row(d, cursors[d])))
            cursors[d] += 1
        return out


@dataclass
class MicroBatchKey:
    """One micro-batch as the training process plans it; a DataLoader worker turns it into tensors."""

    step: int
    micro: int
    refs: list[tuple[int, int, int | None]]  # this rank's slots: (dataset, row, augmentation seed)
    total_labels: int  # labelled tokens of the whole global batch of `step` (the loss normaliser)
    cursors: list[int]  # the schedule's per-dataset positions after `step` (resumable state)


class StepPlan:
    """The DataLoader's sampler: the micro-batches of steps start..steps-1 of this rank, in order.

    Runs in the training process, so the choice of samples and their seeds never depends on the
    workers; it runs ahead of training by the loader's prefetch, which is why each key carries the
    cursors of its own step instead of the plan's current ones.
    """

    def __init__(self, config: "TrainConfig", schedule: BatchSchedule, split: SplitData, *, start_step: int,
                 cursors: Sequence[int], rank: int, world: int, action_dim: int):
        self.config, self.schedule, self.split = config, schedule, split
        self.start_step, self.cursors = int(start_step), [int(c) for c in cursors]
        self.rank, self.world, self.action_dim = int(rank), int(world), int(action_dim)

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start_step) * self.config.grad_accum

    def __iter__(self) -> Iterator[MicroBatchKey]:
        config, split = self.config, self.split
        micro = config.batch_size
        per_rank = micro * config.grad_accum
        cursors = list(self.cursors)
        for step in range(self.start_step, config.steps):
            refs = self.schedule.batch(step, per_rank * self.world, cursors)
            # Labelled tokens of the whole global batch: valid chunk steps x D, plus EOS, per sample.
            total_labels = sum(int(split.chunks[(d, int(split.samples[d][r][0]))][1][int(split.samples[d][r][1])].sum())
                               * self.action_dim + 1 for d, r in refs)
            slot0 = self.rank * per_rank
            mine = refs[slot0:slot0 + per_rank]
            after = list(cursors)
            for m in range(config.grad_accum):
                part = mine[m * micro:(m + 1) * micro]
                seeded = [(d, r, derived_seed(config.seed, step, slot0 + m * micro + j) if config.augments else None)
                          for j, (d, r) in enumerate(part)]
                yield MicroBatchKey(step=step, micro=m, refs=seeded, total_labels=total_labels, cursors=after)


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset indexed by MicroBatchKey: (key, collated batch)."""

    def __init__(self, split: SplitData, collator: ActionCollator):
        self.split, self.collator = split, collator

    def __getitem__(self, key: MicroBatchKey):
        return key, self.collator([self.split.sample(d, r, seed) for d, r, seed in key.refs])


def _as_is(item):
    return item


def _seed_worker(worker_id: int) -> None:
    """Seed the global generators of a worker from its torch seed (the loader's generator + worker id).

    Augmentation draws from each sample's own seed; this keeps any library code that reaches for a
    global generator just as reproducible instead of inheriting the parent's state at fork time.
    """
    seed = torch.initial_seed()
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def make_loader(plan: StepPlan, split: SplitData, collator: ActionCollator, *, num_workers: int, seed: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over a StepPlan; each item is one (MicroBatchKey, batch)."""
    workers = num_workers > 0
    generator = torch.Generator().manual_seed(derived_seed(seed, 3, plan.start_step))
    return torch.utils.data.DataLoader(
        MicroBatches(split, collator), batch_size=None, sampler=plan, collate_fn=_as_is, num_workers=num_workers,
        persistent_workers=workers, worker_init_fn=_seed_worker if workers else None, generator=generator,
        pin_memory=pin_memory and workers)


# --- model ---------------------------------------------------------------------------------------


def _linear_module_names(model, scope: str) -> list[str]:
    from torch import nn

    prefix = "language_model." if scope == "language_model" else ""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefix) and not name.endswith("lm_head"):
            names.append(name)
    if not names:
        raise ValueError(f"no linear layers found for lora_scope {scope!r}")
    return names


def lora_config(config: TrainConfig, model):
    from peft import LoraConfig

    alpha = config.lora_alpha if config.lora_alpha is not None else min(config.lora_rank, 16)
    return LoraConfig(r=config.lora_rank, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                      target_modules=_linear_module_names(model, config.lora_scope), init_lora_weights="gaussian")


def _quantize_language_model(model, bits: str, device: str) -> None:
    """Replace the language model's linear layers (not the LM head) by bitsandbytes 4/8-bit layers."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError(f"quantize={bits!r} needs the bitsandbytes package: {exc}") from None
    from torch import nn

    lm = model.language_model
    for parent_name, parent in list(lm.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child_name == "lm_head":
                continue
            weight = child.weight.data.to("cpu", torch.float16)
            if bits == "4bit":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, child_name, layer.to(device))  # quantised on the move to the GPU


def prepare_model(config: TrainConfig, checkpoint: Checkpoint, device: str):
    """(module holding the OpenVLA parts, peft wrapper or None) with exactly the trainable parameters set."""
    base_dtype = torch.bfloat16 if (device.startswith("cuda") and config.lora_rank and not config.train_parts) else torch.float32
    model = load_model(checkpoint, dtype=base_dtype, device=device)
    if config.quantize:
        _quantize_language_model(model, config.quantize, device)
    model.requires_grad_(False)
    peft_model = None
    inner = model
    if config.lora_rank:
        from peft import get_peft_model

        torch.manual_seed(config.seed)  # LoRA's random init is part of the run's identity
        peft_model = get_peft_model(model, lora_config(config, model))
        inner = peft_model.get_base_model()
    for part in config.train_parts:
        getattr(inner, part).requires_grad_(True)
    if config.gradient_checkpointing:
        lm = inner.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.train()
    return inner, peft_model


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


# --- export --------------------------------------------------------------------------------------


def _store_dtype(config_raw: dict) -> torch.dtype:
    name = config_raw.get("torch_dtype") or config_raw.get("text_config", {}).get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def snapshot_dir(out_dir: str | Path, step: int) -> Path:
    """Where a run writing to `out_dir` exports its snapshot of `step` (TrainConfig.snapshot_every)."""
    return Path(out_dir) / SNAPSHOTS_DIR / f"step_{int(step):06d}"


def list_snapshots(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete snapshots a run exported under `out_dir`, by step."""
    root = Path(out_dir) / SNAPSHOTS_DIR
    found = []
    for path in root.glob("step_*"):  # nothing when the run wrote no snapshots
        digits = path.name[len("step_"):]
        if path.is_dir() and digits.isdigit() and (path / CONFIG_FILE).is_file():
            found.append((int(digits), path))
    return sorted(found)


def export_checkpoint(out_dir: Path, base: Checkpoint, config: TrainConfig, state: dict[str, torch.Tensor],
                      statistics: dict, chunk_len: int, dt: float, dim_names: list[str], summary: dict,
                      save_adapter: bool = False) -> Path:
    """Merge the trained parameters into a fresh, unquantised copy of the base and write the checkpoint."""
    from ..vla.tiny import write_weights

    model = load_model(base, dtype=torch.float32, device="cpu")
    if config.lora_rank:
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(config, model))
        target = peft_model.get_base_model()  # parameter names as in training (LoRA layers injected)
    else:
        peft_model, target = None, model
    params = dict(target.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"trained parameters not found in the export model: {unknown[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    if peft_model is not None:
        if save_adapter:
            peft_model.save_pretrained(str(out_dir / ADAPTER_DIR))
        model = peft_model.merge_and_unload()
    dtype = _store_dtype(base.config.raw)
    stored = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
              for k, v in model.stored_state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in stored.values())
    for name in os.listdir(base.path):  # tokenizer, preprocessor config, anything else the base carries
        source = base.path / name
        if source.is_file() and name not in (CONFIG_FILE, STATISTICS_FILE, WEIGHTS_INDEX_FILE, *RUN_RECORD_FILES) \
                and not name.endswith(SKIPPED_BASE_SUFFIXES):
            shutil.copy2(source, out_dir / name)
    write_weights(out_dir, stored, max(1, math.ceil(total / MAX_SHARD_BYTES)))
    raw = json.loads(json.dumps(base.config.raw))
    raw.update({C.CONFIG_KEY_CHUNK: int(chunk_len), C.CONFIG_KEY_DT: float(dt), C.CONFIG_KEY_DIM_NAMES: list(dim_names),
                "norm_stats": statistics, CONFIG_KEY_TRAINING: summary})
    (out_dir / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    write_statistics(out_dir / STATISTICS_FILE, statistics)
    return out_dir


# --- validation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(objective: ActionObjective, collator: ActionCollator, samples: Sequence[TrainSample], *,
             batch_size: int = 8, device: str = "cpu", autocast: bool = False) -> dict:
    """Teacher-forced loss, action-token accuracy and L1 of de-normalised actions (dataset units)."""
    if not samples:
        return {}
    was_training = objective.training
    objective.eval()
    loss_sum, n_labels, correct, n_action, l1_sum, l1_count = 0.0, 0, 0, 0, 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = [TrainSample(**{**s.__dict__, "aug_seed": None}) for s in samples[start:start + batch_size]]
        batch = collator(chunk)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, predicted, target, selected = objective(*(batch[k].to(device) for k in
                                                            ("pixel_values", "input_ids", "attention_mask", "labels")))
        loss_sum += float(loss)
        n_labels += int(target.numel())
        predicted, target = predicted.cpu().numpy(), target.cpu().numpy()
        is_action = target != collator.eos_token_id
        correct += int((predicted[is_action] == target[is_action]).sum())
        n_action += int(is_action.sum())
        # Per sample: the predicted action tokens in label order -> de-normalised actions.
        rows = selected.cpu().numpy().sum(axis=1)
        offset = 0
        for sample, count in zip(chunk, rows):
            pred_ids, true_ids = predicted[offset:offset + count], target[offset:offset + count]
            offset += count
            mask = np.asarray(sample.action_mask, dtype=bool)
            dim = sample.actions.shape[1]
            pred = pred_ids[true_ids != collator.eos_token_id].reshape(-1, dim)
            stats = collator.stats[sample.dataset]
            values = stats.unnormalise(collator.action_tokenizer.decode(pred))
            l1_sum += float(np.abs(values - np.asarray(sample.actions)[mask]).sum())
            l1_count += int(mask.sum()) * dim
    if was_training:
        objective.train()
    return {"val_loss": loss_sum / max(n_labels, 1), "val_token_accuracy": correct / max(n_action, 1),
            "val_l1": l1_sum / max(l1_count, 1)}


def base_statistics(base: Checkpoint, statistics: dict) -> dict:
    """`statistics` with each dataset's entry replaced by the base checkpoint's of the same key.

    Raises ValueError when the base has none of the keys, or an entry of another action size.
    """
    shared = sorted(set(statistics) & set(base.norm_stats))
    if not shared:
        raise ValueError(f"keep_base_statistics: the base checkpoint {str(base.path)!r} has statistics for "
                         f"{sorted(base.norm_stats)}, none of the datasets {sorted(statistics)}")
    out = dict(statistics)
    for key in shared:
        size, base_size = len(statistics[key]["action"]["q01"]), len(base.norm_stats[key]["action"]["q01"])
        if size != base_size:
            raise ValueError(f"keep_base_statistics: dataset {key!r} has {size}-D actions, the base's "
                             f"statistics {base_size}-D")
        out[key] = base.norm_stats[key]
    return out


def split_samples(split: SplitData, limit: int | None = None) -> list[TrainSample]:
    """Every sample of a split (evenly thinned to `limit`), without augmentation."""
    refs = [(d, r) for d, size in enumerate(split.sizes) for r in range(size)]
    if limit is not None and len(refs) > limit:
        refs = [refs[int(i)] for i in np.linspace(0, len(refs) - 1, limit).round()]
    return [split.sample(d, r, None) for d, r in refs]


# --- the run -------------------------------------------------------------------------------------


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on `parts` (so on nothing about the process that asks)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant (the reference's fine-tuning) or cosine down to min_lr_ratio * lr."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(config.steps - config.warmup_steps, 1)
        progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
        floor = config.min_lr_ratio
        return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return config.lr


def can_resume(config: TrainConfig) -> bool | None:
    """Whether `config.out_dir` holds the saved state of a run with this configuration (None: no state)."""
    state_path = Path(config.out_dir) / STATE_DIR / STATE_FILE
    if not state_path.exists():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return state.get("resume_key") == _resume_key(config)


# Options added after runs were already being resumed: absent from the key while off, so such a run
# still resumes.
_KEYED_ONLY_WHEN_ON = ("ema_decay", "action_bin_sigma", "keep_base_statistics")


def _resume_key(config: TrainConfig) -> dict:
    key = {k: v for k, v in config.to_json().items()
           if k not in RESUMABLE_CHANGES and not (k in _KEYED_ONLY_WHEN_ON and not v)}
    if config.lr_schedule == "cosine":
        key["steps"] = config.steps  # the cosine curve ends at `steps`: another count is another run
    return key


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


def _write_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


class _Trackers:
    """Scalars to TensorBoard (when installed) and Weights & Biases (when asked); the CSV log is always written."""

    def __init__(self, out_dir: Path, config: "TrainConfig"):
        self.board = self.wandb = None
        if "tensorboard" in config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: without the package the CSV log stays the record
                log.info("tensorboard is not installed: logging to %s only", LOG_FILE)
            else:
                self.board = SummaryWriter(str(out_dir / "tensorboard"))
        if "wandb" in config.report_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("report_to wandb needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "openvla_ros"), dir=str(out_dir),
                                    config=config.to_json(), name=out_dir.name, resume="allow")

    def scalars(self, values: dict, step: int) -> None:
        if self.board is not None:
            for k, v in values.items():
                self.board.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(values), step=step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()


def prepare_data(config: TrainConfig, ctx: DistContext, cache_dir: Path) -> list[CachedDataset]:
    datasets = []
    if ctx.is_main:
        datasets = [cache_dataset(d.name, d.paths, d.read, cache_dir, progress=config.progress) for d in config.datasets]
    ctx.barrier()
    if not ctx.is_main:  # the shards exist now; this only reads them
        datasets = [cache_dataset(d.name, d.paths, d.read, cache_dir) for d in config.datasets]
    layouts = {tuple(d.dim_names) for d in datasets}
    if len(layouts) != 1:
        raise ValueError(f"datasets have different action layouts {sorted(layouts)}; one model needs one layout")
    return datasets


def run_training(config: TrainConfig, *, clock: Callable[[], float] = time.perf_counter,
                 on_step: Callable[[int, float, float], None] | None = None) -> TrainResult:
    """Train as configured; returns where the merged checkpoint is and the final metrics.

    `on_step(step, seconds, loss)` is called after each optimizer step with the step's time on
    `clock` (batch loading, forward, backward, optimizer; not validation or saving).
    """
    config = replace(config, device=resolve_device(config.device)).validated()
    device = config.device
    ctx = init_distributed(device)
    if ctx.world > 1 and device.startswith("cuda"):
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(device)
    out_dir = Path(config.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    state_path = out_dir / STATE_DIR / STATE_FILE
    log_path = out_dir / LOG_FILE
    resume_state = None
    if config.resume and state_path.exists():
        resume_state = torch.load(state_path, map_location="cpu", weights_only=False)
        if resume_state["resume_key"] != _resume_key(config):
            old, new = resume_state["resume_key"], _resume_key(config)
            changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
            raise ValueError(f"{state_path} belongs to a run with a different configuration ({changed}, "
                             f"saved vs now); use a new out_dir or resume=False")

    # Data and statistics (of the training episodes).
    datasets = prepare_data(config, ctx, Path(config.cache_dir) if config.cache_dir else out_dir / "cache")
    train_eps, val_eps = [], []
    for i, ds in enumerate(datasets):
        tr, va = split_episodes(len(ds.episodes), config.val_fraction, config.seed + i)
        train_eps.append(tr)
        val_eps.append(va)
    statistics = {}
    for ds, tr in zip(datasets, train_eps):
        actions = np.concatenate([ds.episodes[e].actions for e in tr], axis=0)
        statistics[ds.name] = dataset_entry(actions, num_trajectories=len(tr), dim_names=ds.dim_names,
                                            normalization=config.normalization)
    dim_names, dt = list(datasets[0].dim_names), float(datasets[0].dt)

    # Base checkpoint (a random tiny one for from_scratch, written once).
    if config.from_scratch:
        base_dir = out_dir / INIT_DIR
        if ctx.is_main and not (base_dir / CONFIG_FILE).exists():
            from ..vla.tiny import tiny_config, write_tiny_checkpoint

            cfg = tiny_config(chunk=config.chunk_len or 1, hidden=config.scratch_hidden, layers=config.scratch_layers,
                              heads=config.scratch_heads, vision_backbone_id=config.scratch_vision_backbone, dt=dt,
                              norm_stats=statistics)
            cfg[C.CONFIG_KEY_DIM_NAMES] = dim_names
            write_tiny_checkpoint(base_dir, seed=config.seed, config=cfg, shards=1)
        ctx.barrier()
    else:
        base_dir = Path(config.base_checkpoint)
    base = Checkpoint.open(base_dir)
    if config.keep_base_statistics:  # (validated: never with from_scratch, whose init used the data's)
        statistics = base_statistics(base, statistics)
    chunk_len = config.chunk_len or base.config.chunk_len

    collator = ActionCollator(base, stats_for(statistics), chunk_len, crop_jitter=config.augment,
                              shift_px=config.augment_shift_px)
    train = build_split(datasets, train_eps, chunk_len)
    val = build_split(datasets, val_eps, chunk_len)
    schedule = BatchSchedule(train.sizes, [d.weight for d in config.datasets], config.seed)
    val_samples = split_samples(val, config.max_val_samples) if any(val.sizes) else []
    check_samples = split_samples(val, config.learning_check_samples) \
        if (any(val.sizes) and config.learning_check_samples) else []
    action_stats = stats_for(statistics)
    train_mean = {ds.name: normalised_mean(np.concatenate([ds.episodes[e].actions for e in tr], axis=0), action_stats[ds.name])
                  for ds, tr in zip(datasets, train_eps)}
    check = None

    inner, peft_model = prepare_model(config, base, device)
    tokens = collator.action_tokenizer
    objective = ActionObjective(inner, action_ids=(tokens.first_action_token, tokens.n_bins),
                                bin_sigma=config.action_bin_sigma)
    trainable = [p for p in inner.parameters() if p.requires_grad]
    forward = objective
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Unused parameters exist when the vision backbone trains (its last block is never run).
        forward = DistributedDataParallel(objective, device_ids=[ctx.local_rank] if device.startswith("cuda") else None,
                                          find_unused_parameters="vision_backbone" in config.train_parts)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    step, cursors = 0, [0] * len(datasets)
    ema = trainable_state(inner) if config.ema_decay else None
    if resume_state is not None:
        params = dict(inner.named_parameters())
        for name, value in resume_state["trainable"].items():
            params[name].data.copy_(value)
        optimizer.load_state_dict(resume_state["optimizer"])
        step, cursors = int(resume_state["step"]), list(resume_state["cursors"])
        if config.ema_decay:
            ema = {name: value.clone() for name, value in resume_state["ema"].items()}
        log.info("resumed %s at step %d", out_dir, step)
    # (running average, parameter) pairs, built once: the update runs after every step.
    ema_pairs = [] if ema is None else [(ema[n], p) for n, p in inner.named_parameters() if p.requires_grad]
    if ctx.is_main:
        _write_log(log_path, _read_log(log_path, step))
        (out_dir / RUN_CONFIG_FILE).write_text(json.dumps({"config": config.to_json(), "world_size": ctx.world,
                                                           "chunk_len": chunk_len, "dim_names": dim_names, "dt": dt,
                                                           "base_checkpoint": str(base_dir),
                                                           "train_episodes": train_eps, "val_episodes": val_eps},
                                                          indent=2) + "\n")

    micro, per_rank = config.batch_size, config.batch_size * config.grad_accum
    global_batch = per_rank * ctx.world
    autocast = device.startswith("cuda")
    trackers = _Trackers(out_dir, config) if ctx.is_main else None
    bar = None
    if ctx.is_main and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", unit="step")
    last_loss, metrics = None, {}
    action_dim = len(dim_names)

    def training_summary() -> dict:
        return {"steps": step, "global_batch": global_batch, "world_size": ctx.world, "lora_rank": config.lora_rank,
                "train_parts": list(config.train_parts), "normalization": config.normalization,
                "image_augmentation": config.augment, "shift_augmentation_px": config.augment_shift_px,
                "center_crop_at_inference": config.augment,
                "datasets": {d.name: d.weight for d in config.datasets}, "final_loss": last_loss, "ema_decay": config.ema_decay, **metrics}

    def export_to(directory: Path, save_adapter: bool = False) -> None:
        """The weights as trained so far (the running average with ema_decay) as a checkpoint in `directory`."""
        export_checkpoint(directory, base, config, trainable_state(inner) if ema is None else ema, statistics, chunk_len, dt,
                          dim_names, training_summary(), save_adapter=save_adapter)

    def save_snapshot():
        if not ctx.is_main:
            return
        final = snapshot_dir(out_dir, step)
        # Written aside and renamed: a run stopped mid-export leaves no half checkpoint under the final name.
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        export_to(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)

    def save_state():
        if not ctx.is_main:
            return
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"step": step, "cursors": list(cursors), "trainable": trainable_state(inner), "ema": ema,
                    "optimizer": optimizer.state_dict(), "resume_key": _resume_key(config),
                    "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()}, tmp)
        os.replace(tmp, state_path)

    plan = StepPlan(config, schedule, train, start_step=step, cursors=cursors, rank=ctx.rank, world=ctx.world,
                    action_dim=action_dim)
    loader = make_loader(plan, train, collator, num_workers=config.num_workers, seed=config.seed,
                         pin_memory=device.startswith("cuda"))
    batches = iter(loader)
    while step < config.steps:
        t0 = clock()
        lr = _lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout (LoRA) draws from torch's generator: seeded per step and rank, so resume is exact.
        torch.manual_seed(derived_seed(config.seed, step, ctx.rank))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m in range(config.grad_accum):
            key, batch = next(batches)
            if (key.step, key.micro) != (step, m):  # the loader must hand batches over in plan order
                raise RuntimeError(f"data loader gave step {key.step} micro {key.micro}, expected {step} {m}")
            total_labels = key.total_labels
            sync_now = m == config.grad_accum - 1
            context = forward.no_sync() if (ctx.world > 1 and not sync_now) else _null()
            with context:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss, *_ = forward(*(batch[k].to(device, non_blocking=True)
                                         for k in ("pixel_values", "input_ids", "attention_mask", "labels")))
                # DDP averages gradients over ranks, hence the world factor: the sum over all ranks
                # and micro-steps is the mean over the global batch's labelled tokens.
                (loss * (ctx.world / total_labels)).backward()
            loss_sum += loss.detach().double().cpu()
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema_pairs:
            with torch.no_grad():
                for average, p in ema_pairs:
                    average.lerp_(p.detach(), 1.0 - config.ema_decay)
        if ctx.world > 1:
            torch.distributed.all_reduce(loss_sum)
        step += 1
        cursors = list(key.cursors)
        last_loss = float(loss_sum) / total_labels
        elapsed = clock() - t0
        if on_step is not None:
            on_step(step, elapsed, last_loss)
        row = {"step": step, "samples": step * global_batch, "loss": f"{last_loss:.6f}", "lr": f"{lr:.6g}",
               "grad_norm": f"{grad_norm:.6g}", "samples_per_s": f"{global_batch / max(elapsed, 1e-9):.3f}"}
        if val_samples and (step % config.eval_every == 0 or step == config.steps):
            if ctx.is_main:
                metrics = evaluate(objective, collator, val_samples, batch_size=micro, device=device, autocast=autocast)
                if check_samples:
                    check = learning_check(inner, collator, check_samples, train_mean, batch_size=micro, device=device,
                                           autocast=autocast, seed=config.seed)
                    if check is not None:
                        metrics.update(check.metrics())
                row.update({k: f"{v:.6f}" for k, v in metrics.items()})
            ctx.barrier()
        if ctx.is_main:
            if step % config.log_every == 0 or step == config.steps or "val_loss" in row:
                _append_log(log_path, row)
            if trackers is not None:
                trackers.scalars({"train/loss": last_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                  **({f"val/{k}": v for k, v in metrics.items()} if "val_loss" in row else {})}, step)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", **({"acc": f"{metrics['val_token_accuracy']:.3f}"} if metrics else {}))
                bar.update(1)
        if step % config.save_every == 0 or step == config.steps:
            save_state()
        if config.snapshot_every and step % config.snapshot_every == 0:
            save_snapshot()
    del batches, loader  # stops the worker processes now rather than at garbage collection
    if bar is not None:
        bar.close()
    if trackers is not None:
        trackers.close()

    if ctx.is_main:
        export_to(out_dir, save_adapter=config.save_adapter)
        summary = {"steps": step, "final_loss": last_loss, "metrics": metrics,
                   "learning_check": None if check is None else check.as_dict(),
                   "warnings": [] if check is None else list(check.warnings)}
        if check is None and config.learning_check_samples:
            summary["warnings"].append("no learning check: no held-out episodes (raise val_fraction or add episodes)")
        for warning in summary["warnings"]:
            log.warning("%s: %s", out_dir, warning)
        (out_dir / RUN_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    ctx.barrier()
    return TrainResult(checkpoint_dir=out_dir, steps=step, final_loss=last_loss, metrics=metrics, log_path=log_path)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
