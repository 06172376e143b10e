"""vla_node: camera + instruction in, a 100 Hz end-effector twist stream out.

    ros2 run openvla_ros vla_node --ros-args --params-file config/vla_node.yaml -p checkpoint:=/path/to/ckpt

Inference runs on a worker thread on the newest frame; chunks go into the latency-compensated
chunk buffer, which a control timer samples into TwistStamped at `control_rate_hz`. All decisions
live in `openvla_ros.control.vla_controller`; this node only converts messages.
"""
from __future__ import annotations

import collections
import sys
import threading

from ..control.chunk_buffer import POLICIES, ActionMapping, ChunkBuffer
from ..control.periodic import PeriodicLoop
from ..control.vla_controller import (EXECUTION_CHOICES, EXECUTION_PREFIX, GRIPPER_MODES, HOLD_DISABLED,
                                      HOLD_NO_INSTRUCTION, HOLD_STOPPED, HOLD_UNDERRUN, STATE_FOLLOWING, VlaController,
                                      buffer_execution)
from ..imaging import decode_compressed_image, image_fields_to_rgb
from .params import ParamSpec, declare_parameters

NODE_NAME = "vla_node"

PARAMS = [
    ParamSpec("checkpoint", "", "OpenVLA checkpoint directory (official Hugging Face layout)", read_only=True),
    ParamSpec("engine", "torch", "inference backend", choices=("torch", "bnb4", "bnb8", "onnx", "tensorrt", "remote"), read_only=True),
    ParamSpec("device", "cpu", "torch device: cpu or cuda[:N]", read_only=True),
    ParamSpec("dtype", "auto", "weights dtype (auto: float32 below 1e9 parameters, else bfloat16)", choices=("auto", "float32", "bfloat16", "float16"), read_only=True),
    ParamSpec("unnorm_key", "", "dataset key of the action statistics (empty: the only one)", read_only=True),
    ParamSpec("center_crop", False, "90% area centre crop, for models trained with augmentation", read_only=True),
    ParamSpec("rotate_180", False, "rotate camera images by 180 degrees (upside-down camera)", read_only=True),
    ParamSpec("image_topic", "camera/image_raw", "camera topic (raw; '/compressed' is appended for compressed)", read_only=True),
    ParamSpec("image_transport", "raw", "camera transport", choices=("raw", "compressed"), read_only=True),
    ParamSpec("instruction_topic", "vla/instruction", "instruction topic (std_msgs/String; volatile and latched publishers)", read_only=True),
    ParamSpec("twist_topic", "vla/eef_delta", "output twist topic", read_only=True),
    ParamSpec("gripper_topic", "vla/gripper_command", "output gripper command topic", read_only=True),
    ParamSpec("base_frame", "base_link", "frame_id of the output twists (the arm's base frame)"),
    ParamSpec("control_rate_hz", 100.0, "rate of the twist stream", "Hz", min=1.0, max=1000.0, read_only=True),
    ParamSpec("status_rate_hz", 2.0, "rate of /vla/status and /diagnostics", "Hz", min=0.1, max=50.0, read_only=True),
    ParamSpec("execution", "auto", "how chunks meet the inference latency: timeline (latency-compensated: the part "
              "of a chunk older than its arrival is dropped), arrival (played whole from its arrival, the last "
              "action's velocity held until the next chunk), auto (timeline while chunks outlast the time to the "
              "next answer, else arrival; the choice is in /vla/status buffer.execution), prefix (timeline, each "
              "chunk decoded with the actions committed during its latency forced as its first tokens; "
              "engines with supports_forced_prefix)", choices=EXECUTION_CHOICES, read_only=True),
    ParamSpec("arrival_hold_s", 1.0, "arrival execution: longest the last action's velocity continues while the "
              "next chunk is awaited (then the arm holds)", "s", min=0.0, max=10.0, read_only=True),
    ParamSpec("blend_policy", "replace", "how overlapping chunks combine", choices=POLICIES, read_only=True),
    ParamSpec("crossfade_window_s", 0.1, "crossfade length", "s", min=0.0, max=5.0, read_only=True),
    ParamSpec("ensemble_decay", 0.01, "ensemble weight exp(-decay*i), i=0 oldest", min=-10.0, max=10.0, read_only=True),
    ParamSpec("max_chunk_age_s", 2.0, "chunks whose observation is older are ignored", "s", min=0.01, max=60.0, read_only=True),
    ParamSpec("inference_mode", "continuous", "run inference on every new frame or only when the buffer runs low",
              choices=("continuous", "threshold"), read_only=True),
    ParamSpec("refill_threshold_s", 0.3, "threshold mode: infer when fewer seconds of actions remain", "s", min=0.0, max=60.0, read_only=True),
    ParamSpec("max_consecutive_errors", 3, "engine errors in a row before the state becomes failed", min=1, max=1000, read_only=True),
    ParamSpec("error_backoff_s", 1.0, "wait before retrying a failed engine", "s", min=0.0, max=600.0, read_only=True),
    ParamSpec("max_linear_speed", 0.5, "clamp on the twist's linear speed (the vector is scaled, keeping its direction)",
              "m/s", min=1e-6, max=10.0, read_only=True),
    ParamSpec("max_angular_speed", 2.0, "clamp on the twist's angular speed (the vector is scaled, keeping its direction)",
              "rad/s", min=1e-6, max=20.0, read_only=True),
    ParamSpec("stale_image_timeout_s", 0.5, "hold when the newest frame is older than this", "s", min=0.01, max=60.0),
    ParamSpec("use_header_stamp", True, "observation time from the image header (else arrival time)"),
    ParamSpec("start_enabled", False, "follow the model without calling ~/enable first", read_only=True),
    ParamSpec("gripper_mode", "identity", "gripper mapping g -> g | 2g-1 | sign(2g-1)", choices=GRIPPER_MODES, read_only=True),
    ParamSpec("gripper_invert", False, "negate the mapped gripper command", read_only=True),
    ParamSpec("inference_process", False, "run the engine in a child process, so its Python work (preprocessing, "
              "decode loop) never competes with the control timer for the GIL", read_only=True),
    ParamSpec("control_timing", "thread", "what times the twist stream: a dedicated thread with absolute deadlines "
              "(lowest jitter; wall clock) or an rclpy timer on the executor (follows /clock; always used with "
              "use_sim_time)", choices=("thread", "executor"), read_only=True),
    ParamSpec("control_thread_priority", 10, "control_timing thread: SCHED_FIFO priority of the control thread "
              "(0 = normal scheduling; needs CAP_SYS_NICE or an rtprio limit, else it runs at normal priority "
              "with a warning)", min=0, max=99, read_only=True),
    ParamSpec("gil_switch_interval_s", 0.0005, "Python's thread switch interval for this process (0 = leave the "
              "default 5 ms): how long the control thread can wait for the GIL behind another thread",
              "s", min=0.0, max=0.1, read_only=True),
    ParamSpec("publish_action_chunk", True, "publish each chunk on /vla/action_chunk (debug, recording)", read_only=True),
]


def build_controller(params: dict, engine, clock, on_chunk=None) -> VlaController:
    """The controller for a parameter set (shared by the node and the in-process bringup)."""
    buffer = ChunkBuffer(policy=params["blend_policy"], crossfade_window_s=params["crossfade_window_s"],
                         ensemble_decay=params["ensemble_decay"], max_chunk_age_s=params["max_chunk_age_s"],
                         control_period_s=1.0 / params["control_rate_hz"],
                         execution=buffer_execution(params["execution"]), arrival_hold_s=params["arrival_hold_s"],
                         mapping=ActionMapping(), clock=clock)
    return VlaController(engine, buffer, clock=clock, stale_image_timeout_s=params["stale_image_timeout_s"],
                         start_enabled=params["start_enabled"], gripper_mode=params["gripper_mode"],
                         gripper_invert=params["gripper_invert"], max_linear_speed=params["max_linear_speed"],
                         max_angular_speed=params["max_angular_speed"], on_chunk=on_chunk,
                         forced_prefix=params["execution"] == EXECUTION_PREFIX,
                         worker_options={"mode": params["inference_mode"], "threshold_s": params["refill_threshold_s"],
                                         "max_consecutive_errors": params["max_consecutive_errors"],
                                         "backoff_s": params["error_backoff_s"],
                                         "use_process": params["inference_process"]})


def engine_from_params(params: dict):
    """The engine the parameters name, or with `inference_process` a picklable factory the worker's
    child process calls."""
    import functools

    from ..engines import create_engine

    if not params["checkpoint"]:
        raise ValueError("parameter 'checkpoint' is empty: set it to an OpenVLA checkpoint directory")
    factory = functools.partial(create_engine, params["engine"], params["checkpoint"], device=params["device"],
                                dtype=params["dtype"], unnorm_key=params["unnorm_key"] or None,
                                center_crop=params["center_crop"], rotate_180=params["rotate_180"])
    return factory if params["inference_process"] else factory()


def _make_node_class():
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from rclpy.node import Node
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Float64, String
    from std_srvs.srv import SetBool, Trigger
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from .ros_common import (diagnostic_array, diagnostic_level, node_seconds, seconds_to_stamp, sensor_qos,
                             stamp_to_seconds, subscribe_volatile_and_latched)

    class VlaNode(Node):
        def __init__(self, engine=None, **node_kwargs):
            super().__init__(NODE_NAME, **node_kwargs)
            # Live dict: runtime changes of the writable parameters land here (and in _on_param).
            self.params = declare_parameters(self, PARAMS, on_change=self._on_param)
            p = self.params
            if engine is not None and p["inference_process"]:
                raise ValueError("parameter 'inference_process' needs the engine built from parameters, "
                                 "not an engine object passed in")
            engine = engine if engine is not None else engine_from_params(p)
            clock = lambda: node_seconds(self)  # noqa: E731 - ROS time, so use_sim_time works
            # Accepted chunks are queued by the worker thread and published by the control timer.
            self._chunks_to_publish = collections.deque(maxlen=8)
            # Held by each control tick and by the state changes (stop, enable, instruction): once
            # ~/stop has answered, no tick that sampled the old plan can still publish a moving twist.
            self._control_lock = threading.Lock()
            self.controller = build_controller(p, engine, clock, on_chunk=self._on_chunk)
            self.engine = self.controller.worker.engine  # the engine, or its proxy in the child process
            self.period = 1.0 / p["control_rate_hz"]
            self.twist_pub = self.create_publisher(TwistStamped, p["twist_topic"], 10)
            self.gripper_pub = self.create_publisher(Float64, p["gripper_topic"], 10)
            self.chunk_pub = self.create_publisher(JointTrajectory, "vla/action_chunk", 10) if p["publish_action_chunk"] else None
            self.status_pub = self.create_publisher(DiagnosticArray, "vla/status", 10)
            self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            if p["image_transport"] == "compressed":
                self.create_subscription(CompressedImage, p["image_topic"].rstrip("/") + "/compressed", self._on_compressed, sensor_qos())
            else:
                self.create_subscription(Image, p["image_topic"], self._on_image, sensor_qos())
            # Volatile and latched publishers alike, and a latched instruction sent before this node started.
            subscribe_volatile_and_latched(self, String, p["instruction_topic"], self._on_instruction)
            self.create_service(SetBool, "~/enable", self._on_enable)
            self.create_service(Trigger, "~/stop", self._on_stop)
            if p["gil_switch_interval_s"] > 0:
                sys.setswitchinterval(p["gil_switch_interval_s"])
            self.control_loop = None
            if p["control_timing"] == "thread" and not self.get_parameter("use_sim_time").value:
                self.control_loop = PeriodicLoop(self.period, lambda deadline: self._on_tick(), name="vla_control",
                                                 realtime_priority=p["control_thread_priority"])
            else:
                if p["control_timing"] == "thread":
                    self.get_logger().info("use_sim_time: the control stream follows /clock on an rclpy timer")
                self.create_timer(self.period, self._on_tick)
            self.create_timer(1.0 / p["status_rate_hz"], self._on_status)
            self._level = diagnostic_level(ok_states=(STATE_FOLLOWING,),
                                           warn_states=(HOLD_DISABLED, HOLD_STOPPED, HOLD_NO_INSTRUCTION, HOLD_UNDERRUN))
            self._trajectory_cls, self._point_cls = JointTrajectory, JointTrajectoryPoint
            self._twist_cls, self._float_cls = TwistStamped, Float64
            self._stamp_to_seconds, self._seconds_to_stamp = stamp_to_seconds, seconds_to_stamp
            self.controller.start()
            if self.control_loop is not None:
                self.control_loop.start()
            self.get_logger().info(f"vla_node ready: engine {self.engine.name}, {p['control_rate_hz']:.0f} Hz, "
                                   f"{'enabled' if p['start_enabled'] else 'waiting for ~/enable'}")

        # inputs
        def _stamp_of(self, msg) -> float:
            stamp = self._stamp_to_seconds(msg.header.stamp)
            return stamp if self.params["use_header_stamp"] and stamp > 0 else node_seconds(self)

        def _on_image(self, msg):
            self._take_frame("camera frame", lambda: image_fields_to_rgb(msg.encoding, msg.height, msg.width,
                                                                         msg.step, msg.data), msg)

        def _on_compressed(self, msg):
            self._take_frame("compressed frame", lambda: decode_compressed_image(msg.format, msg.data), msg)

        def _take_frame(self, what, convert, msg):
            # Whatever a frame holds, the node survives it: a conversion that fails in an unforeseen
            # way is refused like an invalid frame, never raised into the executor.
            try:
                rgb = convert()
            except Exception as exc:  # noqa: BLE001 - hostile input must not end the process
                reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                self.controller.on_bad_image(reason)
                self.get_logger().error(f"dropping {what}: {reason}", throttle_duration_sec=2.0)
                return
            refused = self.controller.counters.bad_images
            self.controller.on_image(rgb, self._stamp_of(msg))
            if self.controller.counters.bad_images != refused:
                self.get_logger().error(f"dropping {what}: {self.controller.last_error}", throttle_duration_sec=2.0)

        def _on_instruction(self, msg):
            with self._control_lock:
                accepted = self.controller.set_instruction(msg.data)
            if accepted:
                self.get_logger().info(f"instruction: {msg.data.strip()!r}")
            else:
                self.get_logger().error(str(self.controller.last_error))

        def _on_enable(self, request, response):
            with self._control_lock:
                self.controller.set_enabled(request.data)
            response.success, response.message = True, "enabled" if request.data else "disabled"
            self.get_logger().info(response.message)
            return response

        def _on_stop(self, request, response):
            with self._control_lock:
                self.controller.stop()
            response.success, response.message = True, "stopped: buffer flushed, holding until ~/enable"
            self.get_logger().warning(response.message)
            return response

        def _on_chunk(self, chunk, epoch, result):  # worker thread, after the buffer took or refused it
            if result and self.chunk_pub is not None:
                self._chunks_to_publish.append((chunk, epoch))

        def _on_param(self, name, value):
            if name == "stale_image_timeout_s":
                self.controller.stale_image_timeout_s = value

        # outputs
        def _on_tick(self):  # control thread (or executor timer with use_sim_time)
            with self._control_lock:
                self._publish_command()

        def _publish_command(self):
            # One clock read: the stamp is the instant the buffer was sampled for, taken before any work
            # of the tick (so the time the tick takes never shows up as jitter in the stamps).
            now = self.get_clock().now()
            out = self.controller.tick(self.period, now=now.nanoseconds * 1e-9)
            msg = self._twist_cls()
            msg.header.stamp = now.to_msg()
            msg.header.frame_id = self.params["base_frame"]
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in out.linear)
            msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in out.angular)
            self.twist_pub.publish(msg)
            if out.gripper is not None:
                self.gripper_pub.publish(self._float_cls(data=float(out.gripper)))
            epoch = self.controller.buffer.epoch
            while self._chunks_to_publish:  # empty unless publish_action_chunk
                chunk, chunk_epoch = self._chunks_to_publish.popleft()
                if chunk_epoch == epoch:  # a chunk a new instruction / stop flushed is not the plan any more
                    self.chunk_pub.publish(self._chunk_message(chunk))

        def _chunk_message(self, chunk):
            traj = self._trajectory_cls()
            traj.header.stamp = self._seconds_to_stamp(max(0.0, chunk.stamp))
            traj.header.frame_id = self.params["base_frame"]
            traj.joint_names = list(chunk.dim_names)
            for i, action in enumerate(chunk.actions):
                point = self._point_cls(positions=[float(v) for v in action])
                t = i * chunk.dt
                point.time_from_start.sec = int(t)
                point.time_from_start.nanosec = int(round((t - int(t)) * 1e9))
                traj.points.append(point)
            return traj

        def _on_status(self):
            status = self.controller.status()
            if self.control_loop is not None:
                status.update({f"control_loop_{k}": v for k, v in self.control_loop.status().items()})
            for pub in (self.status_pub, self.diag_pub):
                pub.publish(diagnostic_array(self, "openvla_ros: vla_node", status, level_of_state=self._level))

        def destroy_node(self):
            if getattr(self, "control_loop", None) is not None:  # no tick may publish through a destroyed node
                self.control_loop.stop()
            return super().destroy_node()

        def close(self):
            if getattr(self, "control_loop", None) is not None:
                self.control_loop.stop()
            self.controller.shutdown()

    return VlaNode


def make_node(engine=None, **node_kwargs):
    """Build the node (rclpy must be initialised). `engine` overrides the one built from parameters."""
    return _make_node_class()(engine=engine, **node_kwargs)


def main(args=None) -> int:
    from .ros_common import spin_node

    return spin_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
