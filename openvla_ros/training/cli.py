"""Command line of the trainer: `openvla-ros train ...` (and `python -m openvla_ros.training.cli ...`,
which is what `torchrun --nproc_per_node N -m openvla_ros.training.cli ...` runs for multi-GPU).

`add_train_arguments(parser)` fills a (sub)parser; `config_from_args(args)` builds the TrainConfig;
`train_main(argv)` does both and runs. Topic flags mean the same as in `eval bag`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .data import EpisodeReadOptions
from .stats import DEFAULT_NORMALIZATION, NORMALIZATION_TYPES
from .trainer import LORA_SCOPES, LR_SCHEDULES, MODEL_PARTS, QUANTIZE_MODES, DatasetConfig, TrainConfig, run_training

DEFAULTS = TrainConfig(out_dir="", datasets=[])


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--checkpoint", "--base", dest="base", help="base checkpoint directory (official format)")
    base.add_argument("--from-scratch", action="store_true",
                      help="train a randomly initialised tiny model (all parts, no LoRA)")
    parser.add_argument("--data", action="append", nargs="+", required=True, metavar="PATH",
                        help="episodes of one dataset: bags (dir/.db3/.mcap, ROS 1 .bag), HDF5 files, LeRobot "
                             "datasets (v3.0/v2.1 roots), RLDS datasets (features.json + tfrecords), or folders of "
                             "them; repeat --data for a mixture")
    parser.add_argument("--dataset-name", action="append", default=None, metavar="NAME",
                        help="statistics key of each --data group (default: 'dataset', or 'dataset_<i>')")
    parser.add_argument("--weight", action="append", type=float, default=None, metavar="W",
                        help="sampling weight of each --data group (default 1)")
    parser.add_argument("--out", required=True, help="output directory (the merged checkpoint goes here)")
    topics = parser.add_argument_group("reading episodes")
    topics.add_argument("--image-topic")
    instr = topics.add_mutually_exclusive_group()
    instr.add_argument("--instruction", help="fixed instruction for every frame")
    instr.add_argument("--instruction-topic")
    topics.add_argument("--action-topic", help="bags: command (TwistStamped, Float64MultiArray, JointTrajectory) "
                                               "or pose (PoseStamped) topic; its type is read from the bag")
    topics.add_argument("--gripper-topic")
    topics.add_argument("--dt", type=float, default=None, help="seconds each action covers (default 0.2)")
    topics.add_argument("--sync", default="nearest", choices=("nearest", "previous", "interpolate"))
    topics.add_argument("--tolerance", type=float, default=0.05)
    topics.add_argument("--stride", type=int, default=1)
    topics.add_argument("--typestore", default=None)
    topics.add_argument("--camera", help="HDF5: camera under observations/images; LeRobot: camera feature "
                                         "(e.g. observation.images.top); RLDS: image key under observation/")
    topics.add_argument("--action-key", default=None, help="LeRobot: the action feature (default 'action')")
    topics.add_argument("--rlds-config", default=None, metavar="YAML",
                        help="RLDS: key mapping (image, action [list to concatenate], language, action_dim_names, dt, "
                             "split), or one such mapping per dataset name")
    topics.add_argument("--action-dims", default=None, help="comma-separated action dim names")
    topics.add_argument("--jpeg-channels", default="rgb", choices=("rgb", "bgr"),
                        help="HDF5 JPEG buffers: rgb = standard JPEGs; bgr = written by cv2.imencode from RGB arrays "
                             "(ACT's recorder), so stored swapped")
    topics.add_argument("--action-fields", default=None,
                        help="bags with a custom action message type: comma-separated fields to use "
                             "(default: every number in the message, header excluded)")
    train = parser.add_argument_group("training")
    train.add_argument("--chunk", type=int, default=None, help="K actions per call (default: the base's)")
    train.add_argument("--normalization", default=DEFAULT_NORMALIZATION, choices=NORMALIZATION_TYPES)
    train.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction)
    train.add_argument("--seed", type=int, default=DEFAULTS.seed)
    train.add_argument("--steps", type=int, default=DEFAULTS.steps)
    train.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="per process and micro-step")
    train.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum)
    train.add_argument("--lr", type=float, default=DEFAULTS.lr)
    train.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    train.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps)
    train.add_argument("--lr-schedule", default=DEFAULTS.lr_schedule, choices=LR_SCHEDULES,
                       help="after the warm-up: constant (the reference) or cosine to --min-lr-ratio x lr")
    train.add_argument("--min-lr-ratio", type=float, default=DEFAULTS.min_lr_ratio)
    train.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm)
    train.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank)
    train.add_argument("--lora-alpha", type=float, default=None)
    train.add_argument("--lora-dropout", type=float, default=DEFAULTS.lora_dropout)
    train.add_argument("--lora-scope", default=DEFAULTS.lora_scope, choices=LORA_SCOPES)
    train.add_argument("--train", nargs="+", default=[], choices=MODEL_PARTS, metavar="PART",
                       help=f"parts trained fully, of {list(MODEL_PARTS)}")
    train.add_argument("--full", action="store_true", help="full fine-tuning of every part, no LoRA")
    train.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help="QLoRA base weights (CUDA only)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--no-augment", action="store_true", help="no random crop / colour jitter")
    train.add_argument("--keep-base-stats", action="store_true",
                       help="normalise with the base checkpoint's action statistics (same dataset name) instead of "
                            "the new data's: a model trained on more data (e.g. a DAgger round) keeps its bins' meaning")
    train.add_argument("--bin-sigma", type=float, default=DEFAULTS.action_bin_sigma, metavar="BINS",
                       help="train each action token towards a Gaussian over neighbouring bins with this std "
                            "(in bins; default 0 = one-hot cross-entropy, the reference's; the demo uses 3); the "
                            "checkpoint format is unchanged; the logged loss then includes the targets' own entropy")
    train.add_argument("--ema-decay", type=float, default=DEFAULTS.ema_decay, metavar="D",
                       help="export an exponential moving average of the weights (e.g. 0.999; 0: the last step's)")
    train.add_argument("--shift-px", type=int, default=DEFAULTS.augment_shift_px, metavar="PX",
                       help="random image translation by up to PX pixels (0: none)")
    train.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers, metavar="N",
                       help="DataLoader worker processes building batches (0: in the training process)")
    train.add_argument("--device", default="auto", help="auto (CUDA when present, else cpu), cpu, cuda, cuda:N")
    train.add_argument("--report-to", nargs="+", default=DEFAULTS.report_to, choices=("tensorboard", "wandb", "none"),
                       help="trackers besides train_log.csv: tensorboard (when installed; default), wandb")
    train.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    train.add_argument("--save-every", type=int, default=DEFAULTS.save_every)
    train.add_argument("--snapshot-every", type=int, default=DEFAULTS.snapshot_every, metavar="N",
                       help="also export a complete checkpoint every N steps under OUT/snapshots/step_NNNNNN (0: none)")
    train.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    train.add_argument("--max-val-samples", type=int, default=DEFAULTS.max_val_samples)
    train.add_argument("--learning-check-samples", type=int, default=DEFAULTS.learning_check_samples, metavar="N",
                       help="held-out samples decoded at each evaluation to compare the model with the mean-action "
                            "predictor, shuffled images and swapped instructions (run_summary.json; 0: off)")
    train.add_argument("--cache-dir", default=None)
    train.add_argument("--no-resume", action="store_true", help="start over even if OUT has a saved state")
    train.add_argument("--save-adapter", action="store_true", help="also write the LoRA adapter alone")
    train.add_argument("--no-progress", action="store_true")
    scratch = parser.add_argument_group("--from-scratch model size")
    scratch.add_argument("--scratch-hidden", type=int, default=DEFAULTS.scratch_hidden)
    scratch.add_argument("--scratch-layers", type=int, default=DEFAULTS.scratch_layers)
    scratch.add_argument("--scratch-heads", type=int, default=DEFAULTS.scratch_heads)
    scratch.add_argument("--scratch-vision", default=DEFAULTS.scratch_vision_backbone)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    groups = args.data
    names = args.dataset_name or (["dataset"] if len(groups) == 1 else [f"dataset_{i}" for i in range(len(groups))])
    weights = args.weight or [1.0] * len(groups)
    if len(names) != len(groups) or len(weights) != len(groups):
        raise ValueError(f"{len(groups)} --data groups need as many --dataset-name ({len(names)}) and "
                         f"--weight ({len(weights)}) values (or none)")
    read = EpisodeReadOptions(
        image_topic=args.image_topic, instruction=args.instruction, instruction_topic=args.instruction_topic,
        action_topic=args.action_topic, gripper_topic=args.gripper_topic, dt=args.dt, sync=args.sync,
        tolerance=args.tolerance, stride=args.stride, typestore=args.typestore, camera=args.camera,
        action_dim_names=args.action_dims.split(",") if args.action_dims else None,
        action_fields=args.action_fields.split(",") if args.action_fields else None,
        jpeg_channels=args.jpeg_channels, action_key=args.action_key, rlds_config=args.rlds_config)
    full = args.full or args.from_scratch
    return TrainConfig(
        out_dir=args.out,
        datasets=[DatasetConfig(name=n, paths=list(p), weight=w, read=read) for n, p, w in zip(names, groups, weights)],
        base_checkpoint=args.base, from_scratch=args.from_scratch, scratch_hidden=args.scratch_hidden,
        scratch_layers=args.scratch_layers, scratch_heads=args.scratch_heads,
        scratch_vision_backbone=args.scratch_vision, chunk_len=args.chunk, normalization=args.normalization,
        val_fraction=args.val_fraction, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm, lora_rank=0 if full else args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_scope=args.lora_scope,
        train_parts=list(MODEL_PARTS) if full else list(args.train), quantize=args.quantize,
        gradient_checkpointing=args.gradient_checkpointing, augment=not args.no_augment, augment_shift_px=args.shift_px, ema_decay=args.ema_decay, action_bin_sigma=args.bin_sigma,
        keep_base_statistics=args.keep_base_stats, num_workers=args.num_workers,
        device=args.device, report_to=[r for r in args.report_to if r != "none"],
        eval_every=args.eval_every, save_every=args.save_every, snapshot_every=args.snapshot_every, log_every=args.log_every,
        max_val_samples=args.max_val_samples, learning_check_samples=args.learning_check_samples, cache_dir=args.cache_dir, resume=not args.no_resume,
        save_adapter=args.save_adapter, progress=not args.no_progress)


def run_from_args(args: argparse.Namespace) -> int:
    import os

    import torch.distributed as dist

    try:
        result = run_training(config_from_args(args))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint": str(result.checkpoint_dir), "steps": result.steps,
                          "final_loss": result.final_loss, **result.metrics}))
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="openvla-ros train", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:
        print(f"openvla-ros train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(train_main())
