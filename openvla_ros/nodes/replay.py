"""Closed-loop replay through ROS: bag_player -> vla_node -> recorder in one process, then scoring.

    openvla-ros eval replay --checkpoint DIR --bag PATH --out DIR [--truth-topic T] [--rate R]

Each node spins its own SingleThreadedExecutor on its own thread (one rclpy context for the
three, so discovery stays inside this process's domain). The player publishes the bag's camera
(remapped to ``/camera/image_raw`` or ``.../compressed``) and instruction (``/vla/instruction``)
with stamps of now, the real vla_node runs the engine and its chunk buffer, the recorder writes
the stack's outputs into ``OUT/replay_bag``; `openvla_ros.eval.closed_loop` scores that bag
against the source bag's truth and writes summary.json, report.md and plots.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from ..eval.bags import MSG_COMPRESSED_IMAGE
from ..eval.closed_loop import (CAMERA_TOPIC, INSTRUCTION_TOPIC, RECORDED_BAG, RECORDED_TOPICS, PublishedFrame,
                                ReplayOptions, load_source_frames, score_replay, write_replay_outputs)

from .ros_common import SpinningNode

log = logging.getLogger(__name__)


def _node_options(params: dict, params_file: str | None = None, remaps: dict | None = None) -> dict:
    """make_node keyword arguments: a parameter file and remaps as ROS arguments, `params` as overrides (they win)."""
    from rclpy.parameter import Parameter

    args = ["--ros-args"]
    if params_file:
        args += ["--params-file", str(params_file)]
    for src, dst in (remaps or {}).items():
        args += ["-r", f"{src}:={dst}"]
    return {"cli_args": args, "parameter_overrides": [Parameter(k, value=v) for k, v in params.items()]}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay: {what} within {timeout:g} s")
        time.sleep(0.02)


def run_replay(engine, bag, out_dir, options: ReplayOptions | None = None, *, context=None,
               progress: bool = True, plots: bool = True) -> dict:
    """Replay `bag` through vla_node running `engine`; returns the summary (also in OUT/summary.json)."""
    import rclpy

    from . import bag_player, recorder, vla_node

    options = (options or ReplayOptions()).validated()
    out = Path(out_dir)
    source = load_source_frames(bag, options, float(engine.dt))
    if not len(source.stamps_ns):
        raise ValueError(f"bag {str(bag)!r} gave no frames to replay: {source.sync}")
    recorded = out / RECORDED_BAG
    if recorded.exists():
        if not (recorded / "metadata.yaml").exists():
            raise ValueError(f"{recorded} exists and is not a bag from an earlier replay; choose another --out")
        shutil.rmtree(recorded)  # an earlier replay's outputs in the same run directory
    out.mkdir(parents=True, exist_ok=True)

    compressed = source.image_type == MSG_COMPRESSED_IMAGE
    remaps = {source.image_topic: CAMERA_TOPIC + ("/compressed" if compressed else "")}
    played = [source.image_topic]
    if options.instruction is None and source.instruction_topic:
        played.append(source.instruction_topic)
        remaps[source.instruction_topic] = INSTRUCTION_TOPIC
    vla_params = {"start_enabled": True, "status_rate_hz": 10.0, "publish_action_chunk": True,
                  "image_transport": "compressed" if compressed else "raw", **options.vla_parameters}

    own_context = context is None
    if own_context:
        context = rclpy.Context()
        rclpy.init(context=context)
    spinners: list[SpinningNode] = []
    published: list[PublishedFrame] = []
    bar = None
    harness = None
    try:
        rec = recorder.make_node(context=context, **_node_options({
            "topics": [f"{t}:{m}" for t, m in RECORDED_TOPICS.items()], "out_dir": str(out),
            "name_pattern": RECORDED_BAG, "storage": options.storage, "start_recording": True,
            "discovery_period_s": 0.05}))
        spinners.append(SpinningNode(rec, context))
        vla = vla_node.make_node(engine=engine, context=context, **_node_options(vla_params, options.vla_params_file))
        spinners.append(SpinningNode(vla, context))
        control_rate_hz = vla.params["control_rate_hz"]
        if options.instruction is not None:  # a fixed instruction replaces the bag's
            from std_msgs.msg import String

            from .ros_common import latched_qos

            harness = rclpy.create_node("replay_instruction", context=context)
            harness.create_publisher(String, INSTRUCTION_TOPIC, latched_qos()).publish(String(data=options.instruction))
        # vla_node's outputs exist now; the instruction's publisher (player or harness) may come later.
        needed = set(RECORDED_TOPICS) - {INSTRUCTION_TOPIC}
        _wait(lambda: set(rec.subscribed) >= needed, options.startup_timeout_s,
              f"the recorder did not subscribe to {sorted(needed)}")

        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(source.stamps_ns), desc="replay", unit="frame")

        def on_published(message):
            if message.topic == source.image_topic and message.stamp_ns is not None:
                published.append(PublishedFrame(message.original_stamp_ns, message.stamp_ns))
                if bar is not None:
                    bar.update(1)

        player = bag_player.make_node(on_published=on_published, context=context, **_node_options({
            "bag": str(bag), "topics": played, "rate": float(options.rate),
            "start_offset_s": float(options.start_offset_s), "stamp_mode": "now",
            "wait_for_subscribers_s": float(options.startup_timeout_s),
            "typestore": options.typestore or ""}, remaps=remaps))
        spinners.append(SpinningNode(player, context))
        bag_s = (player.playback.bag_end_ns - player.playback.t0_ns) * 1e-9 / options.rate
        if not player.finished.wait(bag_s + options.startup_timeout_s + 10.0):
            raise TimeoutError(f"replay: the player did not finish {bag_s:.1f} s of bag in time")
        if player.error is not None:
            raise player.error
        time.sleep(options.drain_s)  # the last frames' chunks are still in flight
        engine_info = vla.engine.info() if hasattr(vla.engine, "info") else {}
    finally:
        if bar is not None:
            bar.close()
        for spinner in reversed(spinners):  # player, vla_node, then the recorder closes its bag
            spinner.stop()
        if harness is not None:
            harness.destroy_node()
        if own_context:
            rclpy.shutdown(context=context)

    summary, series = score_replay(recorded, published, source, rate=options.rate, control_rate_hz=control_rate_hz)
    summary = {"bag": str(bag), "recorded_bag": str(recorded), "image_topic": source.image_topic,
               "truth_topic": options.truth_topic, "rate": options.rate, "dt": source.dt, "sync": source.sync,
               "checkpoint": engine_info.get("checkpoint"),
               "engine": {"name": getattr(engine, "name", type(engine).__name__), **dict(engine_info)},
               **summary}
    write_replay_outputs(summary, series, out, plots=plots)
    return summary


# --- command line ---------------------------------------------------------------------------


def _parameter_pair(text: str):
    name, sep, value = text.partition(":=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:=VALUE, got {text!r}")
    import yaml

    return name, yaml.safe_load(value)


def add_replay_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``replay`` to an ``eval`` sub-command group (``openvla-ros eval replay ...``)."""
    from ..engines import engine_names

    p = subparsers.add_parser("replay", help="closed-loop replay of a bag through the ROS graph (player -> vla_node -> recorder)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (official OpenVLA format)")
    p.add_argument("--engine", default="torch", choices=engine_names(), help="backend (default: torch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--unnorm-key", default=None)
    p.add_argument("--center-crop", action="store_true")
    p.add_argument("--rotate-180", action="store_true")
    p.add_argument("--bag", required=True, help="rosbag2 directory (sqlite3 or mcap)")
    p.add_argument("--out", required=True, help="output directory: summary.json, report.md, plots, replay_bag/")
    p.add_argument("--image-topic", default=None, help="camera topic (default: the bag's only image topic)")
    p.add_argument("--instruction", default=None, help="instruction for the whole replay (replaces the bag's)")
    p.add_argument("--instruction-topic", default=None, help="std_msgs/String topic (default: the bag's only one)")
    p.add_argument("--truth-topic", default=None, help="ground truth: TwistStamped, JointTrajectory, Float64MultiArray, PoseStamped")
    p.add_argument("--gripper-topic", default=None)
    p.add_argument("--sync", default="nearest", choices=["nearest", "previous", "interpolate"])
    p.add_argument("--tolerance", type=float, default=0.05, help="truth stamp matching tolerance [s]")
    p.add_argument("--typestore", default=None)
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    p.add_argument("--start-offset", type=float, default=0.0, help="skip the bag's first seconds")
    p.add_argument("--drain", type=float, default=1.0, help="seconds to keep running after the last frame")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"], help="storage of the recorded bag")
    p.add_argument("--params-file", default=None, help="vla_node parameter file (e.g. config/vla_node.yaml)")
    p.add_argument("-p", "--param", action="append", type=_parameter_pair, default=[], metavar="NAME:=VALUE",
                   help="vla_node parameter override (repeatable), e.g. -p blend_policy:=crossfade")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_replay)
    return p


def cmd_replay(args) -> int:
    from ..engines import create_engine

    options = ReplayOptions(
        image_topic=args.image_topic, instruction=args.instruction, instruction_topic=args.instruction_topic,
        truth_topic=args.truth_topic, gripper_topic=args.gripper_topic, sync=args.sync, tolerance=args.tolerance,
        typestore=args.typestore, rate=args.rate, start_offset_s=args.start_offset, drain_s=args.drain,
        storage=args.storage, vla_params_file=args.params_file, vla_parameters=dict(args.param)).validated()
    engine = create_engine(args.engine, args.checkpoint, device=args.device, dtype=args.dtype,
                           unnorm_key=args.unnorm_key, center_crop=args.center_crop, rotate_180=args.rotate_180)
    try:
        summary = run_replay(engine, args.bag, args.out, options, plots=not args.no_plots)
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    latency = summary["latency_ms"]
    print(f"commands {summary['commands']} at {summary['control_rate_hz'] or 0:.1f} Hz, chunks {summary['chunks']}, "
          f"latency p50 {latency['p50'] or 0:.1f} ms, underrun fraction {summary['underrun_fraction']}")
    if summary["mae"]:
        print("first-action MAE " + " ".join(f"{k}={v:.4g}" for k, v in summary["mae"].items()))
    print(f"report written to {Path(args.out) / 'report.md'}")
    return 0


def closed_loop_main(argv=None) -> int:
    """``openvla-ros eval replay`` on its own (the same parser and error handling as the main CLI)."""
    import sys

    parser = argparse.ArgumentParser(prog="openvla-ros eval")
    add_replay_parser(parser.add_subparsers(dest="eval", required=True))
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (ValueError, TimeoutError) as exc:
        print(f"openvla-ros: error: {exc}", file=sys.stderr)
        return 2
