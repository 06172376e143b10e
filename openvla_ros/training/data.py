"""Training episodes from demonstrations: bags, ACT/DexVLA-style HDF5, LeRobot and RLDS datasets, cached as shards.

One bag (rosbag2 or ROS 1) or one HDF5 file is one episode; a LeRobot or RLDS dataset gives one
episode per dataset episode (`find_episode_sources`), read through `openvla_ros.data`. Bags are
read with `eval.bags` (the same topic options as `eval bag`): the camera topic, the instruction (fixed or from a String topic) and the action from a
command topic (TwistStamped x dt, Float64MultiArray, JointTrajectory first point) or from
end-effector poses (PoseStamped deltas over dt). HDF5 files hold `observations/images/<camera>`
(N x H x W x 3 uint8, or ACT's padded JPEG buffers when the file's `compress` attribute is set),
`action` (N x D) and `language_raw`.

`cache_dataset` decodes every episode once and writes a shard per episode (images resized to the
model's 224 px exactly as the engine resizes them, actions, stamps, instructions) so that epochs
read memory-mapped arrays instead of re-decoding bags; an unchanged source is not decoded again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..vla.action_tokens import default_dim_names
from ..vla.constants import DEFAULT_CONTROL_PERIOD_S, IMAGE_SIZE
from ..vla.preprocess import prepare_image

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
BAG_SUFFIXES = (".db3", ".mcap", ".bag")  # .bag: ROS 1
SHARD_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


class EpisodeError(ValueError):
    """An episode that cannot be trained on; the message names the episode and the problem."""


@dataclass
class EpisodeReadOptions:
    """How to turn a recording into (image, instruction, action) steps (the `train` data flags)."""

    image_topic: str | None = None  # bags: None = the bag's only camera topic
    instruction: str | None = None  # fixed instruction (wins over topic / language_raw)
    instruction_topic: str | None = None  # bags: None = the bag's only String topic
    action_topic: str | None = None  # bags: required; its type (from the bag) decides the conversion
    gripper_topic: str | None = None  # bags: appends a gripper dimension
    dt: float | None = None  # seconds each action covers; None = DEFAULT_CONTROL_PERIOD_S
    sync: str = "nearest"
    tolerance: float = 0.05
    stride: int = 1
    typestore: str | None = None
    camera: str | None = None  # HDF5: None = the file's only camera
    action_dim_names: Sequence[str] | None = None  # HDF5 / Float64MultiArray dims
    # HDF5 JPEG buffers: "rgb" for standard JPEGs (decoded as a viewer shows them), "bgr" for files
    # whose writer passed RGB arrays to cv2.imencode (ACT's recorder), so the file holds them swapped.
    jpeg_channels: str = "rgb"
    action_key: str | None = None  # LeRobot: the action feature (default "action")
    rlds_config: str | None = None  # RLDS: key-mapping YAML file or a name of a shipped mapping
    action_fields: Sequence[str] | None = None  # bags: fields of a custom action message type (default: all numbers)

    @property
    def control_period_s(self) -> float:
        return DEFAULT_CONTROL_PERIOD_S if self.dt is None else float(self.dt)

    def key(self) -> dict:
        """JSON-able identity (part of the cache key)."""
        out = asdict(self)
        out["action_dim_names"] = None if self.action_dim_names is None else list(self.action_dim_names)
        out["action_fields"] = None if self.action_fields is None else list(self.action_fields)
        for added, default in (("action_fields", None), ("action_key", None), ("rlds_config", None)):
            if out[added] == default:
                del out[added]  # keeps the cache keys of episodes read before the option existed
        return out


@dataclass
class Episode:
    """One demonstration: N steps of image, instruction and action (dataset units)."""

    name: str
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    actions: np.ndarray  # (N, D) float64
    instructions: list[str]
    stamps: np.ndarray  # (N,) seconds
    dim_names: list[str]
    dt: float
    source: str = ""

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def validate_episode(ep: Episode) -> Episode:
    """Reject empty, inconsistent or non-finite episodes with an EpisodeError naming the episode."""
    where = f"episode {ep.name!r}" + (f" ({ep.source})" if ep.source and ep.source != ep.name else "")
    images, actions = np.asarray(ep.images), np.asarray(ep.actions)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise EpisodeError(f"{where} has no frames (actions of shape {actions.shape})")
    n = actions.shape[0]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise EpisodeError(f"{where}: images must be N x H x W x 3 uint8, got {images.shape} {images.dtype}")
    lengths = {"images": images.shape[0], "actions": n, "instructions": len(ep.instructions),
               "stamps": np.asarray(ep.stamps).shape[0]}
    if len(set(lengths.values())) != 1:
        raise EpisodeError(f"{where} has mismatched lengths {lengths}")
    bad = np.argwhere(~np.isfinite(actions))
    if bad.size:
        step, dim = (int(v) for v in bad[0])
        raise EpisodeError(f"{where} has {len(bad)} non-finite action values (first at step {step}, dim {dim}: "
                           f"{actions[step, dim]})")
    if len(ep.dim_names) != actions.shape[1]:
        raise EpisodeError(f"{where}: {len(ep.dim_names)} dim names {ep.dim_names} for {actions.shape[1]}-D actions")
    stamps = np.asarray(ep.stamps, dtype=np.float64)
    if not np.all(np.isfinite(stamps)) or np.any(np.diff(stamps) < 0):
        raise EpisodeError(f"{where}: stamps must be finite and non-decreasing")
    empty = [i for i, text in enumerate(ep.instructions) if not str(text).strip()]
    if empty:
        raise EpisodeError(f"{where} has an empty instruction at step {empty[0]}")
    if not (np.isfinite(ep.dt) and ep.dt > 0):
        raise EpisodeError(f"{where}: dt must be a positive number of seconds, got {ep.dt}")
    return ep


def resize_images(images: Iterable[np.ndarray], size: int = IMAGE_SIZE) -> np.ndarray:
    """Images resized exactly as the engine resizes camera images (resize-naive, bicubic)."""
    return np.stack([np.asarray(prepare_image(img, size=size)) for img in images])


# --- sources ------------------------------------------------------------------------------------


def source_kind(path: Path) -> str:
    """'bag', 'hdf5', 'lerobot' or 'rlds' for one source path, or EpisodeError."""
    from ..data.lerobot import is_lerobot_dataset
    from ..data.rlds import is_rlds_dataset

    if is_lerobot_dataset(path):
        return "lerobot"
    if is_rlds_dataset(path):
        return "rlds"
    if path.is_dir() and (path / "metadata.yaml").exists():
        return "bag"
    if path.is_file() and path.suffix.lower() in BAG_SUFFIXES:
        return "bag"
    if path.is_file() and path.suffix.lower() in HDF5_SUFFIXES:
        return "hdf5"
    raise EpisodeError(f"{str(path)!r} is neither a rosbag2 bag (directory with metadata.yaml, .db3, .mcap), a ROS 1 "
                       f".bag, an HDF5 episode ({', '.join(HDF5_SUFFIXES)}), a LeRobot dataset (meta/info.json) nor "
                       f"an RLDS dataset (features.json + tfrecord files)")


@dataclass(frozen=True)
class EpisodeSource:
    """One episode: a file or bag (episode None), or one episode of a multi-episode dataset."""

    path: Path
    kind: str
    episode: int | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.episode is None else f"{self.path}#episode={self.episode}"


def find_episode_sources(paths: Sequence[str | Path], options: EpisodeReadOptions | None = None) -> list[EpisodeSource]:
    """Every episode the data paths hold: a LeRobot or RLDS dataset gives one source per episode."""
    out: list[EpisodeSource] = []
    for path in find_episode_paths(paths):
        kind = source_kind(path)
        if kind == "lerobot":
            from ..data.lerobot import LeRobotDataset, LeRobotError

            try:
                indices = [e.index for e in LeRobotDataset(path).episodes]
            except LeRobotError as exc:
                raise EpisodeError(str(exc)) from None
        elif kind == "rlds":
            from ..data.rlds import RldsDataset, RldsError, load_key_mapping

            try:
                mapping = load_key_mapping(options.rlds_config, path) if options and options.rlds_config else None
                indices = list(range(RldsDataset(path, mapping, camera=options.camera if options else None).num_episodes))
            except RldsError as exc:
                raise EpisodeError(str(exc)) from None
        else:
            out.append(EpisodeSource(path, kind))
            continue
        if not indices:
            raise EpisodeError(f"{kind} dataset {str(path)!r} has no episodes")
        out.extend(EpisodeSource(path, kind, i) for i in indices)
    return out


def find_episode_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Episode paths: each argument is an episode, or a folder whose entries are episodes (sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EpisodeError(f"data path {str(path)!r} does not exist")
        try:
            source_kind(path)
            found.append(path)
            continue
        except EpisodeError:
            if not path.is_dir():
                raise
        children = []
        for child in sorted(path.iterdir()):
            try:
                source_kind(child)
            except EpisodeError:
                continue
            children.append(child)
        if not children:
            raise EpisodeError(f"folder {str(path)!r} holds no bags, HDF5 episodes or datasets")
        found.extend(children)
    if not found:
        raise EpisodeError("no data paths given")
    return found


def read_bag_episode(path: Path, options: EpisodeReadOptions, image_size: int = IMAGE_SIZE) -> Episode:
    """One bag as an episode (frames without an action or instruction are dropped, as `eval bag` does)."""
    from ..eval.bags import BagReadOptions, read_frames

    if not options.action_topic:
        raise EpisodeError(f"bag {str(path)!r}: training needs an action topic (the commands or poses to imitate)")
    frames = read_frames(path, BagReadOptions(
        image_topic=options.image_topic, instruction=options.instruction,
        instruction_topic=options.instruction_topic, truth_topic=options.action_topic,
        gripper_topic=options.gripper_topic, dt=options.control_period_s, sync=options.sync,
        tolerance=options.tolerance, typestore=options.typestore, stride=options.stride,
        truth_dim_names=options.action_dim_names, truth_fields=options.action_fields))
    if not frames.frames:
        raise EpisodeError(f"episode {path.name!r} ({path}) has no frames with an action "
                           f"(sync report: {frames.report.as_dict()})")
    return Episode(
        name=path.name, images=resize_images((f.image for f in frames.frames), image_size),
        actions=np.stack([f.truth for f in frames.frames]).astype(np.float64),
        instructions=[f.instruction for f in frames.frames],
        stamps=np.array([f.stamp for f in frames.frames], dtype=np.float64),
        dim_names=list(frames.dim_names), dt=options.control_period_s, source=str(path))


def _decode_language(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    return str(value)


def _hdf5_images(dataset, compressed: bool, where: str, stored: str = "rgb") -> list[np.ndarray]:
    data = dataset[()]
    if compressed or data.ndim == 2:  # ACT's compressed layout: one zero-padded JPEG buffer per frame
        from ..data.images import decode_image_bytes

        images = []
        for i, buffer in enumerate(data):
            try:  # trailing zero padding after the JPEG's end marker is ignored by the decoder
                images.append(decode_image_bytes(np.asarray(buffer, dtype=np.uint8), stored, f"{where}: frame {i}"))
            except ValueError as exc:
                raise EpisodeError(str(exc)) from None
        return images
    if data.ndim != 4 or data.shape[3] != 3:
        raise EpisodeError(f"{where}: expected N x H x W x 3 images, got shape {data.shape}")
    return [np.asarray(img, dtype=np.uint8) for img in data]


def read_hdf5_episode(path: Path, options: EpisodeReadOptions, image_size: int = IMAGE_SIZE) -> Episode:
    """One ACT/DexVLA-style HDF5 file as an episode (steps are dt apart)."""
    import h5py

    where = f"episode {path.name!r} ({path})"
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise EpisodeError(f"{where} is not a readable HDF5 file: {exc}") from None
    with handle as f:
        if "observations/images" not in f:
            raise EpisodeError(f"{where} has no observations/images group (keys: {sorted(f.keys())})")
        cameras = sorted(f["observations/images"].keys())
        camera = options.camera
        if camera is None:
            if len(cameras) != 1:
                raise EpisodeError(f"{where} has cameras {cameras}; choose one with the camera option")
            camera = cameras[0]
        if camera not in cameras:
            raise EpisodeError(f"{where} has no camera {camera!r}; it has {cameras}")
        if "action" not in f:
            raise EpisodeError(f"{where} has no 'action' dataset (keys: {sorted(f.keys())})")
        actions = np.asarray(f["action"][()], dtype=np.float64)
        if actions.ndim == 1:
            actions = actions[:, None]
        images = _hdf5_images(f[f"observations/images/{camera}"], bool(f.attrs.get("compress", False)), where,
                              options.jpeg_channels)
        instruction = options.instruction
        if instruction is None:
            if "language_raw" not in f:
                raise EpisodeError(f"{where} has no 'language_raw'; pass a fixed instruction")
            instruction = _decode_language(f["language_raw"][()])
    if len(images) != actions.shape[0]:
        raise EpisodeError(f"{where} has mismatched lengths: {len(images)} images, {actions.shape[0]} actions")
    if actions.shape[0] == 0:
        raise EpisodeError(f"{where} has no frames")
    n, dt = actions.shape[0], options.control_period_s
    try:
        names = default_dim_names(actions.shape[1], options.action_dim_names)
    except ValueError as exc:
        raise EpisodeError(f"{where}: {exc}") from None
    return Episode(name=path.stem, images=resize_images(images, image_size), actions=actions,
                   instructions=[instruction] * n, stamps=np.arange(n) * dt, dim_names=names, dt=dt,
                   source=str(path))


def read_lerobot_episode(path: Path, episode: int, options: EpisodeReadOptions, image_size: int = IMAGE_SIZE) -> Episode:
    """Episode `episode` of a LeRobot dataset: its camera's frames, `action_key` actions, task strings."""
    from ..data.lerobot import LeRobotDataset, LeRobotError

    try:
        ds = LeRobotDataset(path)
        frames = ds.frames(episode, options.camera, action_key=options.action_key or "action", state_key=None)
        names = ds.names(options.action_key or "action")
        images = resize_images(frames.images, image_size)
    except LeRobotError as exc:
        raise EpisodeError(str(exc)) from None
    n = frames.actions.shape[0]
    if options.action_dim_names is not None:
        names = list(options.action_dim_names)
    instructions = [options.instruction] * n if options.instruction is not None else frames.instructions
    dt = ds.dt if options.dt is None else float(options.dt)  # the dataset's fps unless told otherwise
    return Episode(name=f"{path.name}_ep{episode:06d}", images=images, actions=frames.actions,
                   instructions=instructions, stamps=frames.timestamps - frames.timestamps[0], dim_names=list(names),
                   dt=dt, source=f"{path}#episode={episode}")


def read_rlds_episode(path: Path, episode: int, options: EpisodeReadOptions, image_size: int = IMAGE_SIZE) -> Episode:
    """Episode `episode` of an RLDS dataset (its key mapping from `options.rlds_config`)."""
    from ..data.rlds import RldsDataset, RldsError, load_key_mapping

    try:
        ds = RldsDataset(path, load_key_mapping(options.rlds_config, path) if options.rlds_config else None,
                         camera=options.camera)
        steps = ds.episode(episode)
        images = resize_images(steps.images, image_size)
    except RldsError as exc:
        raise EpisodeError(str(exc)) from None
    n = steps.actions.shape[0]
    names = list(options.action_dim_names) if options.action_dim_names is not None else \
        default_dim_names(steps.actions.shape[1], None)
    dt = options.control_period_s if options.dt is not None or ds.mapping.dt is None else float(ds.mapping.dt)
    instructions = [options.instruction] * n if options.instruction is not None else steps.instructions
    return Episode(name=f"{path.name}_ep{episode:06d}", images=images, actions=steps.actions,
                   instructions=instructions, stamps=np.arange(n) * dt, dim_names=names, dt=dt,
                   source=f"{path}#episode={episode}")


def read_episode(path: str | Path, options: EpisodeReadOptions, image_size: int = IMAGE_SIZE,
                 episode: int | None = None) -> Episode:
    path = Path(path)
    kind = source_kind(path)
    if kind in ("lerobot", "rlds"):
        if episode is None:
            raise EpisodeError(f"{kind} dataset {str(path)!r} holds many episodes: say which one")
        reader = read_lerobot_episode if kind == "lerobot" else read_rlds_episode
        return validate_episode(reader(path, episode, options, image_size))
    reader = read_bag_episode if kind == "bag" else read_hdf5_episode
    return validate_episode(reader(path, options, image_size))


# --- cache --------------------------------------------------------------------------------------


@dataclass
class CachedEpisode:
    """A shard on disk: memory-mapped images and in-memory actions/stamps/instructions."""

    name: str
    directory: Path
    images: np.ndarray
    actions: np.ndarray
    stamps: np.ndarray
    instructions: list[str]
    dim_names: list[str]
    dt: float
    source: str

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @classmethod
    def load(cls, directory: Path) -> "CachedEpisode":
        meta = json.loads((directory / "meta.json").read_text())
        return cls(name=meta["name"], directory=directory, images=np.load(directory / "images.npy", mmap_mode="r"),
                   actions=np.load(directory / "actions.npy"), stamps=np.load(directory / "stamps.npy"),
                   instructions=list(meta["instructions"]), dim_names=list(meta["dim_names"]),
                   dt=float(meta["dt"]), source=meta["source"])


def write_shard(ep: Episode, directory: Path) -> CachedEpisode:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "images.npy", np.ascontiguousarray(ep.images, dtype=np.uint8))
    np.save(directory / "actions.npy", np.asarray(ep.actions, dtype=np.float64))
    np.save(directory / "stamps.npy", np.asarray(ep.stamps, dtype=np.float64))
    (directory / "meta.json").write_text(json.dumps({
        "name": ep.name, "instructions": list(ep.instructions), "dim_names": list(ep.dim_names),
        "dt": float(ep.dt), "source": ep.source, "format": SHARD_FORMAT_VERSION}, indent=1) + "\n")
    return CachedEpisode.load(directory)


def _source_fingerprint(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(path: Path, options: EpisodeReadOptions, image_size: int, episode: int | None = None,
              fingerprint: list | None = None) -> str:
    identity = {"path": str(path.resolve()), "files": fingerprint if fingerprint is not None else _source_fingerprint(path),
                "options": options.key(), "image_size": image_size, "format": SHARD_FORMAT_VERSION}
    if episode is not None:
        identity["episode"] = int(episode)
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class CachedDataset:
    """All episodes of one dataset (one statistics key), as shards."""

    name: str
    episodes: list[CachedEpisode]
    dim_names: list[str] = field(default_factory=list)
    dt: float = DEFAULT_CONTROL_PERIOD_S

    @property
    def num_transitions(self) -> int:
        return sum(len(e) for e in self.episodes)

    def actions(self) -> np.ndarray:
        return np.concatenate([e.actions for e in self.episodes], axis=0)


def cache_dataset(name: str, paths: Sequence[str | Path], options: EpisodeReadOptions, cache_dir: str | Path,
                  *, image_size: int = IMAGE_SIZE, progress: bool = False) -> CachedDataset:
    """Decode every episode of `paths` once into `cache_dir/name/`; unchanged sources are reused."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"dataset name must be a plain non-empty name, got {name!r}")
    root = Path(cache_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    sources = find_episode_sources(paths, options)
    iterator = sources
    if progress:
        from tqdm import tqdm

        iterator = tqdm(sources, desc=f"caching {name}", unit="episode")
    episodes: list[CachedEpisode] = []
    fingerprints: dict[Path, list] = {}  # a multi-episode dataset's files are listed once, not per episode
    for index, source in enumerate(iterator):
        path = source.path
        if path not in fingerprints:
            fingerprints[path] = _source_fingerprint(path)
        key = cache_key(path, options, image_size, source.episode, fingerprints[path])
        directory = root / f"{index:05d}-{key}"
        entry = str(path.resolve()) + ("" if source.episode is None else f"#episode={source.episode}")
        if manifest.get(entry) == key and (directory / "meta.json").exists():
            episodes.append(CachedEpisode.load(directory))
            continue
        if source.episode is None:
            episode = read_episode(path, options, image_size)
        else:
            episode = read_episode(path, options, image_size, episode=source.episode)
        episodes.append(write_shard(episode, directory))
        manifest[entry] = key
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    names = {tuple(e.dim_names) for e in episodes}
    if len(names) != 1:
        raise EpisodeError(f"dataset {name!r} mixes action layouts {sorted(names)}; one dataset needs one layout")
    dts = {e.dt for e in episodes}
    if len(dts) != 1:
        raise EpisodeError(f"dataset {name!r} mixes control periods {sorted(dts)}")
    return CachedDataset(name=name, episodes=episodes, dim_names=list(names.pop()), dt=dts.pop())


def split_episodes(n_episodes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) episode indices: a seeded shuffle; val gets round(fraction * n), >= 1 when the
    fraction is > 0 and there are >= 2 episodes; train always keeps at least one."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_episodes < 1:
        raise ValueError(f"need at least one episode, got {n_episodes}")
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_val = int(round(val_fraction * n_episodes))
    if val_fraction > 0 and n_episodes >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n_episodes - 1)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def chunk_indices(stamps: np.ndarray, dt: float, chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each step, the steps whose actions follow it at 0, dt, 2dt, ... (K of them) and a mask.

    The step nearest each target time (strictly within dt/2) is used; targets past the episode's end (or with
    no step close enough) are padded with the last step and masked out.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    n = stamps.shape[0]
    targets = stamps[:, None] + np.arange(chunk_len)[None, :] * dt
    right = np.clip(np.searchsorted(stamps, targets), 0, n - 1)
    left = np.clip(right - 1, 0, n - 1)
    nearest = np.where(np.abs(stamps[left] - targets) <= np.abs(stamps[right] - targets), left, right)
    # Strictly closer than half a period (with a margin for float noise in the stamps): a target
    # half-way past the last step is not covered by any recorded action.
    valid = np.abs(stamps[nearest] - targets) < dt / 2 * (1 - 1e-6)
    valid[:, 0] = True  # the step itself
    # Once a target is missing, the rest of the chunk is past the end too.
    valid = np.cumprod(valid, axis=1).astype(bool)
    index = np.where(valid, nearest, n - 1)
    return index.astype(np.int64), valid
