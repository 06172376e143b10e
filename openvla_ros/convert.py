"""`openvla-ros convert`: demonstrations between formats.

- bags -> LeRobotDataset v3.0: each bag is an episode; its frames are read as `train` reads them
  (camera, instruction, action topic matched by stamp) at the camera's own resolution, and written
  at ``fps = 1 / dt`` with the action's dim names as the feature's names.
- LeRobot (v3.0/v2.1) or RLDS -> bags: one bag per episode, to replay a dataset through the ROS
  graph (`eval replay`) or evaluate on it (`eval bag`): ``/camera/image_raw`` (rgb8 Image),
  ``/vla/instruction`` (String, each time it changes) and the action as a JointTrajectory on
  ``/dataset/action`` whose joint_names are the action's dim names (read back as truth with
  ``--truth-topic /dataset/action``), one frame every dt.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("lerobot", "bags")
CAMERA_TOPIC = "/camera/image_raw"
INSTRUCTION_TOPIC = "/vla/instruction"
ACTION_TOPIC = "/dataset/action"
LEROBOT_CAMERA = "observation.images.main"


@dataclass
class SourceEpisode:
    """An episode in its own resolution, as read from any source."""

    name: str
    images: list[np.ndarray]  # HxWx3 uint8 RGB
    actions: np.ndarray  # (N, D)
    instructions: list[str]
    dim_names: list[str]
    dt: float


def _even(image: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sizes: an odd last row/column is dropped."""
    h, w = image.shape[:2]
    return image[: h - h % 2, : w - w % 2]


def read_source_episodes(paths: Sequence[str | Path], options) -> Iterator[SourceEpisode]:
    """Episodes of bags, HDF5 files, LeRobot or RLDS datasets at full resolution (`options`:
    `training.data.EpisodeReadOptions`), one at a time."""
    from .training.data import EpisodeError, find_episode_sources

    for source in find_episode_sources(paths, options):
        if source.kind == "bag":
            yield _bag_episode(source.path, options)
        elif source.kind == "lerobot":
            from .data.lerobot import LeRobotDataset

            ds = LeRobotDataset(source.path)
            key = options.action_key or "action"
            frames = ds.frames(source.episode, options.camera, action_key=key, state_key=None)
            dt = ds.dt if options.dt is None else float(options.dt)
            yield SourceEpisode(f"{source.path.name}_ep{source.episode:06d}", list(frames.images), frames.actions,
                                frames.instructions, list(options.action_dim_names or ds.names(key)), dt)
        elif source.kind == "rlds":
            from .data.rlds import RldsDataset, load_key_mapping
            from .vla.action_tokens import default_dim_names

            mapping = load_key_mapping(options.rlds_config, source.path) if options.rlds_config else None
            ds = RldsDataset(source.path, mapping, camera=options.camera)
            steps = ds.episode(source.episode)
            names = options.action_dim_names or ds.mapping.action_dim_names or \
                default_dim_names(steps.actions.shape[1], None)
            dt = options.control_period_s if options.dt is not None or ds.mapping.dt is None else float(ds.mapping.dt)
            yield SourceEpisode(f"{source.path.name}_ep{source.episode:06d}", list(steps.images), steps.actions,
                                steps.instructions, list(names), dt)
        else:
            raise EpisodeError(f"{source.path}: converting {source.kind} episodes is not supported "
                               f"(bags, LeRobot and RLDS are)")


def _bag_episode(path: Path, options) -> SourceEpisode:
    from .eval.bags import BagReadOptions, read_frames
    from .training.data import EpisodeError

    if not options.action_topic:
        raise EpisodeError(f"bag {str(path)!r}: converting needs an action topic (--action-topic)")
    frames = read_frames(path, BagReadOptions(
        image_topic=options.image_topic, instruction=options.instruction, instruction_topic=options.instruction_topic,
        truth_topic=options.action_topic, gripper_topic=options.gripper_topic, dt=options.control_period_s,
        sync=options.sync, tolerance=options.tolerance, typestore=options.typestore, stride=options.stride,
        truth_dim_names=options.action_dim_names, truth_fields=options.action_fields))
    if not frames.frames:
        raise EpisodeError(f"bag {str(path)!r} has no frames with an action (sync report: {frames.report.as_dict()})")
    return SourceEpisode(path.name if path.is_dir() else path.stem, [f.image for f in frames.frames],
                         frames.truths(), [f.instruction for f in frames.frames], list(frames.dim_names),
                         options.control_period_s)


def to_lerobot(paths: Sequence[str | Path], out: str | Path, options, *, robot_type: str = "unknown") -> dict:
    """Write the episodes of `paths` as one LeRobotDataset v3.0 at `out`."""
    from .data.lerobot import EpisodeToWrite, write_lerobot_dataset

    meta: dict = {}
    sizes: set = set()

    def episodes():
        for ep in read_source_episodes(paths, options):
            if "dim_names" in meta and (ep.dim_names != meta["dim_names"] or abs(ep.dt - meta["dt"]) > 1e-9):
                raise ValueError(f"episode {ep.name!r} has dims {ep.dim_names} at dt {ep.dt}, the first had "
                                 f"{meta['dim_names']} at dt {meta['dt']}: one dataset needs one layout")
            meta.setdefault("dim_names", ep.dim_names)
            meta.setdefault("dt", ep.dt)
            images = [_even(img) for img in ep.images]
            sizes.update(img.shape for img in images)
            meta["episodes"] = meta.get("episodes", 0) + 1
            meta["frames"] = meta.get("frames", 0) + len(images)
            yield EpisodeToWrite(images=images, actions=ep.actions, task=ep.instructions)

    gen = episodes()
    first = next(gen, None)
    if first is None:
        raise ValueError("no episodes to convert")

    def chained():
        yield first
        yield from gen

    image_size = tuple(first.images[0].shape[:2])
    write_lerobot_dataset(out, chained(), fps=1.0 / meta["dt"], camera=LEROBOT_CAMERA,
                          action_names=meta["dim_names"], robot_type=robot_type, image_size=image_size)
    return {"format": "lerobot", "out": str(out), "episodes": meta["episodes"], "frames": meta["frames"],
            "fps": 1.0 / meta["dt"], "dim_names": meta["dim_names"], "image_size": list(image_size)}


def to_bags(paths: Sequence[str | Path], out: str | Path, options, *, storage: str = "mcap",
            start_time: float = 1.0) -> dict:
    """Write one bag per episode of `paths` under `out` (see the module docstring for the topics)."""
    from .eval.bag_writer import BagWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    frames = 0
    for ep in read_source_episodes(paths, options):
        path = out / ep.name
        if path.exists():
            raise ValueError(f"{path} exists already")
        with BagWriter(path, storage) as w:
            current = None
            for i, (image, action, text) in enumerate(zip(ep.images, ep.actions, ep.instructions)):
                t = start_time + i * ep.dt
                if text != current:  # the instruction is latched: written when it changes, just before its frame
                    w.write_string(INSTRUCTION_TOPIC, max(0.0, t - 1e-3), text)
                    current = text
                w.write_image(CAMERA_TOPIC, t, np.ascontiguousarray(image))
                w.write_joint_trajectory(ACTION_TOPIC, t, ep.dim_names, np.asarray(action)[None, :], ep.dt)
        written.append(str(path))
        frames += len(ep.images)
    if not written:
        raise ValueError("no episodes to convert")
    return {"format": "bags", "out": str(out), "bags": written, "frames": frames, "action_topic": ACTION_TOPIC}


def add_convert_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="bags, HDF5 files, LeRobot or RLDS dataset roots, or folders of them")
    p.add_argument("--to", required=True, choices=FORMATS, help="lerobot: one LeRobotDataset v3.0; bags: one bag per episode")
    p.add_argument("--out", required=True, help="output: the dataset root (lerobot) or a folder for the bags")
    p.add_argument("--image-topic")
    p.add_argument("--instruction", help="fixed instruction for every frame")
    p.add_argument("--instruction-topic")
    p.add_argument("--action-topic", help="bags: the action (command or pose) topic, as for train")
    p.add_argument("--action-fields", default=None, help="bags, custom action type: comma-separated fields")
    p.add_argument("--gripper-topic")
    p.add_argument("--dt", type=float, default=None,
                   help="seconds per action (bags: default 0.2, LeRobot: 1/fps, RLDS: the key mapping's or 0.2)")
    p.add_argument("--sync", default="nearest", choices=("nearest", "previous", "interpolate"))
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--typestore", default=None)
    p.add_argument("--camera", help="LeRobot camera feature / RLDS image key / HDF5 camera")
    p.add_argument("--action-key", default=None, help="LeRobot: the action feature (default 'action')")
    p.add_argument("--rlds-config", default=None, metavar="YAML", help="RLDS key mapping (as for train)")
    p.add_argument("--action-dims", default=None, help="comma-separated action dim names")
    p.add_argument("--robot-type", default="unknown", help="lerobot: info.json robot_type")
    p.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"), help="bags: storage")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args) -> int:
    import json

    from .training.data import EpisodeReadOptions

    options = EpisodeReadOptions(
        image_topic=args.image_topic, instruction=args.instruction, instruction_topic=args.instruction_topic,
        action_topic=args.action_topic, gripper_topic=args.gripper_topic, dt=args.dt, sync=args.sync,
        tolerance=args.tolerance, stride=args.stride, typestore=args.typestore, camera=args.camera,
        action_dim_names=args.action_dims.split(",") if args.action_dims else None,
        action_key=args.action_key, rlds_config=args.rlds_config,
        action_fields=args.action_fields.split(",") if args.action_fields else None)
    if args.to == "lerobot":
        result = to_lerobot(args.sources, args.out, options, robot_type=args.robot_type)
    else:
        result = to_bags(args.sources, args.out, options, storage=args.storage)
    print(json.dumps(result))
    return 0
