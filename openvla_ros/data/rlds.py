"""RLDS / Open X-Embodiment episodes from TFDS tfrecord files, without TensorFlow.

A TFDS RLDS dataset directory (``<name>/<version>/``) holds ``features.json`` (the feature tree:
``steps`` is a Dataset of FeaturesDicts with ``observation/<camera>`` images, ``action``,
``language_instruction``, ``is_first``...) and ``<name>-<split>.tfrecord-NNNNN-of-MMMMM`` files.
Each record is one episode: a ``tf.train.Example`` whose keys are the flattened feature paths
(``steps/observation/image``, ``steps/action``), every step feature stacked over the episode
(images as one encoded JPEG/PNG per step, tensors flattened in row-major order).

`RldsDataset` indexes the records of a split by scanning the tfrecord framing (length, CRC,
payload, CRC) without reading payloads, then parses one episode at a time (the `tfrecord`
package's protobuf ``Example``). Which keys hold the image, the action and the instruction is a
small key mapping (`RldsKeyMapping`, YAML), as OpenVLA's per-dataset configs name them.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

FEATURES_FILE = "features.json"
DEFAULT_SPLIT = "train"


class RldsError(ValueError):
    """An RLDS dataset that cannot be read as asked; the message names the dataset and the problem."""


def _tfrecord_files(root: Path, split: str | None = None) -> list[Path]:
    files = sorted(p for p in root.iterdir() if p.is_file() and ".tfrecord" in p.name)
    if split is not None:
        files = [p for p in files if f"-{split}.tfrecord" in p.name]
    return files


def is_rlds_dataset(path: Path) -> bool:
    return path.is_dir() and (path / FEATURES_FILE).is_file() and bool(_tfrecord_files(path))


@dataclass
class FeatureSpec:
    kind: str  # image | tensor | text
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    encoding: str | None = None  # images: jpeg / png


def parse_features_json(tree: Mapping) -> dict[str, FeatureSpec]:
    """Flattened feature paths (``steps/observation/image``) -> FeatureSpec, from a TFDS features.json."""
    out: dict[str, FeatureSpec] = {}

    def walk(node: Mapping, prefix: str) -> None:
        cls = str(node.get("pythonClassName", ""))
        if "featuresDict" in node:
            for name, child in node["featuresDict"].get("features", {}).items():
                walk(child, f"{prefix}{name}/")
        elif "sequence" in node:  # tfds.features.Dataset / Sequence: stacked over steps
            walk(node["sequence"]["feature"], prefix)
        elif "image" in node:
            spec = node["image"]
            out[prefix.rstrip("/")] = FeatureSpec("image", _dims(spec.get("shape")), str(spec.get("dtype", "uint8")),
                                                  str(spec.get("encodingFormat", "png")).lower())
        elif "tensor" in node:
            spec = node["tensor"]
            out[prefix.rstrip("/")] = FeatureSpec("tensor", _dims(spec.get("shape")), str(spec.get("dtype", "float32")))
        elif "text" in node or cls.endswith("Text"):
            out[prefix.rstrip("/")] = FeatureSpec("text", (), "string")

    walk(tree, "")
    return out


def _dims(shape) -> tuple[int, ...]:
    if not shape:
        return ()
    return tuple(int(d) for d in shape.get("dimensions", []))


@dataclass
class RldsKeyMapping:
    """Where a dataset keeps what training needs (keys relative to ``steps/``).

    ``action`` may list several keys, concatenated in order (RT-1 style action dicts:
    ``[action/world_vector, action/rotation_delta, action/gripper_closedness_action]``).
    """

    image: str = "observation/image"
    action: str | list[str] = "action"
    language: str = "language_instruction"
    action_dim_names: list[str] | None = None
    dt: float | None = None  # seconds per step; None: the caller's default
    split: str = DEFAULT_SPLIT

    @classmethod
    def from_dict(cls, raw: Mapping, where: str) -> "RldsKeyMapping":
        known = {"image", "action", "language", "action_dim_names", "dt", "split"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RldsError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        out = cls(**dict(raw))
        if isinstance(out.image, str) and "/" not in out.image:
            out.image = f"observation/{out.image}"  # a bare camera name, as OpenVLA's image_obs_keys give it
        if out.dt is not None and not (float(out.dt) > 0):
            raise RldsError(f"{where}: dt must be > 0 seconds, got {out.dt}")
        return out

    @property
    def action_keys(self) -> list[str]:
        return [self.action] if isinstance(self.action, str) else list(self.action)


def load_key_mapping(spec: str | Path, root: Path | None = None) -> RldsKeyMapping:
    """A key mapping from a YAML file: the mapping itself, or one mapping per dataset name (the
    dataset directory's name or its parent's, as ``<name>/<version>/`` is laid out)."""
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise RldsError(f"RLDS key mapping {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RldsError(f"RLDS key mapping {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RldsError(f"RLDS key mapping {str(path)!r} must be a mapping")
    if raw and all(isinstance(v, dict) for v in raw.values()):  # keyed by dataset name
        names = [] if root is None else [root.name, root.parent.name]
        for name in names:
            if name in raw:
                return RldsKeyMapping.from_dict(raw[name], f"{path} [{name}]")
        raise RldsError(f"RLDS key mapping {str(path)!r} has no entry for {names}; it has {sorted(raw)}")
    return RldsKeyMapping.from_dict(raw, str(path))


@dataclass
class RldsSteps:
    """One episode: images stream through `images`; the rest is small."""

    episode: int
    actions: np.ndarray  # (T, D)
    instructions: list[str]
    images: Iterator[np.ndarray]  # T HxWx3 uint8 RGB


def scan_records(path: Path) -> list[tuple[int, int]]:
    """(payload offset, payload length) of every record of a tfrecord file, reading only the framing."""
    out = []
    size = path.stat().st_size
    with path.open("rb") as f:
        pos = 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise RldsError(f"{path} is truncated at byte {pos} (a record header needs 12 bytes)")
            (length,) = struct.unpack("<Q", head[:8])
            start = pos + 12
            if start + length + 4 > size:
                raise RldsError(f"{path} is truncated: a record of {length} bytes at byte {pos} runs past the end")
            out.append((start, length))
            pos = start + length + 4
            f.seek(pos)
    return out


def _example_features(data: bytes, where: str) -> dict:
    from tfrecord import example_pb2

    example = example_pb2.Example()
    try:
        example.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise RldsError(f"{where}: not a tf.train.Example ({exc})") from None
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feature.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.asarray(feature.float_list.value, dtype=np.float64)
        elif kind == "int64_list":
            out[key] = np.asarray(feature.int64_list.value, dtype=np.int64)
        else:
            out[key] = []
    return out


class RldsDataset:
    """An RLDS dataset directory: features.json, the split's records indexed on construction."""

    def __init__(self, root: str | Path, mapping: RldsKeyMapping | None = None, camera: str | None = None):
        self.root = Path(root)
        if not is_rlds_dataset(self.root):
            raise RldsError(f"{str(self.root)!r} is not an RLDS dataset: it needs {FEATURES_FILE} and tfrecord files")
        try:
            tree = json.loads((self.root / FEATURES_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise RldsError(f"{self.root / FEATURES_FILE} is not valid JSON: {exc}") from None
        self.features = parse_features_json(tree)
        self.mapping = mapping or RldsKeyMapping()
        if camera is not None:
            self.mapping.image = camera if "/" in camera else f"observation/{camera}"
        self._check_mapping()
        self.files = _tfrecord_files(self.root, self.mapping.split)
        if not self.files:
            raise RldsError(f"RLDS dataset {str(self.root)!r} has no tfrecord files of split {self.mapping.split!r}")
        self.records: list[tuple[Path, int, int]] = [(p, off, n) for p in self.files for off, n in scan_records(p)]

    @property
    def num_episodes(self) -> int:
        return len(self.records)

    @property
    def cameras(self) -> list[str]:
        return sorted(k[len("steps/"):] for k, s in self.features.items() if s.kind == "image" and k.startswith("steps/"))

    def _check_mapping(self) -> None:
        where = f"RLDS dataset {str(self.root)!r}"
        m = self.mapping
        image = self.features.get(f"steps/{m.image}")
        if image is None or image.kind != "image":
            raise RldsError(f"{where} has no image feature steps/{m.image}; its cameras: {self.cameras} "
                            f"(choose one with the camera option or the key mapping's 'image')")
        for key in m.action_keys:
            spec = self.features.get(f"steps/{key}")
            if spec is None or spec.kind != "tensor":
                tensors = sorted(k[len("steps/"):] for k, s in self.features.items()
                                 if s.kind == "tensor" and k.startswith("steps/"))
                raise RldsError(f"{where} has no tensor feature steps/{key}; its step tensors: {tensors}")
        if f"steps/{m.language}" not in self.features:
            texts = sorted(k for k, s in self.features.items() if s.kind == "text")
            raise RldsError(f"{where} has no text feature steps/{m.language}; its texts: {texts}")

    @property
    def action_dim(self) -> int:
        return sum(int(np.prod(self.features[f"steps/{k}"].shape or (1,))) for k in self.mapping.action_keys)

    def read_record(self, episode: int) -> dict:
        if not 0 <= episode < len(self.records):
            raise RldsError(f"RLDS dataset {str(self.root)!r} has {len(self.records)} episodes, no episode {episode}")
        path, offset, length = self.records[episode]
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        return _example_features(data, f"{path} record at byte {offset}")

    def episode(self, episode: int) -> RldsSteps:
        """Episode `episode` of the split (in file order): actions, instructions and a stream of images."""
        from .images import decode_image_bytes

        record = self.read_record(episode)
        where = f"RLDS dataset {str(self.root)!r} episode {episode}"
        m = self.mapping
        images = record.get(f"steps/{m.image}", [])
        n = len(images)
        if n == 0:
            raise RldsError(f"{where} has no steps (no steps/{m.image} images)")
        parts = []
        for key in m.action_keys:
            values = record.get(f"steps/{key}")
            if values is None:
                raise RldsError(f"{where} lacks steps/{key}")
            values = np.asarray(values, dtype=np.float64)
            if values.size % n:
                raise RldsError(f"{where}: steps/{key} holds {values.size} values for {n} steps")
            parts.append(values.reshape(n, -1))
        actions = np.concatenate(parts, axis=1)
        texts = record.get(f"steps/{m.language}", [])
        if len(texts) == 1 and n > 1:
            texts = texts * n
        if len(texts) != n:
            raise RldsError(f"{where}: {len(texts)} instructions for {n} steps")
        instructions = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
        stream = (decode_image_bytes(b, where=f"{where} step {i}") for i, b in enumerate(images))
        return RldsSteps(episode=episode, actions=actions, instructions=instructions, images=stream)


# --- writing (tests, conversion) ----------------------------------------------------------------


def features_json(image_keys: Mapping[str, tuple[int, int, int]], action_dim: int, encoding: str = "jpeg") -> dict:
    """A TFDS features.json tree for RLDS steps with images, a float32 action and an instruction."""
    tensor = "tensorflow_datasets.core.features.tensor_feature.Tensor"
    observation = {name: {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
                          "image": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": "uint8",
                                    "encodingFormat": encoding}}
                   for name, shape in image_keys.items()}
    scalar = {"pythonClassName": "tensorflow_datasets.core.features.scalar.Scalar",
              "tensor": {"shape": {}, "dtype": "bool", "encoding": "none"}}
    steps = {
        "action": {"pythonClassName": tensor,
                   "tensor": {"shape": {"dimensions": [str(action_dim)]}, "dtype": "float32", "encoding": "none"}},
        "observation": {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                        "featuresDict": {"features": observation}},
        "language_instruction": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}},
        "is_first": scalar, "is_last": scalar, "is_terminal": scalar,
    }
    return {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            "featuresDict": {"features": {"steps": {
                "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                "sequence": {"feature": {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                                         "featuresDict": {"features": steps}}, "length": "-1"}}}}}


@dataclass
class RldsEpisodeToWrite:
    images: Sequence[np.ndarray]  # T HxWx3 uint8 RGB
    actions: np.ndarray  # (T, D)
    instruction: str
    camera: str = "image"
    extra: dict = field(default_factory=dict)  # more (key -> (values, "byte"|"float"|"int")) to store


def write_rlds_episodes(root: str | Path, name: str, episodes: Sequence[RldsEpisodeToWrite], split: str = DEFAULT_SPLIT,
                        encoding: str = "jpeg", shards: int = 1) -> Path:
    """Write episodes as TFDS RLDS tfrecord shards plus features.json under `root`; returns `root`."""
    from tfrecord.writer import TFRecordWriter

    from .images import encode_image_bytes

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not episodes:
        raise ValueError("no episodes to write")
    first = episodes[0]
    shape = tuple(np.asarray(first.images[0]).shape)
    dim = int(np.asarray(first.actions).shape[1])
    (root / FEATURES_FILE).write_text(json.dumps(features_json({first.camera: shape}, dim, encoding), indent=2) + "\n")
    per_shard = -(-len(episodes) // shards)
    for s in range(shards):
        writer = TFRecordWriter(str(root / f"{name}-{split}.tfrecord-{s:05d}-of-{shards:05d}"))
        try:
            for ep in episodes[s * per_shard:(s + 1) * per_shard]:
                n = len(ep.images)
                actions = np.asarray(ep.actions, dtype=np.float32).reshape(n, dim)
                datum = {
                    f"steps/observation/{ep.camera}": ([encode_image_bytes(np.asarray(im), encoding) for im in ep.images],
                                                       "byte"),
                    "steps/action": (actions.reshape(-1).tolist(), "float"),
                    "steps/language_instruction": ([ep.instruction.encode("utf-8")] * n, "byte"),
                    "steps/is_first": ([int(i == 0) for i in range(n)], "int"),
                    "steps/is_last": ([int(i == n - 1) for i in range(n)], "int"),
                    "steps/is_terminal": ([int(i == n - 1) for i in range(n)], "int"),
                    **ep.extra,
                }
                writer.write(datum)
        finally:
            writer.close()
    return root
