"""Replaying a rosbag2 bag on its original timeline, without ROS: the logic behind the bag_player node.

`BagPlayback` streams the raw CDR bytes of the chosen topics in bag order and calls
``publish(PlaybackMessage)`` when each message is due: message i is due ``(t_i - t0) / rate``
seconds after playback started, where ``t_i`` is the time the bag recorded it and ``t0`` the bag's
start plus ``start_offset_s``. The bytes are never deserialised (rclpy publishes them as they are),
so playback costs almost nothing next to inference.

Header stamps (messages whose first field is ``std_msgs/Header``, e.g. Image, CompressedImage,
TwistStamped) are rewritten in the CDR bytes according to ``stamp_mode``:

=========  ==========================================================================================
``now``    the time of publishing on the publisher's clock (what a live camera driver would stamp)
``shift``  the original stamp moved onto the playback clock: ``start_now + (stamp - t0) / rate``
``keep``   unchanged (use with ``/clock`` from the player and ``use_sim_time`` in the other nodes)
=========  ==========================================================================================

Latched topics (the instruction) also get their last message from before ``start_offset_s``,
published at the start. With ``loop`` the bag restarts after its last message plus one mean
message interval, forever, until `stop()`.
"""
from __future__ import annotations

import logging
import math
import struct
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .bags import IMAGE_TYPES, MSG_STRING, BagError, RosBag

log = logging.getLogger(__name__)

STAMP_MODES = ("now", "shift", "keep")
HEADER_TYPE = "std_msgs/msg/Header"

# CDR encapsulation identifiers (first two bytes) of plain CDR: big and little endian. Every ROS 2
# middleware writes these for ROS messages; other encodings are re-encoded through rosbags.
_CDR_BE = b"\x00\x00"
_CDR_LE = b"\x00\x01"
_ENCAPSULATION_SIZE = 4  # identifier + options; the message starts 4-aligned after it


@dataclass(frozen=True)
class PlaybackOptions:
    """What to replay and how (the bag_player node's parameters)."""

    topics: Sequence[str] | None = None  # None/empty: every camera and std_msgs/String topic
    latched_topics: Sequence[str] | None = None  # None: every std_msgs/String topic played
    rate: float = 1.0  # playback speed factor (2.0 = twice as fast)
    start_offset_s: float = 0.0  # skip this much of the bag's beginning
    loop: bool = False
    stamp_mode: str = "now"
    typestore: str | None = None  # None: from the bag's metadata

    def validated(self) -> "PlaybackOptions":
        if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a finite factor > 0, got {self.rate!r}")
        if not (isinstance(self.start_offset_s, (int, float)) and math.isfinite(self.start_offset_s)
                and self.start_offset_s >= 0):
            raise ValueError(f"start_offset_s must be a finite number of seconds >= 0, got {self.start_offset_s!r}")
        if self.stamp_mode not in STAMP_MODES:
            raise ValueError(f"stamp_mode must be one of {STAMP_MODES}, got {self.stamp_mode!r}")
        return replace(self, rate=float(self.rate), start_offset_s=float(self.start_offset_s),
                       topics=list(self.topics) if self.topics else None,
                       latched_topics=None if self.latched_topics is None else list(self.latched_topics))


@dataclass
class PlaybackMessage:
    """One message as published: raw CDR bytes with the stamp bookkeeping of the replay."""

    topic: str
    msgtype: str
    data: bytes  # CDR bytes to publish (stamp already rewritten)
    bag_ns: int  # time the bag recorded the message
    original_stamp_ns: int | None  # header stamp in the bag (None: no header); 0 stamps read as bag_ns
    stamp_ns: int | None  # header stamp as published
    loop: int = 0  # 0 for the first pass through the bag


def first_field_is_header(typestore, msgtype: str) -> bool:
    """True when the message's first field is a std_msgs/Header (its stamp sits right after the encapsulation)."""
    try:
        fields = typestore.fielddefs[msgtype][1]
    except KeyError:
        return False
    return bool(fields) and fields[0][0] == "header" and fields[0][1][1] == HEADER_TYPE


def _stamp_struct(data: bytes) -> struct.Struct | None:
    ident = bytes(data[:2])
    if ident == _CDR_LE:
        return struct.Struct("<iI")
    if ident == _CDR_BE:
        return struct.Struct(">iI")
    return None


def read_header_stamp(data: bytes) -> int:
    """Header stamp (ns) of a header-first message in plain CDR; ValueError for other encodings."""
    fmt = _stamp_struct(data)
    if fmt is None or len(data) < _ENCAPSULATION_SIZE + fmt.size:
        raise ValueError(f"not a plain CDR message with a header (encapsulation {bytes(data[:2]).hex()}, {len(data)} bytes)")
    sec, nanosec = fmt.unpack_from(data, _ENCAPSULATION_SIZE)
    return sec * 1_000_000_000 + nanosec


def with_header_stamp(data: bytes, stamp_ns: int) -> bytes:
    """A copy of a header-first plain CDR message with its header stamp set to `stamp_ns`."""
    fmt = _stamp_struct(data)
    if fmt is None or len(data) < _ENCAPSULATION_SIZE + fmt.size:
        raise ValueError(f"not a plain CDR message with a header (encapsulation {bytes(data[:2]).hex()}, {len(data)} bytes)")
    if not (0 <= stamp_ns < 2**31 * 1_000_000_000):
        raise ValueError(f"stamp {stamp_ns} ns does not fit a builtin_interfaces/Time")
    out = bytearray(data)
    fmt.pack_into(out, _ENCAPSULATION_SIZE, stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000)
    return bytes(out)


class BagPlayback:
    """The replay of one bag: topic selection and validation on construction, `run()` to play.

    ``clock()`` (seconds, monotonic) paces the replay and ``sleep(s)`` waits on it; ``now_ns()`` gives
    stamps for the ``now`` and ``shift`` modes (the publishing node's clock). `run` blocks; `stop`
    ends it from any thread.
    """

    def __init__(self, path: str | Path, options: PlaybackOptions | None = None, *,
                 clock: Callable[[], float] = time.monotonic, now_ns: Callable[[], int] = time.time_ns,
                 sleep: Callable[[float], None] | None = None):
        self.path = Path(path)
        self.options = (options or PlaybackOptions()).validated()
        self._clock = clock
        self._now_ns = now_ns
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait  # the default wakes up on stop()
        self.finished = threading.Event()  # set when run() returns (end of bag or stop)
        self.published = 0
        self.loops_done = 0
        self._start_clock: float | None = None
        with RosBag(self.path, self.options.typestore) as bag:
            if bag.is_ros1:  # ROS 1 types (Header.seq, ...) are not the ROS 2 types a player publishes
                raise BagError(f"{str(self.path)!r} is a ROS 1 bag: convert it first "
                               f"(openvla-ros convert {self.path} --to bags --action-topic ... --out DIR)")
            self.typestore = bag.typestore
            self.topics = self._select_topics(bag)
            self.latched = self._select_latched(bag)
            self.bag_start_ns, self.bag_end_ns = bag.time_range_ns
            counts = sum(bag.topics[t].count for t in self.topics)
        self.t0_ns = self.bag_start_ns + int(round(self.options.start_offset_s * 1e9))
        if self.t0_ns > self.bag_end_ns:
            raise ValueError(f"start_offset_s {self.options.start_offset_s} is beyond the bag's "
                             f"{(self.bag_end_ns - self.bag_start_ns) * 1e-9:.3f} s")
        self.has_header = {t: first_field_is_header(self.typestore, m) for t, m in self.topics.items()}
        span_ns = self.bag_end_ns - self.bag_start_ns
        mean_gap_ns = span_ns / (counts - 1) if counts > 1 else 0.0
        # One pass lasts from t0 to the last message plus one mean interval (seamless loops).
        self.pass_duration_s = (self.bag_end_ns - self.t0_ns + mean_gap_ns) * 1e-9 / self.options.rate

    # -- set-up

    def _select_topics(self, bag: RosBag) -> dict[str, str]:
        names = self.options.topics
        if not names:
            names = bag.topics_of_type(IMAGE_TYPES + (MSG_STRING,))
            if not names:
                raise BagError(f"bag {str(self.path)!r} has no camera or std_msgs/String topic to play; "
                               f"it has: {bag.describe_topics()}")
        return {name: bag.require_topic(name, role="topic to play").msgtype for name in names}

    def _select_latched(self, bag: RosBag) -> list[str]:
        if self.options.latched_topics is None:
            return [t for t, m in self.topics.items() if m == MSG_STRING]
        unknown = [t for t in self.options.latched_topics if t not in self.topics]
        if unknown:
            raise ValueError(f"latched topics {unknown} are not among the topics played {sorted(self.topics)}")
        return list(self.options.latched_topics)

    # -- timing

    def due_s(self, bag_ns: int) -> float:
        """Seconds after the start of a pass at which a message recorded at `bag_ns` is published."""
        return max(0.0, (bag_ns - self.t0_ns) * 1e-9 / self.options.rate)

    def bag_time_ns(self, now: float | None = None) -> int | None:
        """The bag time being played at `now` (clock seconds), for /clock; None before the start."""
        if self._start_clock is None:
            return None
        elapsed = (self._clock() if now is None else now) - self._start_clock
        if self.options.loop and self.pass_duration_s > 0:
            elapsed = math.fmod(elapsed, self.pass_duration_s)
        return self.t0_ns + int(round(max(0.0, elapsed) * self.options.rate * 1e9))

    # -- messages

    def _raw(self, start: int | None = None, stop: int | None = None, topics: Sequence[str] | None = None
             ) -> Iterator[tuple[str, str, int, bytes]]:
        with RosBag(self.path, self.options.typestore) as bag:
            for raw in bag.raw_messages(list(self.topics if topics is None else topics), start, stop):
                yield raw.topic, raw.msgtype, raw.receive_ns, raw.data

    def _restamp(self, topic: str, msgtype: str, data: bytes, bag_ns: int, pass_start_ns: int
                 ) -> tuple[bytes, int | None, int | None]:
        """(bytes to publish, original stamp, published stamp)."""
        if not self.has_header[topic]:
            return data, None, None
        try:
            original = read_header_stamp(data)
        except ValueError:
            msg = self.typestore.deserialize_cdr(data, msgtype)
            original = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        original_or_bag = original if original else bag_ns  # simulators without a clock stamp 0
        mode = self.options.stamp_mode
        if mode == "keep":
            return data, original_or_bag, original
        if mode == "now":
            stamp = int(self._now_ns())
        else:
            stamp = pass_start_ns + int(round((original_or_bag - self.t0_ns) / self.options.rate))
        stamp = max(0, stamp)
        try:
            return with_header_stamp(data, stamp), original_or_bag, stamp
        except ValueError:
            msg = self.typestore.deserialize_cdr(data, msgtype)
            msg.header.stamp.sec, msg.header.stamp.nanosec = stamp // 1_000_000_000, stamp % 1_000_000_000
            return bytes(self.typestore.serialize_cdr(msg, msgtype)), original_or_bag, stamp

    def _wait_until(self, deadline: float) -> bool:
        """Sleep until the clock reaches `deadline`; False when stopped meanwhile."""
        while not self._stop.is_set():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return True
            self._sleep(min(remaining, 0.05))
        return False

    def run(self, publish: Callable[[PlaybackMessage], None]) -> int:
        """Play until the end (or forever with loop) or `stop()`; returns the number of messages published."""
        self._start_clock = start = self._clock()
        start_ns = int(self._now_ns())
        loop = 0
        try:
            while not self._stop.is_set():
                pass_start = start + loop * self.pass_duration_s
                pass_start_ns = start_ns + int(round(loop * self.pass_duration_s * 1e9))
                if loop == 0 and self.latched and self.t0_ns > self.bag_start_ns:
                    for topic in self.latched:  # the instruction in force at the offset
                        last = None
                        for item in self._raw(stop=self.t0_ns, topics=[topic]):
                            last = item
                        if last is not None:
                            self._emit(publish, *last, pass_start_ns, loop)
                for topic, msgtype, bag_ns, data in self._raw(start=self.t0_ns):
                    if not self._wait_until(pass_start + self.due_s(bag_ns)):
                        return self.published
                    self._emit(publish, topic, msgtype, bag_ns, data, pass_start_ns, loop)
                self.loops_done = loop + 1
                if not self.options.loop:
                    break
                loop += 1
                if not self._wait_until(start + loop * self.pass_duration_s):
                    break
            return self.published
        finally:
            self.finished.set()

    def _emit(self, publish, topic, msgtype, bag_ns, data, pass_start_ns, loop) -> None:
        out, original, stamp = self._restamp(topic, msgtype, data, bag_ns, pass_start_ns)
        publish(PlaybackMessage(topic, msgtype, out, bag_ns, original, stamp, loop))
        self.published += 1

    def stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()
