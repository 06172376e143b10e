"""LeRobotDataset reading and writing (format v3.0, and v2.1 for reading), with pyarrow and PyAV.

v3.0 layout (many episodes per file)::

    meta/info.json                                fps, features, path templates, codebase_version
    meta/stats.json                               per feature: mean, std, min, max (q01/q99 when present)
    meta/tasks.parquet                            task strings (pandas index or a "task" column), task_index
    meta/episodes/chunk-*/file-*.parquet          per episode: episode_index, length, tasks, data/chunk_index,
                                                  data/file_index, dataset_from_index, dataset_to_index,
                                                  videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
    data/chunk-*/file-*.parquet                   one row per frame: features by name, timestamp, frame_index,
                                                  episode_index, index, task_index
    videos/<key>/chunk-*/file-*.mp4               the frames of a camera, episodes one after the other

v2.1 keeps one parquet and one mp4 per episode and its episode/task tables in ``meta/*.jsonl``.

`LeRobotDataset.frames` streams one episode: the parquet rows of that episode only, and the video
decoded frame by frame from the episode's start (so memory holds one frame at a time, not the
file). Frames come out HxWx3 uint8 RGB (PyAV converts the video's YUV to ``rgb24``).
`write_lerobot_dataset` writes v3.0 (one data file, one video file per camera) from episodes in
memory-light iterables, with ``meta/stats.json`` computed from the data.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
SUPPORTED_VERSIONS = ("v3.0", "v2.1", "v2.0")
DEFAULT_ACTION_KEY = "action"
DEFAULT_STATE_KEY = "observation.state"


class LeRobotError(ValueError):
    """A LeRobot dataset that cannot be read as asked; the message names the dataset and the problem."""


def is_lerobot_dataset(path: Path) -> bool:
    return path.is_dir() and (path / INFO_PATH).is_file()


@dataclass
class EpisodeMeta:
    """Where one episode's rows and frames are."""

    index: int
    length: int
    tasks: list[str]
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # key -> (file, start time in it)


@dataclass
class LeRobotFrames:
    """One episode, read: images stream through `images`; everything else is small."""

    episode: int
    timestamps: np.ndarray  # (N,) seconds from the episode's start
    actions: np.ndarray  # (N, D)
    states: np.ndarray | None  # (N, S) or None
    instructions: list[str]
    images: Iterator[np.ndarray]  # N HxWx3 uint8 RGB, decoded as consumed


def _feature_names(feature: dict, key: str) -> list[str]:
    shape = feature.get("shape") or [1]
    size = int(np.prod(shape))
    names = feature.get("names")
    if isinstance(names, dict):  # older datasets: {"motors": [...]} or {"axes": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == size and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"{key}.{i}" for i in range(size)]


def _parquet():
    import pyarrow.parquet as pq

    return pq


def _read_tasks(root: Path) -> dict[int, str]:
    """task_index -> task string, from tasks.parquet (v3) or tasks.jsonl (v2.x)."""
    path = root / TASKS_PATH
    if path.is_file():
        table = _parquet().read_table(path)
        columns = table.column_names
        if "task" in columns:
            texts = table.column("task").to_pylist()
        else:  # pandas wrote the task strings as the frame's index
            meta = table.schema.metadata or {}
            index_columns = json.loads(meta.get(b"pandas", b"{}")).get("index_columns", [])
            name = next((c for c in index_columns if isinstance(c, str) and c in columns), None)
            name = name or next((c for c in columns if c.startswith("__index_level_")), None)
            if name is None:
                raise LeRobotError(f"{path} has no task strings (columns {columns})")
            texts = table.column(name).to_pylist()
        indices = table.column("task_index").to_pylist()
        return {int(i): str(t) for i, t in zip(indices, texts)}
    legacy = root / "meta" / "tasks.jsonl"
    if legacy.is_file():
        rows = [json.loads(line) for line in legacy.read_text().splitlines() if line.strip()]
        return {int(r["task_index"]): str(r["task"]) for r in rows}
    raise LeRobotError(f"LeRobot dataset {str(root)!r} has neither meta/tasks.parquet nor meta/tasks.jsonl")


class LeRobotDataset:
    """A local LeRobot dataset (v3.0 or v2.1): metadata on construction, episodes on demand."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not is_lerobot_dataset(self.root):
            raise LeRobotError(f"{str(self.root)!r} is not a LeRobot dataset: it has no {INFO_PATH}")
        try:
            self.info = json.loads((self.root / INFO_PATH).read_text())
        except json.JSONDecodeError as exc:
            raise LeRobotError(f"{self.root / INFO_PATH} is not valid JSON: {exc}") from None
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in SUPPORTED_VERSIONS:
            raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has codebase_version {self.version!r}; "
                               f"supported: {list(SUPPORTED_VERSIONS)}")
        self.fps = float(self.info.get("fps") or 0)
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has no positive fps in info.json")
        self.features: dict = dict(self.info.get("features") or {})
        self.video_keys = sorted(k for k, f in self.features.items() if f.get("dtype") == "video")
        self.image_keys = sorted(k for k, f in self.features.items() if f.get("dtype") == "image")
        self.tasks = _read_tasks(self.root)
        self.episodes = self._read_episodes()

    # -- metadata

    @property
    def dt(self) -> float:
        return 1.0 / self.fps

    @property
    def cameras(self) -> list[str]:
        return self.video_keys + self.image_keys

    def names(self, key: str) -> list[str]:
        if key not in self.features:
            raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has no feature {key!r}; "
                               f"it has {sorted(self.features)}")
        return _feature_names(self.features[key], key)

    def stats(self) -> dict:
        """meta/stats.json as written ({} when the dataset has none)."""
        path = self.root / STATS_PATH
        return json.loads(path.read_text()) if path.is_file() else {}

    def _read_episodes(self) -> list[EpisodeMeta]:
        if self.version == "v3.0":
            return self._read_episodes_v3()
        return self._read_episodes_v21()

    def _read_episodes_v3(self) -> list[EpisodeMeta]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has no meta/episodes/chunk-*/file-*.parquet")
        data_tpl = self.info.get("data_path") or V3_DATA_PATH
        video_tpl = self.info.get("video_path") or V3_VIDEO_PATH
        out = []
        for path in files:
            table = _parquet().read_table(path, columns=None)
            columns = [c for c in table.column_names if not c.startswith("stats/")]
            for row in table.select(columns).to_pylist():
                data_file = self.root / data_tpl.format(chunk_index=int(row["data/chunk_index"]),
                                                        file_index=int(row["data/file_index"]))
                videos = {}
                for key in self.video_keys:
                    prefix = f"videos/{key}/"
                    if prefix + "chunk_index" not in row:
                        raise LeRobotError(f"{path}: episode {row['episode_index']} has no {prefix}chunk_index")
                    videos[key] = (self.root / video_tpl.format(video_key=key, chunk_index=int(row[prefix + "chunk_index"]),
                                                               file_index=int(row[prefix + "file_index"])),
                                   float(row.get(prefix + "from_timestamp") or 0.0))
                out.append(EpisodeMeta(index=int(row["episode_index"]), length=int(row["length"]),
                                       tasks=[str(t) for t in (row.get("tasks") or [])], data_file=data_file,
                                       videos=videos))
        return sorted(out, key=lambda e: e.index)

    def _read_episodes_v21(self) -> list[EpisodeMeta]:
        path = self.root / "meta" / "episodes.jsonl"
        if not path.is_file():
            raise LeRobotError(f"LeRobot dataset {str(self.root)!r} ({self.version}) has no meta/episodes.jsonl")
        chunk = int(self.info.get("chunks_size") or 1000)
        data_tpl = self.info.get("data_path") or V21_DATA_PATH
        video_tpl = self.info.get("video_path") or V21_VIDEO_PATH
        out = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            e = int(row["episode_index"])
            out.append(EpisodeMeta(
                index=e, length=int(row["length"]), tasks=[str(t) for t in row.get("tasks") or []],
                data_file=self.root / data_tpl.format(episode_chunk=e // chunk, episode_index=e),
                videos={k: (self.root / video_tpl.format(episode_chunk=e // chunk, video_key=k, episode_index=e), 0.0)
                        for k in self.video_keys}))
        return sorted(out, key=lambda e: e.index)

    def episode(self, index: int) -> EpisodeMeta:
        for e in self.episodes:
            if e.index == index:
                return e
        raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has no episode {index}")

    def pick_camera(self, camera: str | None) -> str:
        cameras = self.cameras
        if camera is None:
            if len(cameras) != 1:
                raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has cameras {cameras}; choose one with the "
                                   f"camera option")
            return cameras[0]
        if camera not in cameras:
            raise LeRobotError(f"LeRobot dataset {str(self.root)!r} has no camera {camera!r}; it has {cameras}")
        return camera

    # -- one episode

    def frames(self, index: int, camera: str | None = None, action_key: str = DEFAULT_ACTION_KEY,
               state_key: str | None = DEFAULT_STATE_KEY) -> LeRobotFrames:
        """The rows of episode `index` (sorted by frame) and a stream of its `camera` images."""
        meta = self.episode(index)
        camera = self.pick_camera(camera)
        where = f"LeRobot dataset {str(self.root)!r} episode {index}"
        self.names(action_key)
        if not meta.data_file.is_file():
            raise LeRobotError(f"{where}: data file {meta.data_file} is missing")
        wanted = ["episode_index", "frame_index", "timestamp", "task_index", action_key]
        if state_key and state_key in self.features:
            wanted.append(state_key)
        else:
            state_key = None
        if camera in self.image_keys:
            wanted.append(camera)
        pq = _parquet()
        schema = pq.read_schema(meta.data_file)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise LeRobotError(f"{where}: {meta.data_file} lacks columns {missing}")
        table = pq.read_table(meta.data_file, columns=wanted, filters=[("episode_index", "=", index)])
        rows = table.sort_by("frame_index")
        n = rows.num_rows
        if n == 0:
            raise LeRobotError(f"{where} has no rows in {meta.data_file}")
        timestamps = np.asarray(rows.column("timestamp").to_pylist(), dtype=np.float64)
        actions = np.asarray(rows.column(action_key).to_pylist(), dtype=np.float64).reshape(n, -1)
        states = None if state_key is None else np.asarray(rows.column(state_key).to_pylist(),
                                                           dtype=np.float64).reshape(n, -1)
        instructions = []
        for t in rows.column("task_index").to_pylist():
            if int(t) not in self.tasks:
                raise LeRobotError(f"{where}: task_index {t} is not in the dataset's tasks")
            instructions.append(self.tasks[int(t)])
        if camera in self.image_keys:
            from .images import decode_image_bytes

            cells = rows.column(camera).to_pylist()
            images = (decode_image_bytes(c["bytes"] if isinstance(c, dict) else c, where=f"{where} frame {i}")
                      for i, c in enumerate(cells))
        else:
            video, start = meta.videos[camera]
            images = decode_video_frames(video, start + timestamps, self.fps, where=f"{where} ({camera})")
        return LeRobotFrames(episode=index, timestamps=timestamps, actions=actions, states=states,
                             instructions=instructions, images=images)


def decode_video_frames(path: Path, times: np.ndarray, fps: float, where: str = "video") -> Iterator[np.ndarray]:
    """The frames of `path` at `times` (seconds in the file, increasing), HxWx3 uint8 RGB, one at a time.

    A decoded frame serves the time it is within half a period of; a time no frame serves is an error.
    """
    import av

    if not Path(path).is_file():
        raise LeRobotError(f"{where}: video file {path} is missing")
    times = np.asarray(times, dtype=np.float64)
    if times.size == 0:
        return
    tol = 0.5 / fps
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base = stream.time_base
        start = max(0.0, float(times[0]) - tol)
        container.seek(int(start / base), stream=stream, backward=True, any_frame=False)
        want = 0
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * base)
            if want < times.size and t > times[want] + tol:
                raise LeRobotError(f"{where}: no frame at {times[want]:.4f} s in {path} (next frame at {t:.4f} s)")
            if want < times.size and abs(t - times[want]) <= tol:
                yield frame.to_ndarray(format="rgb24")
                want += 1
                if want == times.size:
                    return
    if want < times.size:
        raise LeRobotError(f"{where}: {path} ends before {times[want]:.4f} s ({times.size - want} frames missing)")


# --- writing (v3.0) -----------------------------------------------------------------------------


@dataclass
class EpisodeToWrite:
    """One episode for `write_lerobot_dataset`: images may be any iterable (consumed once)."""

    images: Iterable[np.ndarray]
    actions: np.ndarray  # (N, D)
    task: str | Sequence[str]  # one task, or one per frame
    states: np.ndarray | None = None  # (N, S)


class VideoWriter:
    """An mp4 (H.264 in yuv420p, as LeRobot's encoders write) fed one RGB frame at a time at `fps`."""

    def __init__(self, path: Path, fps: float, crf: int = 18):
        import av

        self.path, self.fps, self.crf = Path(path), fps, crf
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = None
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        from fractions import Fraction

        import av

        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if self._stream is None:
            h, w = rgb.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(f"video frames need even sizes for yuv420p, got {w}x{h}")
            self._rate = Fraction(self.fps).limit_denominator(1000)
            self._stream = self._container.add_stream("libx264", rate=self._rate)
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
            self._stream.options = {"crf": str(self.crf), "g": "2"}
        elif rgb.shape[:2] != (self._stream.height, self._stream.width):
            raise ValueError(f"frame of {rgb.shape[1]}x{rgb.shape[0]} in a {self._stream.width}x{self._stream.height} video")
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        frame.time_base = 1 / self._rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()


def _feature_stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(), "min": values.min(0).tolist(),
            "max": values.max(0).tolist(), "count": [int(values.shape[0])],
            "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist()}


def write_lerobot_dataset(root: str | Path, episodes: Iterable[EpisodeToWrite], *, fps: float,
                          camera: str = "observation.images.main", action_names: Sequence[str],
                          state_names: Sequence[str] | None = None, robot_type: str = "unknown",
                          image_size: tuple[int, int] | None = None) -> Path:
    """Write a LeRobotDataset v3.0 at `root` (which must not exist yet); returns `root`.

    One data file and one video per camera hold all episodes; images are written as given (their
    size must not change), or resized to `image_size` = (height, width) when given.
    """
    import pyarrow as pa

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise LeRobotError(f"{str(root)!r} exists and is not empty")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be > 0, got {fps}")
    pq = _parquet()
    video_path = root / V3_VIDEO_PATH.format(video_key=camera, chunk_index=0, file_index=0)
    writer = VideoWriter(video_path, fps)
    rows: dict[str, list] = {k: [] for k in ("action", "timestamp", "frame_index", "episode_index", "index",
                                             "task_index")}
    if state_names is not None:
        rows[DEFAULT_STATE_KEY] = []
    tasks: dict[str, int] = {}
    episode_rows = []
    all_actions, all_states = [], []
    shape = None
    try:
        for e, ep in enumerate(episodes):
            actions = np.asarray(ep.actions, dtype=np.float64)
            n = actions.shape[0]
            if actions.ndim != 2 or actions.shape[1] != len(action_names) or n == 0:
                raise ValueError(f"episode {e}: actions of shape {actions.shape} for {len(action_names)} names")
            texts = [ep.task] * n if isinstance(ep.task, str) else list(ep.task)
            if len(texts) != n:
                raise ValueError(f"episode {e}: {len(texts)} tasks for {n} frames")
            start_frame, start_index = writer.frames, len(rows["index"])
            count = 0
            for image in ep.images:
                image = np.asarray(image, dtype=np.uint8)
                if image_size is not None and image.shape[:2] != tuple(image_size):
                    import cv2

                    image = cv2.resize(image, (image_size[1], image_size[0]), interpolation=cv2.INTER_AREA)
                shape = image.shape
                writer.add(image)
                count += 1
            if count != n:
                raise ValueError(f"episode {e}: {count} images for {n} actions")
            for i in range(n):
                task_index = tasks.setdefault(texts[i], len(tasks))
                rows["action"].append(actions[i].astype(np.float32).tolist())
                rows["timestamp"].append(float(np.float32(i / fps)))
                rows["frame_index"].append(i)
                rows["episode_index"].append(e)
                rows["index"].append(start_index + i)
                rows["task_index"].append(task_index)
            if state_names is not None:
                states = np.asarray(ep.states, dtype=np.float64).reshape(n, len(state_names))
                rows[DEFAULT_STATE_KEY].extend(states.astype(np.float32).tolist())
                all_states.append(states)
            all_actions.append(actions)
            episode_rows.append({
                "episode_index": e, "tasks": sorted(set(texts), key=texts.index), "length": n,
                "data/chunk_index": 0, "data/file_index": 0,
                "dataset_from_index": start_index, "dataset_to_index": start_index + n,
                f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": 0,
                f"videos/{camera}/from_timestamp": start_frame / fps,
                f"videos/{camera}/to_timestamp": (start_frame + n) / fps,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
    finally:
        writer.close()
    if not episode_rows:
        raise ValueError("no episodes to write")
    float_list = pa.list_(pa.float32())
    schema = pa.schema([("action", float_list), *(([(DEFAULT_STATE_KEY, float_list)]) if state_names is not None else []),
                        ("timestamp", pa.float32()), ("frame_index", pa.int64()), ("episode_index", pa.int64()),
                        ("index", pa.int64()), ("task_index", pa.int64())])
    data_path = root / V3_DATA_PATH.format(chunk_index=0, file_index=0)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: rows[name] for name in schema.names}, schema=schema), data_path)
    episodes_path = root / V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), episodes_path)
    ordered = sorted(tasks.items(), key=lambda kv: kv[1])
    pq.write_table(pa.table({"task": [t for t, _ in ordered], "task_index": [i for _, i in ordered]}),
                   root / TASKS_PATH)
    features = {
        camera: {"dtype": "video", "shape": list(shape), "names": ["height", "width", "channels"],
                 "info": {"video.fps": fps, "video.codec": "h264", "video.pix_fmt": "yuv420p"}},
        "action": {"dtype": "float32", "shape": [len(action_names)], "names": list(action_names)},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    if state_names is not None:
        features[DEFAULT_STATE_KEY] = {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)}
    total = len(rows["index"])
    info = {"codebase_version": "v3.0", "robot_type": robot_type, "total_episodes": len(episode_rows),
            "total_frames": total, "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500, "fps": fps, "splits": {"train": f"0:{len(episode_rows)}"},
            "data_path": V3_DATA_PATH, "video_path": V3_VIDEO_PATH, "features": features}
    (root / INFO_PATH).write_text(json.dumps(info, indent=4) + "\n")
    stats = {"action": _feature_stats(np.concatenate(all_actions))}
    if all_states:
        stats[DEFAULT_STATE_KEY] = _feature_stats(np.concatenate(all_states))
    (root / STATS_PATH).write_text(json.dumps(stats, indent=4) + "\n")
    return root
