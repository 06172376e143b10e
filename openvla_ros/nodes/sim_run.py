"""`openvla-ros sim`: the simulated Panda cell in one process, driven by a model or the scripted expert.

    openvla-ros sim --task reach-cube --seconds 20 [--checkpoint DIR] [--seed N]

Starts sim_node + ik_node (+ vla_node when a checkpoint is given) with config/sim_bringup.yaml, the
file `ros2 launch openvla_ros sim.launch.py` uses. Without a checkpoint a small node publishes the
scripted expert's end-effector deltas as TwistStamped on /vla/eef_delta, exactly where vla_node
would, so the arm moves through ik_node either way. Prints the distance to the target once a second
and a JSON summary at the end.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

TASKS = ("reach-cube",)
EXPERT_RATE_HZ = 100.0


def config_dir() -> Path:
    """config/ of the source tree (editable install) or of the installed ROS package share."""
    source = Path(__file__).resolve().parents[2] / "config"
    if source.is_dir():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("openvla_ros")) / "config"
    except Exception:  # no ament index here (pip install without the source tree)
        raise ValueError(f"cannot find the openvla_ros config directory (looked in {source})") from None


def make_expert_node(context, sim_node, base_frame: str):
    """A node publishing the scripted expert's twist (delta / control period) from sim_node's state."""
    import rclpy
    from geometry_msgs.msg import TwistStamped

    from ..sim.expert import ReachExpert

    expert = ReachExpert()
    node = rclpy.create_node("scripted_expert", context=context)
    pub = node.create_publisher(TwistStamped, "/vla/eef_delta", 10)

    def tick():
        snap = sim_node.snapshot()
        if snap is None:
            return
        action = expert.action(snap.tip_position, snap.cube_positions[snap.target])
        msg = TwistStamped()
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = base_frame
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) / expert.control_period_s for v in action[:3])
        pub.publish(msg)

    node.create_timer(1.0 / EXPERT_RATE_HZ, tick)
    return node


def run_sim(*, task: str = "reach-cube", seconds: float = 20.0, checkpoint=None, seed: int | None = None,
            progress=print) -> dict:
    from .bringup import Bringup
    from .ros_common import SpinningNode

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {list(TASKS)}")
    if not seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {seconds}")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint directory {checkpoint} does not exist")
    nodes = ["sim_node", "ik_node"] + (["vla_node"] if checkpoint else [])
    overrides = {"sim_node": {"seed": seed} if seed is not None else {}}
    if checkpoint:
        overrides["vla_node"] = {"checkpoint": str(checkpoint)}
    bringup = Bringup.from_file(config_dir() / "sim_bringup.yaml", overrides=overrides, nodes=nodes)
    expert_spinner = None
    with bringup:
        sim = bringup["sim_node"]
        ik = bringup["ik_node"]
        if not checkpoint:
            expert = make_expert_node(bringup.context, sim, ik.controller.kinematics.base_frame)
            expert_spinner = SpinningNode(expert, bringup.context)
        driver = "vla_node" if checkpoint else "scripted expert"
        progress(f"[sim] {task}: '{sim.sim.episode.instruction}', driven by the {driver}, {seconds:.0f} s")
        start = time.monotonic()
        snap = None
        success_at = None
        while time.monotonic() - start < seconds:
            time.sleep(1.0)
            snap = sim.snapshot()
            if snap is None:
                continue
            if snap.success and success_at is None:
                success_at = snap.episode_time
            progress(f"[sim] t={snap.episode_time:5.1f}s distance to the {snap.target} cube "
                     f"{100 * snap.distance_to_target:5.1f} cm{'  reached' if snap.success else ''}")
        if expert_spinner is not None:
            expert_spinner.stop()
        summary = {"task": task, "driver": driver, "seconds": seconds,
                   "instruction": sim.sim.episode.instruction, "seed": sim.sim.episode.seed,
                   "reached": success_at is not None, "reached_at_s": success_at,
                   "final_distance_m": None if snap is None else float(snap.distance_to_target),
                   "ik_ok_steps": int(ik.controller.counters["ik_ok"]),
                   "joint_commands_applied": int(sim.sim.counters["joint_commands"])}
    return summary


def cmd_sim(args) -> int:
    summary = run_sim(task=args.task, seconds=args.seconds, checkpoint=args.checkpoint, seed=args.seed)
    print(json.dumps(summary))
    return 0


def record_demos(*, task: str = "reach-cube", episodes: int, out, seed: int = 0, storage: str = "sqlite3",
                 noise_m: float = 0.0, random_start: float = 0.0, settle_s: float = 0.0, workers: int = 1,
                 progress: bool = True) -> dict:
    """One rosbag2 per scripted-expert episode (camera, instruction, joint states, tip pose, the
    expert's TwistStamped, gripper) under `out`, as `openvla-ros train` and `eval bag` read them.

    `noise_m` (DART noise on the executed actions), `random_start` (share of episodes starting at a
    random tip position), `settle_s` (recording after the cube is reached) and `workers` (parallel
    processes) as in the demo's record step; episodes
    already recorded under `out` with the same settings are kept."""
    from tqdm import tqdm

    from ..demo import record_episodes, recording_options, settle_periods_for
    from ..vla.constants import DEFAULT_CONTROL_PERIOD_S
    from ..sim.rollout import DEFAULT_EPISODE_SECONDS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {list(TASKS)}")
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if not (math.isfinite(noise_m) and noise_m >= 0):
        raise ValueError(f"--noise must be a number >= 0 (m), got {noise_m!r}")
    settle_periods_for(settle_s, DEFAULT_CONTROL_PERIOD_S)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = recording_options(storage=storage, max_seconds=DEFAULT_EPISODE_SECONDS, noise_m=noise_m,
                                random_start_probability=random_start, settle_s=settle_s)
    with tqdm(total=episodes, desc="record-demos", unit="episode", disable=not progress) as bar:
        outcomes = record_episodes([(out / f"episode_{i:04d}", seed + i, None) for i in range(episodes)], options,
                                   workers=workers, bar=bar)
    return {"episodes": episodes, "out": str(out), "storage": storage, "outcomes": outcomes}


def cmd_record_demos(args) -> int:
    summary = record_demos(task=args.task, episodes=args.episodes, out=args.out, seed=args.seed, storage=args.storage,
                           noise_m=args.noise, random_start=args.random_start, settle_s=args.settle,
                           workers=args.workers)
    print(json.dumps({k: v for k, v in summary.items() if k != "outcomes"}))
    return 0


def add_sim_parser(subparsers):
    p = subparsers.add_parser("sim", help="the simulated Panda cell in one process (model or scripted expert); "
                                          "`sim record-demos` records expert demonstrations")
    actions = p.add_subparsers(dest="sim_action", required=False)
    r = actions.add_parser("record-demos", help="one rosbag2 per scripted-expert episode")
    r.add_argument("--task", default="reach-cube", choices=TASKS)
    r.add_argument("--episodes", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0, help="seed of the first episode (then seed+1, ...)")
    r.add_argument("--storage", default="sqlite3", choices=["sqlite3", "mcap"])
    r.add_argument("--noise", type=float, default=0.0, metavar="M",
                   help="std of Gaussian noise on the executed actions, m per action (DART); the bags keep the clean labels")
    r.add_argument("--random-start", type=float, default=0.0, metavar="P",
                   help="share of episodes starting with the tip at a random point of the workspace")
    r.add_argument("--settle", type=float, default=0.0, metavar="S",
                   help="seconds recorded after the cube is reached, the expert settling at the goal")
    r.add_argument("--workers", type=int, default=1, help="recording processes (one per core)")
    r.set_defaults(func=cmd_record_demos)
    p.add_argument("--task", default="reach-cube", choices=TASKS)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--checkpoint", default=None, help="drive with vla_node on this checkpoint (default: the scripted expert)")
    p.add_argument("--seed", type=int, default=None, help="episode seed (cube positions, target)")
    p.set_defaults(func=cmd_sim)
    return p
