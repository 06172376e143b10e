"""The `openvla-ros` command: one entry point with subcommands.

    openvla-ros make-tiny-checkpoint OUT [--seed N] [--chunk K]
    openvla-ros make-shaped-checkpoint OUT [--layers N | --reduced]
    openvla-ros predict --checkpoint DIR --image FILE --instruction TEXT [--json]
    openvla-ros bench engine --checkpoint DIR [--engine all|NAME... | --forced-steps P...] [--json]
    openvla-ros eval bag --checkpoint DIR [DIR...] --bags PATH [PATH...] --out DIR [--truth-topic T]
    openvla-ros eval topics BAG
    openvla-ros eval latency --checkpoint DIR [--latencies 0.05,0.1,...|--latency-file F] [--strategies ...] --out DIR
    openvla-ros train (--checkpoint CKPT | --from-scratch) --data BAGS... --out DIR
    openvla-ros bench gpu [--out FILE] [--with-7b]
    openvla-ros bench load --checkpoint DIR [--engine E] [--dtype auto|float32|bfloat16]
    openvla-ros bench ik|control [--json]
    openvla-ros bench train [--steps N] [--batch-size B] [--lora-rank R | --full] [--num-workers N] [--threads T] [--json]
    openvla-ros sim --task reach-cube --seconds N [--checkpoint DIR]
    openvla-ros demo [--loop]

Errors in user input exit with status 2 and one line naming the bad value.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .vla import constants as C

DEFAULT_INSTRUCTION = "reach the red cube"
# `bench engine --engine ...` runs every image with these too, so agreement covers several prompts.
BENCH_EXTRA_INSTRUCTIONS = ("pick up the blue block", "push the red block to the left")
DEMO_DIR = Path("runs/demo")


def _add_engine_options(parser: argparse.ArgumentParser, several_checkpoints: bool = False) -> None:
    from .engines import engine_names

    from .engines.onnx_engine import add_onnx_options
    from .engines.remote import add_remote_options
    from .engines.tensorrt_engine import add_tensorrt_options

    if several_checkpoints:
        parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more checkpoint directories")
    else:
        parser.add_argument("--checkpoint", default=None,
                            help="checkpoint directory (official OpenVLA format); not needed with --engine remote")
    parser.add_argument("--engine", default="torch", choices=engine_names(), help="backend (default: torch)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=C.DTYPE_CHOICES, help=C.DTYPE_HELP)
    parser.add_argument("--unnorm-key", default=None, help="dataset key of the statistics to un-normalise with")
    parser.add_argument("--center-crop", action="store_true", help="90%% area centre crop (augmentation-trained models)")
    parser.add_argument("--rotate-180", action="store_true", help="rotate the image 180 degrees (camera upside down)")
    add_onnx_options(parser)
    add_remote_options(parser)
    add_tensorrt_options(parser)


def _engine_options(args) -> dict:
    """create_engine keyword options for the chosen backend from the shared engine flags."""
    from .engines.onnx_engine import onnx_options_from_args
    from .engines.remote import remote_options_from_args

    options = {"device": args.device, "dtype": args.dtype, "unnorm_key": args.unnorm_key,
               "center_crop": args.center_crop, "rotate_180": args.rotate_180}
    if args.engine == "onnx":
        options.update(onnx_options_from_args(args))
    elif args.engine == "remote":
        options.update(remote_options_from_args(args))
    elif args.engine == "tensorrt":
        options["trt_dir"] = args.trt_dir
    return options


def _engine_from_args(args, checkpoint=None):
    from .engines import create_engine

    checkpoint = checkpoint if checkpoint is not None else args.checkpoint
    if checkpoint is None and args.engine != "remote":
        raise ValueError(f"--checkpoint is required with --engine {args.engine}")
    return create_engine(args.engine, checkpoint, **_engine_options(args))


def load_image_file(path) -> "np.ndarray":
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def format_action(chunk) -> str:
    lines = []
    for k, action in enumerate(chunk.actions):
        prefix = f"t+{k * chunk.dt:.2f}s " if chunk.chunk_len > 1 else ""
        lines.append(prefix + "  ".join(f"{name}={value:+.4f}" for name, value in zip(chunk.dim_names, action)))
    return "\n".join(lines)


def cmd_make_tiny_checkpoint(args) -> int:
    from .vla.tiny import write_tiny_checkpoint

    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    out = write_tiny_checkpoint(args.out, seed=args.seed, chunk=args.chunk)
    print(f"wrote tiny checkpoint to {out}")
    return 0


def cmd_make_shaped_checkpoint(args) -> int:
    from .vla.shaped import reduced_config, released_config, write_shaped_checkpoint

    if args.layers is not None and args.layers < 2:
        raise ValueError(f"--layers must be >= 2, got {args.layers}")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    config = reduced_config() if args.reduced else released_config(layers=args.layers)
    out = write_shaped_checkpoint(args.out, config, seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 1e9),
                                  progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {'reduced' if args.reduced else 'released'}-shape checkpoint to {out}")
    return 0


def cmd_bench_gpu(args) -> int:
    from .engines.gpu_check import run_gpu_check

    if args.wide_layers < 2:
        raise ValueError(f"--wide-layers must be >= 2, got {args.wide_layers}")
    if args.runs < 2:
        raise ValueError(f"--runs must be >= 2, got {args.runs}")
    report = run_gpu_check(args.out, device=args.device, wide_layers=args.wide_layers, wide=not args.no_wide,
                           with_7b=args.with_7b, tests=not args.no_tests, engines=args.engine, runs=args.runs,
                           workdir=args.workdir, progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {args.out}: " + ", ".join(f"{name} {'ok' if part['ok'] else 'FAILED'}"
                                            for name, part in report["parts"].items()))
    return 0 if report["ok"] else 1


def cmd_bench_load(args) -> int:
    from .engines.load_bench import measure_load

    result = measure_load(args.checkpoint, engine=args.engine, dtype=args.dtype, device=args.device)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_predict(args) -> int:
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    image = load_image_file(args.image)
    engine = _engine_from_args(args)
    chunks = [engine.predict(image, args.instruction, stamp=time.time()) for _ in range(args.repeat)]
    chunk = chunks[-1]
    latencies = [c.timings_ms.get("total", float("nan")) for c in chunks]
    if args.json:
        result = chunk.as_dict()
        result["latency_ms"] = statistics.median(latencies)
        result["latencies_ms"] = latencies
        result["tokens_repeatable"] = all(c.tokens.tolist() == chunk.tokens.tolist() for c in chunks)
        result["engine"] = engine.info()
        print(json.dumps(result))
    else:
        print(format_action(chunk))
        print(f"latency {statistics.median(latencies):.1f} ms (median of {len(latencies)}), tokens {chunk.tokens.tolist()}")
    return 0


def cmd_bench_engine(args) -> int:
    import torch

    from .engines.bench import bench_engine, synthetic_scene
    from .engines.torch_engine import TorchEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine and args.forced_steps is not None:
        raise ValueError(f"--forced-steps {args.forced_steps} benches the torch engine alone; drop --engine {args.engine}")
    if args.engine:
        return _bench_backends(args)
    engine = TorchEngine(args.checkpoint, device=args.device, dtype=args.dtype, unnorm_key=args.unnorm_key)
    if args.forced_steps is not None:
        from .engines.bench import bench_forced_prefix, bench_inputs, format_forced_prefix_table

        image = load_image_file(args.image) if args.image else None
        result = bench_forced_prefix(engine, bench_inputs(args.images, args.instruction, image), args.forced_steps,
                                     runs=args.runs, warmup=args.warmup)
        print(json.dumps(result) if args.json else format_forced_prefix_table(result))
        return 0
    image = load_image_file(args.image) if args.image else synthetic_scene()
    result = bench_engine(engine, image, args.instruction, runs=args.runs, warmup=args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


def _bench_backends(args) -> int:
    """`bench engine --engine all|NAME...`: one row per backend on the same images."""
    from .engines.bench import bench_backends, bench_inputs, format_backends_table
    from .engines.onnx_engine import onnx_options_from_args

    image = load_image_file(args.image) if args.image else None
    inputs = bench_inputs(args.images, [args.instruction, *args.more_instructions], image)
    result = bench_backends(args.checkpoint, args.engine, inputs=inputs, runs=args.runs, warmup=args.warmup,
                            device=args.device, dtype=args.dtype, unnorm_key=args.unnorm_key,
                            onnx_options=onnx_options_from_args(args), trt_dir=args.trt_dir)
    print(json.dumps(result) if args.json else format_backends_table(result))
    return 0


def _fk_from_args(args):
    """`fk(joint_names, positions) -> 4x4` through the URDF, for /joint_states ground truth."""
    if not args.urdf:
        return None
    import numpy as np

    from .control.kinematics import ArmKinematics

    kin = ArmKinematics.from_urdf(args.urdf, args.base_frame, args.tip_frame)

    def fk(names, positions):
        by_name = dict(zip(names, positions))
        missing = [n for n in kin.joint_names if n not in by_name]
        if missing:
            raise ValueError(f"joint_states lack joints {missing} of {args.urdf}")
        return kin.tip_pose(np.array([by_name[n] for n in kin.joint_names])).as_matrix()

    return fk


def cmd_eval_bag(args) -> int:
    from .eval.bags import BagReadOptions
    from .eval.open_loop import EvalOptions, load_instruction_pairs, run_eval
    from .eval.report import comparison_markdown

    bag_options = BagReadOptions(
        image_topic=args.image_topic, instruction=args.instruction, instruction_topic=args.instruction_topic,
        truth_topic=args.truth_topic, gripper_topic=args.gripper_topic, dt=args.dt, sync=args.sync,
        tolerance=args.tolerance, fk=_fk_from_args(args), typestore=args.typestore, stride=args.stride,
        max_frames=args.max_frames,
        truth_fields=args.truth_fields.split(",") if args.truth_fields else None).validated()
    options = EvalOptions(bag=bag_options, unnorm_key=args.unnorm_key, repeat=args.repeat,
                          sensitivity_frames=args.sensitivity_frames,
                          instruction_pairs=load_instruction_pairs(args.instruction_pairs) if args.instruction_pairs else None)

    def engine_factory(checkpoint):
        return _engine_from_args(args, checkpoint)

    rows = run_eval(engine_factory, args.checkpoint, args.bags, options, args.out)
    print(comparison_markdown(rows))
    print(f"reports written under {args.out}")
    return 0


def _csv_list(text: str, convert=str, what: str = "value") -> tuple:
    try:
        return tuple(convert(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{what}: expected a comma-separated list, got {text!r}") from None


def cmd_eval_latency(args) -> int:
    from .demo import DemoConfig, checkpoint_center_crop, eval_seed
    from .sim.latency_sweep import SweepConfig, read_latency_file, run_latency_sweep, sweep_markdown, write_sweep_report

    config = SweepConfig(
        latencies_s=_csv_list(args.latencies, float, "latencies"),
        measured_latencies_s=read_latency_file(args.latency_file) if args.latency_file else (),
        strategies=_csv_list(args.strategies, str, "strategies"), geometries=_csv_list(args.geometries, str, "geometries"),
        episodes=args.episodes, max_seconds=args.max_seconds, jitter_seed=args.jitter_seed).validated()
    if args.engine != "remote" and args.checkpoint is None:
        raise ValueError(f"--checkpoint is required with --engine {args.engine}")
    if args.checkpoint is not None and not args.center_crop:
        args.center_crop = checkpoint_center_crop(args.checkpoint, False)
    if args.workers > 1:  # each worker process builds its own engine
        import functools

        from .engines import create_engine

        engine = functools.partial(create_engine, args.engine, args.checkpoint, **_engine_options(args))
    else:
        engine = _engine_from_args(args)
    seeds = [eval_seed(DemoConfig(), i) for i in range(config.episodes)]
    cells_total = len(config.geometries) * len(config.latency_axis) * len(config.strategies)
    from tqdm.auto import tqdm

    with tqdm(total=cells_total * config.episodes, desc="latency sweep", unit="episode", file=sys.stderr) as progress:
        def on_episode(geometry, latency, strategy):
            progress.update(1)
            progress.set_postfix_str(f"{geometry} L={latency} {strategy}")

        cells = run_latency_sweep(engine, seeds, config, on_episode=on_episode, workers=args.workers)
    paths = write_sweep_report(cells, args.out, config, info={"checkpoint": args.checkpoint, "engine": args.engine})
    print(sweep_markdown(cells))
    print(f"reports written under {args.out}: {', '.join(p for p in paths.values() if p)}")
    return 0


def cmd_eval_topics(args) -> int:
    from .eval.bags import list_topics

    for topic in list_topics(args.bag):
        print(f"{topic.name}\t{topic.msgtype}\t{topic.count}")
    return 0


def cmd_bench_ik(args) -> int:
    from .sim.bench import bench_ik_and_camera

    if args.steps < 1 or args.frames < 1:
        raise ValueError(f"--steps and --frames must be >= 1, got {args.steps} and {args.frames}")
    result = bench_ik_and_camera(args.steps, args.frames)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_bench_control(args) -> int:
    from .nodes.bench_control import bench_control

    progress = (lambda text: print(text, file=sys.stderr)) if args.json else print

    def run(timing: str) -> dict:
        params = {"control_timing": timing, **({"inference_process": True} if args.inference_process else {})}
        progress(f"[bench control] control_timing={timing}")
        return bench_control(checkpoint=args.checkpoint, rate=args.rate, seconds=args.seconds,
                             camera_hz=args.camera_hz, progress=progress, node_params=params,
                             receiver_priority=args.receiver_priority)

    result = run(args.control_timing)
    if args.reference:
        # The same measurement with an rclpy timer on the executor (how ROS nodes usually time a stream).
        reference = run("executor")
        result["reference"] = {"control_timing": "executor", **reference}
        for key in ("p99_period_error_ms", "sender_p99_period_error_ms"):
            ours = result[key]
            result[f"ratio_{key}"] = reference[key] / ours if ours > 0 else None
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_bench_train(args) -> int:
    import torch

    from .training.bench import bench_train

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_train(steps=args.steps, batch_size=args.batch_size, lora_rank=args.lora_rank, full=args.full,
                         num_workers=args.num_workers, device=args.device)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_record(args) -> int:
    """Run the recorder node until Ctrl-C; the same node `ros2 run openvla_ros recorder` starts."""
    from .nodes.recorder import main as recorder_main

    topics = "[" + ",".join(f"'{t}'" for t in args.topics) + "]"
    return recorder_main(["--ros-args", "-p", f"topics:={topics}", "-p", f"out_dir:={args.out}",
                          "-p", f"storage:={args.storage}", "-p", "start_recording:=true"])


def cmd_bringup(args) -> int:
    from .nodes.bringup import run_from_args

    return run_from_args(args)


def cmd_demo(args) -> int:
    """The quick demo (a tiny checkpoint, one prediction on a generated scene), or with --loop the
    whole workflow: record -> fine-tune -> evaluate -> closed loop -> ROS deployment (openvla_ros.demo)."""
    if args.loop:
        from .demo import STEPS, run_demo

        overrides = {}
        if args.episodes is not None:
            overrides["episodes"] = args.episodes
        if args.steps is not None:
            overrides["steps"] = args.steps
        if args.dagger_episodes is not None:
            overrides["dagger_episodes"] = args.dagger_episodes
        out = args.out if args.out != str(DEMO_DIR) else str(DEMO_DIR / "loop")
        summary = run_demo(out, redo=args.redo or (), resume=not args.no_resume, **overrides)
        print(json.dumps({k: summary.get(k) for k in ("closed_loop_success_rate", "run_dir") if k in summary}))
        print(f"[demo] everything is under {out} (summary.json, report.md); steps: {', '.join(STEPS)}")
        return 0
    from .engines.bench import synthetic_scene
    from .engines.torch_engine import TorchEngine
    from .vla.tiny import write_tiny_checkpoint

    checkpoint = Path(args.out) / "tiny-checkpoint"
    if not (checkpoint / "config.json").exists():
        print(f"[demo] writing a tiny OpenVLA-format checkpoint to {checkpoint}")
        write_tiny_checkpoint(checkpoint, seed=0)
    engine = TorchEngine(checkpoint)
    image = synthetic_scene(seed=1)
    engine.predict(image, args.instruction)  # warm-up (first call allocates caches)
    chunk = engine.predict(image, args.instruction)
    print(f"[demo] instruction: {args.instruction!r}")
    print(f"[demo] action ({chunk.unnorm_key}, dt={chunk.dt}s):")
    print(format_action(chunk))
    stages = ", ".join(f"{k} {v:.1f}" for k, v in chunk.timings_ms.items())
    print(f"[demo] latency {chunk.timings_ms['total']:.1f} ms ({stages} ms)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openvla-ros", description="OpenVLA on ROS 2: engines, evaluation, training, demo")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-checkpoint", help="write a tiny checkpoint in the official OpenVLA format")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1, help="actions per call (K); K*D tokens are decoded")
    p.set_defaults(func=cmd_make_tiny_checkpoint)

    p = sub.add_parser("make-shaped-checkpoint", help="a checkpoint with the released 7B's config, names and sizes "
                                                      "and random bf16 weights (~15 GB), written tensor by tensor")
    p.add_argument("out", help="output directory")
    p.add_argument("--layers", type=int, default=None, help="language-model layers (default: the released 32)")
    p.add_argument("--reduced", action="store_true", help="the released names at small widths (tests, seconds)")
    p.add_argument("--max-shard-gb", type=float, default=7.0, help="shard size limit (the released 7B: 3 shards)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_shaped_checkpoint)

    p = sub.add_parser("predict", help="one action from an image file and an instruction")
    _add_engine_options(p)
    p.add_argument("--image", required=True, help="image file (PNG/JPEG)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--repeat", type=int, default=1, help="run N times (latency median, repeatability)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="benchmarks printing JSON").add_subparsers(dest="bench", required=True)
    from .engines import engine_names
    from .engines.onnx_engine import add_onnx_options

    p = bench.add_parser("engine", help="own decode loop vs Hugging Face generate() on the same weights; "
                                         "with --engine: every backend side by side")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--engine", nargs="+", default=None, choices=engine_names() + ["all"], metavar="ENGINE",
                   help=f"backends to compare ({', '.join(engine_names())} or all); default: torch against generate()")
    p.add_argument("--images", type=int, default=5,
                   help="with --engine or --forced-steps: synthetic scenes used (ignored with --image)")
    p.add_argument("--forced-steps", type=int, nargs="+", default=None, metavar="P",
                   help="torch engine: latency with P committed actions forced (prefix forcing) against none, "
                        "e.g. --forced-steps 1 2 3 (each P < the chunk length)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=C.DTYPE_CHOICES, help=C.DTYPE_HELP)
    p.add_argument("--unnorm-key", default=None)
    p.add_argument("--image", default=None, help="image file (default: a generated scene)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    p.add_argument("--more-instructions", nargs="*", default=list(BENCH_EXTRA_INSTRUCTIONS), metavar="TEXT",
                   help="with --engine: further instructions; every image is run with each (default: "
                        f"{'; '.join(BENCH_EXTRA_INSTRUCTIONS)})")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true")
    add_onnx_options(p)
    p.add_argument("--trt-dir", default=None,
                   help="with --engine tensorrt/all: plans from `openvla-ros build-trt` (default: built from the ONNX export)")
    p.set_defaults(func=cmd_bench_engine)

    evaluation = sub.add_parser("eval", help="rosbag evaluation").add_subparsers(dest="eval", required=True)
    p = evaluation.add_parser("bag", help="open-loop evaluation of checkpoints on rosbag2 recordings")
    _add_engine_options(p, several_checkpoints=True)
    p.set_defaults(func=cmd_eval_bag)
    p.add_argument("--bags", nargs="+", required=True, help="rosbag2 directories (sqlite3 or mcap)")
    p.add_argument("--out", required=True, help="output directory for predictions.csv, summary.json, report.md")
    p.add_argument("--image-topic", default=None, help="camera topic (default: the bag's only image topic)")
    p.add_argument("--instruction", default=None, help="instruction for every frame (wins over --instruction-topic)")
    p.add_argument("--instruction-topic", default=None, help="std_msgs/String topic (default: the bag's only one)")
    p.add_argument("--truth-topic", default=None, help="ground truth: TwistStamped, JointTrajectory, Float64MultiArray, PoseStamped or JointState (type read from the bag); any other type gives its numbers")
    p.add_argument("--truth-fields", default=None, help="custom truth message type: comma-separated fields to use (default: all its numbers)")
    p.add_argument("--gripper-topic", default=None)
    p.add_argument("--dt", type=float, default=None, help="seconds per action (default: the checkpoint's)")
    p.add_argument("--sync", default="nearest", choices=["nearest", "previous", "interpolate"])
    p.add_argument("--tolerance", type=float, default=0.05, help="stamp matching tolerance [s]")
    p.add_argument("--typestore", default=None, help="ROS 2 type store (default: from the bag, else kilted)")
    p.add_argument("--stride", type=int, default=1, help="use every n-th frame")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="N runs per frame (repeatability)")
    p.add_argument("--instruction-pairs", default=None, help="file of instruction pairs (sensitivity)")
    p.add_argument("--sensitivity-frames", type=int, default=None)
    p.add_argument("--urdf", default=None, help="URDF for /joint_states ground truth")
    p.add_argument("--base-frame", default="panda_link0")
    p.add_argument("--tip-frame", default="panda_grasptarget")
    from .nodes.replay import add_replay_parser

    add_replay_parser(evaluation)
    from .sim.latency_sweep import DEFAULT_LATENCIES_S, GEOMETRIES, STRATEGIES

    p = evaluation.add_parser("latency", help="closed loop in simulation at several inference latencies, per "
                              "execution strategy and chunk geometry (success, jerk, switch jumps; JSON, Markdown, plot)")
    _add_engine_options(p)
    p.add_argument("--out", default="runs/latency", help="output directory (default: runs/latency)")
    p.add_argument("--latencies", default=",".join(f"{v:g}" for v in DEFAULT_LATENCIES_S),
                   help="inference latencies in seconds, comma-separated (default: %(default)s)")
    p.add_argument("--latency-file", default=None,
                   help="measured latencies (s; JSON list or one per line): each call draws one (jitter modelled)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="execution strategies, comma-separated (default: %(default)s)")
    p.add_argument("--geometries", default=",".join(GEOMETRIES),
                   help="chunk: the model's K actions; one_action: only the first (default: %(default)s)")
    p.add_argument("--episodes", type=int, default=20, help="seeded scenes per cell (the demo's evaluation seeds)")
    p.add_argument("--max-seconds", type=float, default=8.0, help="episode length in simulated seconds")
    p.add_argument("--jitter-seed", type=int, default=0, help="seed of the draws from --latency-file")
    p.add_argument("--workers", type=int, default=1,
                   help="processes running cells in parallel (one torch thread each; results do not depend on it)")
    p.set_defaults(func=cmd_eval_latency)
    p = evaluation.add_parser("topics", help="list a bag's topics, types and counts")
    p.add_argument("bag")
    p.set_defaults(func=cmd_eval_topics)

    from .training.cli import add_train_arguments, run_from_args

    p = sub.add_parser("train", help="fine-tune (LoRA or full) on recorded demonstrations; writes a checkpoint")
    add_train_arguments(p)
    p.set_defaults(func=run_from_args)

    # Dataset formats: bags <-> LeRobot v3.0, RLDS -> bags.
    from .convert import add_convert_arguments

    add_convert_arguments(sub.add_parser("convert", help="demonstrations between formats: bags -> LeRobot v3.0, "
                                                         "LeRobot/RLDS -> bags (for eval replay / eval bag)"))

    p = bench.add_parser("load", help="peak memory and time of loading an engine, in a fresh child process; "
                                       "a model that cannot fit reports the refusal")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--engine", default="torch", choices=engine_names())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=C.DTYPE_CHOICES, help=C.DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_bench_load)

    p = bench.add_parser("gpu", help="every GPU-only test and benchmark in one run, one JSON (CUDA machines)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    p.add_argument("--device", default="cuda", help="cuda[:N]; cpu runs the same plumbing on the CPU")
    p.add_argument("--engine", nargs="+", default=None, choices=engine_names(), metavar="ENGINE",
                   help="backends for the tiny comparison (default: torch bnb4 bnb8 int8 int4 onnx tensorrt)")
    p.add_argument("--wide-layers", type=int, default=2, help="LM layers of the released-width model (default 2)")
    p.add_argument("--no-wide", action="store_true", help="skip the released-width model (~2.9 GB written)")
    p.add_argument("--with-7b", action="store_true", help="also load a 7B-shaped checkpoint (~15 GB written)")
    p.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu`")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir); reused if present")
    p.set_defaults(func=cmd_bench_gpu)

    p = bench.add_parser("ik", help="IK step and camera frame cost on the Panda")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_ik)

    p = bench.add_parser("control", help="vla_node's command stream measured from another process")
    p.add_argument("--rate", type=float, default=100.0, help="control rate [Hz]")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring window [s]")
    p.add_argument("--camera-hz", type=float, default=30.0)
    p.add_argument("--checkpoint", default=None, help="default: a tiny checkpoint made for the run")
    p.add_argument("--inference-process", action="store_true", help="vla_node's inference_process: engine in a child process")
    p.add_argument("--control-timing", default="thread", choices=["thread", "executor"],
                   help="vla_node's control_timing (default: thread, the node's default)")
    p.add_argument("--receiver-priority", type=int, default=5,
                   help="SCHED_FIFO priority of the measuring subscriber's threads, as a controller manager runs "
                        "(0 = normal scheduling; needs CAP_SYS_NICE)")
    p.add_argument("--reference", action="store_true",
                   help="also measure control_timing=executor (an rclpy timer) and report the ratio")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_control)

    p = bench.add_parser("train", help="training steps/s and memory on a tiny checkpoint, with and without loader workers")
    p.add_argument("--steps", type=int, default=20, help="training steps per run, the first one a warm-up")
    p.add_argument("--batch-size", type=int, default=8)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=32)
    mode.add_argument("--full", action="store_true", help="full fine-tuning of every part instead of LoRA")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers of the measured run (reference: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the training process (default: torch's choice)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("record", help="record topics into rosbag2 episodes (the recorder node, started at once)")
    p.add_argument("--topics", nargs="+", required=True, help="'name' or 'name:pkg/msg/Type'")
    p.add_argument("--out", required=True, help="directory receiving one bag per episode")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    p.set_defaults(func=cmd_record)

    from .engines.onnx_export import add_export_onnx_parser
    from .engines.server import add_serve_parser, cmd_serve
    from .engines.tensorrt_engine import add_build_trt_parser

    p = add_serve_parser(sub, _add_engine_options)
    p.set_defaults(func=lambda a: cmd_serve(a, _engine_from_args(a)))
    add_export_onnx_parser(sub.add_parser("export", help="export a checkpoint for another runtime")
                           .add_subparsers(dest="export", required=True))
    add_build_trt_parser(sub)

    from .nodes.sim_run import add_sim_parser

    add_sim_parser(sub)

    from .nodes.bringup import build_parser as build_bringup_parser

    p = build_bringup_parser(sub.add_parser("bringup", help="run several nodes in one process with the launch files' parameter files"))
    p.set_defaults(func=cmd_bringup)

    p = sub.add_parser("demo", help="the quick-start demo")
    p.add_argument("--out", default=str(DEMO_DIR), help=f"run directory (default: {DEMO_DIR})")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    p.add_argument("--loop", action="store_true",
                   help="the whole workflow in simulation: record, fine-tune, evaluate, closed loop (minutes)")
    p.add_argument("--episodes", type=int, default=None, help="--loop: demonstrations to record")
    p.add_argument("--steps", type=int, default=None, help="--loop: training steps")
    p.add_argument("--dagger-episodes", type=int, default=None,
                   help="--loop: rollouts of the trained model labelled by the expert for a DAgger round (0: none)")
    p.add_argument("--redo", nargs="+", default=None, help="--loop: steps to run again even when finished")
    p.add_argument("--no-resume", action="store_true", help="--loop: redo every step")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TimeoutError) as exc:  # bad user input or a graph that never came up: one line
        print(f"openvla-ros: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
