"""Episode recording into rosbag2 bags, without ROS: the logic behind the recorder node.

`EpisodeRecorder` writes already-serialised messages (rclpy raw subscriptions) into one new bag
directory per episode, named from a pattern (``{index}``: the next free episode number, ``{time}``:
local start time ``YYYYmmdd_HHMMSS``). The last message of each latched topic (the instruction,
published once) is kept between episodes and written first into every new one with its original
receive time, so each episode bag is complete on its own. A message that cannot be written is
counted and logged, never raised: a recorder must outlive bad input.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .bag_writer import STORAGES, BagWriter
from .bags import DEFAULT_TYPESTORE, TYPESTORE_NAMES, normalise_msgtype

log = logging.getLogger(__name__)

DEFAULT_NAME_PATTERN = "episode_{index:04d}"
MAX_EPISODES = 1_000_000


@dataclass
class EpisodeSummary:
    """What one finished episode holds."""

    path: Path
    counts: dict[str, int]
    errors: dict[str, int]
    started_ns: int
    stopped_ns: int

    @property
    def messages(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        topics = ", ".join(f"{t} x{n}" for t, n in sorted(self.counts.items())) or "no messages"
        errors = f"; {sum(self.errors.values())} unwritable: {self.errors}" if self.errors else ""
        return f"{self.path} ({(self.stopped_ns - self.started_ns) * 1e-9:.1f} s): {topics}{errors}"


@dataclass
class _Latched:
    msgtype: str
    receive_ns: int
    data: bytes


@dataclass
class EpisodeRecorder:
    """Start/stop episodes and write raw messages into the current one (thread-compatible, not thread-safe)."""

    out_dir: Path
    name_pattern: str = DEFAULT_NAME_PATTERN
    storage: str = "mcap"
    typestore: str = DEFAULT_TYPESTORE
    latched_topics: Iterable[str] = ()
    clock_ns: Callable[[], int] = time.time_ns
    writer: BagWriter | None = field(default=None, init=False)
    errors: dict[str, int] = field(default_factory=dict, init=False)
    episodes: list[EpisodeSummary] = field(default_factory=list, init=False)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.typestore.lower() not in TYPESTORE_NAMES:
            raise ValueError(f"typestore must be one of {TYPESTORE_NAMES}, got {self.typestore!r}")
        self._format(0)  # validates the pattern
        self.latched_topics = set(self.latched_topics)
        self._latched: dict[str, _Latched] = {}
        self._started_ns = 0

    def _format(self, index: int) -> str:
        try:
            name = self.name_pattern.format(index=index, time=time.strftime("%Y%m%d_%H%M%S"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bag name pattern {self.name_pattern!r} is invalid ({exc!r}); "
                             f"use {{index}} and {{time}}, e.g. {DEFAULT_NAME_PATTERN!r}") from None
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bag name pattern {self.name_pattern!r} gives the unusable name {name!r}")
        return name

    @property
    def recording(self) -> bool:
        return self.writer is not None

    @property
    def path(self) -> Path | None:
        return None if self.writer is None else self.writer.path

    def next_path(self) -> Path:
        """The first path the pattern gives that does not exist yet."""
        seen = set()
        for index in range(MAX_EPISODES):
            path = self.out_dir / self._format(index)
            if not path.exists():
                return path
            if path in seen:  # the pattern ignores {index}: it can never give a new name
                break
            seen.add(path)
        raise ValueError(f"bag name pattern {self.name_pattern!r} gives no free name in {self.out_dir}: "
                         f"include {{index}} or {{time}}")

    def start(self) -> Path:
        """Open a new episode bag (ValueError when one is open already)."""
        if self.writer is not None:
            raise ValueError(f"already recording into {self.writer.path}")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the bag directory {str(self.out_dir)!r}: {exc}") from None
        writer = BagWriter(self.next_path(), self.storage, self.typestore).open()
        self.writer = writer
        self.errors = {}
        self._started_ns = int(self.clock_ns())
        for topic, item in sorted(self._latched.items()):
            self._write(topic, item.msgtype, item.receive_ns, item.data)
        log.info("recording into %s", writer.path)
        return writer.path

    def has_latched(self, topic: str) -> bool:
        """Whether a message of latched `topic` has arrived (it opens every following episode)."""
        return topic in self._latched

    def write(self, topic: str, msgtype: str, receive_ns: int, data: bytes) -> bool:
        """Store a message when recording; False when it was not written (not recording, or unwritable)."""
        if topic in self.latched_topics:
            self._latched[topic] = _Latched(normalise_msgtype(msgtype), int(receive_ns), bytes(data))
        if self.writer is None:
            return False
        return self._write(topic, msgtype, receive_ns, data)

    def _write(self, topic, msgtype, receive_ns, data) -> bool:
        try:
            self.writer.write_raw(topic, msgtype, int(receive_ns), data)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure of one message must not end the recording
            self.errors[topic] = self.errors.get(topic, 0) + 1
            if self.errors[topic] == 1:
                log.error("cannot record a message on %s [%s]: %s", topic, msgtype, exc)
            return False

    def stop(self) -> EpisodeSummary:
        """Close the episode bag and return what it holds (ValueError when not recording)."""
        if self.writer is None:
            raise ValueError("not recording")
        writer, self.writer = self.writer, None
        writer.close()
        summary = EpisodeSummary(writer.path, dict(writer.counts), dict(self.errors), self._started_ns,
                                 int(self.clock_ns()))
        self.episodes.append(summary)
        log.info("recorded %s", summary.describe())
        return summary

    def close(self) -> EpisodeSummary | None:
        """Stop if recording (on shutdown)."""
        return self.stop() if self.writer is not None else None
