"""Closed-loop replay through ROS: bag_player -> vla_node [-> ik_node] -> recorder in one process, then scoring.

    openvla-ros eval replay --checkpoint DIR --bag PATH --out DIR [--truth-topic T] [--rate R]
        [--ik-params config/ik_node.yaml --ik-params config/robots/panda.yaml [--ik-param NAME:=VALUE]]

Each node spins its own SingleThreadedExecutor on its own thread (one rclpy context for them all,
so discovery stays inside this process's domain). The player publishes the bag's camera
(remapped to ``/camera/image_raw`` or ``.../compressed``) and instruction (``/vla/instruction``)
with stamps of now, the real vla_node runs the engine and its chunk buffer, the recorder writes
the stack's outputs into ``OUT/replay_bag``; `openvla_ros.eval.closed_loop` scores that bag
against the source bag's truth and writes summary.json, report.md and plots.

With ik_node parameter files, ik_node runs too: the player also plays the bag's joint states
(remapped to ik_node's ``joint_states_topic``) as the arm's measured state, ik_node turns
vla_node's twists into joint targets, and the recorder records them (and the forwarded gripper
command) so the summary scores the joint commands the stack would have sent. vla_node stamps its
twists with ik_node's base frame (ik_node refuses any other), and ik_node's joint-state timeout is
widened to the bag's joint-state gaps unless ``--ik-param joint_state_timeout:=...`` sets it. The
arm in the bag does not follow the commands: ik_node re-seeds from the bag's joint states when
they drift apart (its reseed counter, in the report, says how often).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..eval.bags import MSG_COMPRESSED_IMAGE, MSG_FLOAT64, MSG_FLOAT64_ARRAY, MSG_JOINT_STATE, MSG_JOINT_TRAJECTORY
from ..eval.closed_loop import (CAMERA_TOPIC, GRIPPER_TOPIC, INSTRUCTION_TOPIC, RECORDED_BAG, RECORDED_TOPICS,
                                TWIST_TOPIC, PublishedFrame, ReplayOptions, load_source_frames, score_replay,
                                source_joint_states, write_replay_outputs)
from ..vla import constants as C

from .ros_common import SpinningNode

log = logging.getLogger(__name__)

IK_STATUS_TOPIC = "/ik_node/status"  # ik_node's ~/status
IK_STATUS_MSGTYPE = "diagnostic_msgs/msg/DiagnosticArray"
# A bag's joint states come at the rate they were recorded (5 Hz in the demo's bags); ik_node must
# not call them stale between two samples, so its timeout covers the longest gap with this margin.
JOINT_STATE_GAP_MARGIN = 1.5
MAX_JOINT_STATE_TIMEOUT_S = 10.0  # ik_node's joint_state_timeout range ends here


def _node_options(params: dict, params_files: str | Sequence[str] | None = None, remaps: dict | None = None) -> dict:
    """make_node keyword arguments: parameter files (in order) and remaps as ROS arguments, `params` as
    overrides (they win)."""
    from rclpy.parameter import Parameter

    args = ["--ros-args"]
    if isinstance(params_files, (str, Path)):
        params_files = [params_files]
    for params_file in params_files or ():
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


def _ik_command_msgtype(output_type: str) -> str:
    """The message type ik_node publishes its joint targets with for `output_type`."""
    from . import ik_node  # not at import time: it loads pinocchio, which the CLI's parser does not need

    return {ik_node.OUTPUT_JOINT_TRAJECTORY: MSG_JOINT_TRAJECTORY, ik_node.OUTPUT_FLOAT64_MULTI_ARRAY: MSG_FLOAT64_ARRAY,
            ik_node.OUTPUT_JOINT_STATE: MSG_JOINT_STATE}[output_type]


def _ik_overrides(options: ReplayOptions) -> dict:
    """ik_node's parameter overrides: wired to vla_node's outputs, then the user's (typed, validated; they win)."""
    from .bringup import coerce_override

    return {"twist_topic": TWIST_TOPIC, "gripper_input_topic": GRIPPER_TOPIC,
            **{k: coerce_override("ik_node", k, v) for k, v in options.ik_parameters.items()}}


def _start_ik_node(context, options: ReplayOptions, overrides: dict, joint_states, rate: float):
    """ik_node from the parameter files, its joint-state timeout widened to the bag's joint-state gaps."""
    from rclpy.parameter import Parameter

    from . import ik_node

    ik = ik_node.make_node(context=context, **_node_options(overrides, options.ik_params_files))
    needed = min(MAX_JOINT_STATE_TIMEOUT_S, JOINT_STATE_GAP_MARGIN * joint_states.max_gap_s / rate)
    if "joint_state_timeout" not in options.ik_parameters and needed > ik.params["joint_state_timeout"]:
        log.info("ik_node joint_state_timeout %.3f s -> %.3f s: %s has gaps of up to %.3f s",
                 ik.params["joint_state_timeout"], needed, joint_states.topic, joint_states.max_gap_s)
        result = ik.set_parameters([Parameter("joint_state_timeout", value=needed)])[0]
        if not result.successful:
            ik.destroy_node()
            raise ValueError(f"cannot set ik_node joint_state_timeout to {needed:.3f} s: {result.reason}")
    return ik


def run_replay(engine, bag, out_dir, options: ReplayOptions | None = None, *, context=None,
               progress: bool = True, plots: bool = True) -> dict:
    """Replay `bag` through vla_node (and ik_node) running `engine`; returns the summary (also in OUT/summary.json)."""
    import rclpy

    from . import bag_player, recorder, vla_node

    options = (options or ReplayOptions()).validated()
    out = Path(out_dir)
    source = load_source_frames(bag, options, float(engine.dt))
    if not len(source.stamps_ns):
        raise ValueError(f"bag {str(bag)!r} gave no frames to replay: {source.sync}")
    joint_states, ik_overrides = None, {}
    if options.ik_enabled:  # before anything starts: a bag without joint states is a clear error
        ik_overrides = _ik_overrides(options)
        joint_states = source_joint_states(bag, options)
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
    ik_info = None
    recorded_topics = dict(RECORDED_TOPICS)
    try:
        if joint_states is not None:
            ik = _start_ik_node(context, options, ik_overrides, joint_states, float(options.rate))
            spinners.append(SpinningNode(ik, context))  # stopped last: it only feeds the recorder
            ikp = ik.params
            # ik_node refuses twists stamped with another frame than its base frame.
            if "base_frame" in options.vla_parameters and options.vla_parameters["base_frame"] != ikp["base_frame"]:
                raise ValueError(f"vla_node base_frame {options.vla_parameters['base_frame']!r} differs from "
                                 f"ik_node's {ikp['base_frame']!r}: ik_node would refuse every twist")
            vla_params["base_frame"] = ikp["base_frame"]
            # ik_node's topic parameters may be relative: the recorder and the bag need absolute names.
            joint_states_topic, command_topic = (ik.resolve_topic_name(ikp[k]) for k in ("joint_states_topic",
                                                                                         "command_topic"))
            if joint_states_topic != joint_states.topic:
                remaps[joint_states.topic] = joint_states_topic
            played.append(joint_states.topic)
            recorded_topics[command_topic] = _ik_command_msgtype(ikp["output_type"])
            if ikp["gripper_command_topic"]:
                recorded_topics[ik.resolve_topic_name(ikp["gripper_command_topic"])] = MSG_FLOAT64
            recorded_topics[IK_STATUS_TOPIC] = IK_STATUS_MSGTYPE
            ik_info = {"params_files": [str(f) for f in options.ik_params_files],
                       "parameters": dict(options.ik_parameters), "source_joint_states_topic": joint_states.topic,
                       "source_joint_states": joint_states.count,
                       **{k: ikp[k] for k in ("base_frame", "tip_frame", "rate_hz", "output_type", "command_topic",
                                              "gripper_command_topic", "joint_states_topic", "joint_state_timeout")},
                       "command_topic": command_topic, "joint_states_topic": joint_states_topic}
            if ik.controller is None:  # no URDF parameter: it waits for robot_description_topic
                _wait(lambda: ik.controller is not None, options.startup_timeout_s,
                      f"ik_node got no robot model (set --ik-param urdf_path:=FILE, or use_sim_urdf:=true for "
                      f"the simulated Panda, or publish {ikp['robot_description_topic'] or 'robot_description'})")
        rec = recorder.make_node(context=context, **_node_options({
            "topics": [f"{t}:{m}" for t, m in recorded_topics.items()], "out_dir": str(out),
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
        needed = set(recorded_topics) - {INSTRUCTION_TOPIC}
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
        for spinner in reversed(spinners):  # player, vla_node, then the recorder closes its bag (then ik_node)
            spinner.stop()
        if harness is not None:
            harness.destroy_node()
        if own_context:
            rclpy.shutdown(context=context)

    summary, series = score_replay(
        recorded, published, source, rate=options.rate, control_rate_hz=control_rate_hz,
        joint_command_topic=ik_info["command_topic"] if ik_info else None,
        ik_rate_hz=ik_info["rate_hz"] if ik_info else None, ik_status_topic=IK_STATUS_TOPIC if ik_info else None)
    summary = {"bag": str(bag), "recorded_bag": str(recorded), "image_topic": source.image_topic,
               "truth_topic": options.truth_topic, "rate": options.rate, "dt": source.dt, "sync": source.sync,
               "checkpoint": engine_info.get("checkpoint"),
               "engine": {"name": getattr(engine, "name", type(engine).__name__), **dict(engine_info)},
               "ik": ik_info, **summary}
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
    p.add_argument("--dtype", default="auto", choices=C.DTYPE_CHOICES, help=C.DTYPE_HELP)
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
    p.add_argument("--ik-params", action="append", default=[], metavar="FILE",
                   help="run ik_node too, with this parameter file (repeatable, in order), e.g. "
                        "--ik-params config/ik_node.yaml --ik-params config/robots/panda.yaml")
    p.add_argument("--ik-param", action="append", type=_parameter_pair, default=[], metavar="NAME:=VALUE",
                   help="ik_node parameter override (repeatable), e.g. --ik-param use_sim_urdf:=true")
    p.add_argument("--joint-states-topic", default=None,
                   help="the bag's sensor_msgs/JointState topic ik_node gets (default: the bag's only one)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_replay)
    return p


def cmd_replay(args) -> int:
    from ..engines import create_engine

    options = ReplayOptions(
        image_topic=args.image_topic, instruction=args.instruction, instruction_topic=args.instruction_topic,
        truth_topic=args.truth_topic, gripper_topic=args.gripper_topic, sync=args.sync, tolerance=args.tolerance,
        typestore=args.typestore, rate=args.rate, start_offset_s=args.start_offset, drain_s=args.drain,
        storage=args.storage, vla_params_file=args.params_file, vla_parameters=dict(args.param),
        ik_params_files=tuple(args.ik_params), ik_parameters=dict(args.ik_param),
        joint_states_topic=args.joint_states_topic).validated()
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
    joints = summary.get("joint_commands")
    if joints:
        print(f"joint commands {joints['count']} on {joints['topic']} at {joints['rate_hz'] or 0:.1f} Hz, "
              f"{joints['distinct_positions']} distinct positions, max step {joints['max_step_rad'] or 0:.4g} rad")
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
