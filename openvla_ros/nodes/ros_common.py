"""Small rclpy helpers shared by the nodes: QoS profiles, time conversion, diagnostics, spinning."""
from __future__ import annotations

import json
import math
import time
from typing import Callable


def latched_qos(depth: int = 1):
    """Reliable + transient_local: the last message (e.g. the instruction) reaches late joiners."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def volatile_qos(depth: int = 10):
    """Reliable + volatile: what `ros2 topic pub` (Jazzy on), Foxglove and rqt publish with."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


class TwoPathDeduplicator:
    """Passes each message once that may arrive on two subscriptions of the same topic.

    A latched (transient_local) publisher's message reaches both the volatile and the
    transient_local subscription; a volatile publisher's only the volatile one (DDS matches a
    transient_local reader only with transient_local writers), and a latched message published
    before the node started only the transient_local one, as history. Messages carry no id that
    Humble's rclpy hands to callbacks, so a copy is recognised by its content: a message equal to
    one that came on the *other* path within `window_s` and has not been paired yet is the second
    copy and is dropped. Repeats on one path (an operator re-sending the same text) all pass.
    """

    def __init__(self, window_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = float(window_s)
        self.clock = clock
        self._unpaired: list[tuple[float, str, object]] = []  # (arrival, path, key), oldest first

    def accept(self, path: str, key) -> bool:
        now = self.clock()
        self._unpaired = [e for e in self._unpaired if now - e[0] <= self.window_s]
        for i, (_, other_path, other_key) in enumerate(self._unpaired):
            if other_path != path and other_key == key:
                del self._unpaired[i]
                return False
        self._unpaired.append((now, path, key))
        return True


def subscribe_volatile_and_latched(node, msg_type, topic: str, callback, key=lambda msg: msg.data,
                                   dedup: TwoPathDeduplicator | None = None):
    """Subscribe so that every common publisher reaches `callback`, each message once.

    A volatile reliable subscription matches volatile and transient_local publishers alike; a
    second, transient_local one also receives what a latched publisher sent before this node
    existed. Both run on the node's executor thread; `dedup` drops the second copy.
    Returns the two subscriptions.
    """
    from .ros_compat import subscription_event_callbacks

    dedup = dedup if dedup is not None else TwoPathDeduplicator()
    # A volatile publisher never matches the transient_local subscription, by design: rclpy's
    # default handler would log that as a warning for every such publisher.
    expected_mismatch = subscription_event_callbacks(incompatible_qos=lambda _event: None)

    def on(path):
        def receive(msg):
            if dedup.accept(path, key(msg)):
                callback(msg)
        return receive

    return (node.create_subscription(msg_type, topic, on("volatile"), volatile_qos()),
            node.create_subscription(msg_type, topic, on("latched"), latched_qos(), event_callbacks=expected_mismatch))


def sensor_qos(depth: int = 1):
    """Camera input: keep only the newest frame; best effort matches most camera drivers."""
    from rclpy.qos import qos_profile_sensor_data, QoSProfile

    profile = QoSProfile(depth=depth)
    profile.reliability = qos_profile_sensor_data.reliability
    profile.durability = qos_profile_sensor_data.durability
    profile.history = qos_profile_sensor_data.history
    return profile


def stamp_to_seconds(stamp) -> float:
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def seconds_to_stamp(seconds: float):
    from builtin_interfaces.msg import Time

    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot make a ROS time from {seconds!r} s")
    sec = int(seconds)
    return Time(sec=sec, nanosec=min(999_999_999, int(round((seconds - sec) * 1e9))))


def node_seconds(node) -> float:
    return node.get_clock().now().nanoseconds * 1e-9


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, float):
        out[prefix] = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = str(value)
    return out


def diagnostic_array(node, name: str, status: dict, *, level_of_state):
    """A DiagnosticArray with one status: `status` flattened into key/values."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    state = str(status.get("state", "unknown"))
    msg = DiagnosticArray()
    msg.header.stamp = node.get_clock().now().to_msg()
    entry = DiagnosticStatus(level=level_of_state(state), name=name, message=state, hardware_id=node.get_name())
    entry.values = [KeyValue(key=k, value=v) for k, v in flatten("", status, {}).items()]
    msg.status = [entry]
    return msg


def diagnostic_level(ok_states=("ok",), warn_states=()):
    from diagnostic_msgs.msg import DiagnosticStatus

    def level(state: str) -> bytes:
        if state in ok_states:
            return DiagnosticStatus.OK
        if state in warn_states:
            return DiagnosticStatus.WARN
        return DiagnosticStatus.ERROR

    return level


def call_service(node, srv_type, name: str, request, timeout: float = 10.0):
    """Call a service from a node spun on another thread and wait for the answer (ValueError when none)."""
    import threading

    client = node.create_client(srv_type, name)
    try:
        if not client.wait_for_service(timeout_sec=timeout):
            raise ValueError(f"service {name} not available within {timeout} s")
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            raise ValueError(f"service {name} gave no answer within {timeout} s")
        return future.result()
    finally:
        node.destroy_client(client)


class SpinningNode:
    """A node spun by its own SingleThreadedExecutor on a background thread.

    `stop` ends the spin loop and joins the thread before it shuts the executor down: shutting an
    executor down while another thread waits in it races on its guard condition in Jazzy's rclpy
    (7.1.6 destroys it without waiting for the spinning thread, which then fails on None).
    """

    # How long one spin_once waits for work: the longest `stop` waits for the loop to notice.
    POLL_S = 0.1

    def __init__(self, node, context):
        import threading

        from rclpy.executors import SingleThreadedExecutor

        self.node = node
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(node)
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._spin, name=f"spin-{node.get_name()}", daemon=True)
        self.error: BaseException | None = None
        self.thread.start()

    def _spin(self):
        from rclpy.executors import ExternalShutdownException, ShutdownException

        try:
            while not self._stopping.is_set() and self.executor.context.ok():
                self.executor.spin_once(timeout_sec=self.POLL_S)
        except (ExternalShutdownException, ShutdownException):
            pass
        except BaseException as exc:  # surfaced by stop(): a callback raised inside the executor
            self.error = exc

    def stop(self, timeout: float = 5.0) -> None:
        """End the spin loop, join the thread, shut the executor down, destroy the node; re-raises a
        callback error."""
        self._stopping.set()
        self.thread.join(timeout)
        self.executor.shutdown(timeout_sec=timeout)
        close = getattr(self.node, "close", None)
        if close is not None:
            close()
        self.node.destroy_node()
        if self.error is not None:
            raise self.error


# How often the main thread's spin returns to Python, where a pending Ctrl-C / SIGTERM is raised.
SPIN_WAKE_S = 0.1


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def spin_node(node_factory, args=None) -> int:
    """rclpy.init, build the node, spin a SingleThreadedExecutor until Ctrl-C / SIGTERM / shutdown.

    Shutdown order: the node's own threads stop (`close()`), then the node is destroyed, then the
    context shuts down. rclpy's signal handler would shut the context down first, from inside the
    signal, while a node's control thread may still be publishing (RCLError: publisher's context is
    invalid); so rclpy installs none here and SIGINT/SIGTERM raise KeyboardInterrupt in the main
    thread, which spins in steps of SPIN_WAKE_S to notice it.
    """
    import signal

    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    node = None
    try:
        node = node_factory()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_WAKE_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:  # configuration errors: one clear line, non-zero exit
        print(f"[error] {exc}")
        return 2
    finally:
        for sig in previous:  # a second signal must not cut the orderly shutdown short
            signal.signal(sig, signal.SIG_IGN)
        try:
            if node is not None:
                close = getattr(node, "close", None)
                if close:
                    close()
                node.destroy_node()
        finally:
            if rclpy.ok():
                rclpy.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
