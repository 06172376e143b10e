"""sim_node: the simulated Panda cell (pybullet, DIRECT mode) as a ROS 2 robot.

    ros2 run openvla_ros sim_node --ros-args --params-file config/sim_node.yaml

Publishes `/joint_states` (arm + fingers), `/camera/image_raw` (sensor_msgs/Image rgb8, frame
`camera_frame`) with `/camera/camera_info` at `camera_rate_hz`, optionally `/sim/tip_pose` and
`/sim/cubes/<colour>` (geometry_msgs/PoseStamped in `base_frame`), and the episode's instruction on
`/vla/instruction` (latched). Accepts arm joint targets on `command_topic` as sensor_msgs/JointState,
std_msgs/Float64MultiArray or trajectory_msgs/JointTrajectory (`command_type`; for a trajectory the
last point is the target) and gripper openings (std_msgs/Float64, 0 closed .. 1 open). Bad commands
are logged and ignored. `~/reset` (std_srvs/Trigger) starts the next seeded episode.

A dedicated thread owns the physics (`openvla_ros.sim.sim_loop.SimLoop`); with `real_time: false` the
node publishes `/clock` (rosgraph_msgs/Clock) and stamps everything with simulated time, so the
other nodes follow it with `use_sim_time: true`.
"""
from __future__ import annotations

import threading

from ..control.ik_controller import order_joint_positions
from ..sim.scene import CUBE_COLOURS, PANDA_ARM_JOINTS, PANDA_BASE_FRAME, CameraConfig, DEFAULT_PHYSICS_HZ, PandaScene
from ..sim.render_process import RenderProcess
from ..sim.sim_loop import (DEFAULT_CAMERA_RATE_HZ, DEFAULT_JOINT_STATE_RATE_HZ, DEFAULT_MAX_COMMAND_JUMP_RAD,
                             DEFAULT_MAX_LAG_S, SimLoop)
from .params import ParamSpec, declare_parameters

NODE_NAME = "sim_node"
COMMAND_JOINT_STATE = "joint_state"
COMMAND_FLOAT64_MULTI_ARRAY = "float64_multi_array"
COMMAND_JOINT_TRAJECTORY = "joint_trajectory"
COMMAND_TYPES = (COMMAND_JOINT_STATE, COMMAND_FLOAT64_MULTI_ARRAY, COMMAND_JOINT_TRAJECTORY)
_CAMERA = CameraConfig()

PARAMS = [
    ParamSpec("seed", 0, "seed of the first episode (cube placement, target); ~/reset uses the next", min=0,
              max=2**31 - 1, read_only=True),
    ParamSpec("target", "", "cube to reach in every episode ('' = drawn from the seed)",
              choices=("", *sorted(CUBE_COLOURS)), read_only=True),
    ParamSpec("real_time", True, "pace the physics to the wall clock (false: publish /clock, stamp with sim time)",
              read_only=True),
    ParamSpec("speed", 0.0, "when not real_time: simulated seconds per wall second (0 = as fast as possible)",
              min=0.0, max=1000.0, read_only=True),
    ParamSpec("physics_hz", DEFAULT_PHYSICS_HZ, "physics step rate", "Hz", min=20.0, max=2000.0, read_only=True),
    ParamSpec("max_lag_s", DEFAULT_MAX_LAG_S, "real time: re-base the pacing when this far behind", "s",
              min=0.01, max=10.0, read_only=True),
    ParamSpec("max_command_jump_rad", DEFAULT_MAX_COMMAND_JUMP_RAD,
              "refuse joint commands farther than this from the arm's position in any joint (0 = no check), "
              "as a driver refuses a position jump", "rad", min=0.0, max=10.0, read_only=True),
    ParamSpec("joint_state_rate_hz", DEFAULT_JOINT_STATE_RATE_HZ, "joint state rate (simulated time)", "Hz",
              min=1.0, max=1000.0, read_only=True),
    ParamSpec("camera_rate_hz", DEFAULT_CAMERA_RATE_HZ, "camera frame rate (simulated time)", "Hz",
              min=0.1, max=60.0, read_only=True),
    ParamSpec("render_process", True, "render camera frames in a child process (pybullet's renderer holds the GIL, "
              "which stalls every other node of this process while a frame renders)", read_only=True),
    ParamSpec("status_rate_hz", 1.0, "rate of ~/status and /diagnostics", "Hz", min=0.1, max=50.0, read_only=True),
    ParamSpec("image_width", _CAMERA.width, "camera image width", "px", min=8, max=4096, read_only=True),
    ParamSpec("image_height", _CAMERA.height, "camera image height", "px", min=8, max=4096, read_only=True),
    ParamSpec("camera_eye", list(_CAMERA.eye), "camera position in base_frame", "m", read_only=True, item_type=float),
    ParamSpec("camera_target", list(_CAMERA.target), "point the camera looks at", "m", read_only=True, item_type=float),
    ParamSpec("camera_fov_deg", _CAMERA.fov_deg, "vertical field of view", "deg", min=1.0, max=179.0, read_only=True),
    ParamSpec("camera_frame", "camera", "frame_id of the images", read_only=True),
    ParamSpec("base_frame", PANDA_BASE_FRAME, "frame_id of the tip and cube poses", read_only=True),
    ParamSpec("joint_states_topic", "joint_states", "joint state output", read_only=True),
    ParamSpec("image_topic", "camera/image_raw", "camera output (sensor_msgs/Image rgb8)", read_only=True),
    ParamSpec("camera_info_topic", "camera/camera_info", "camera intrinsics output", read_only=True),
    ParamSpec("command_topic", "joint_commands", "arm joint targets in", read_only=True),
    ParamSpec("command_type", COMMAND_JOINT_STATE, "message type of the joint targets", choices=COMMAND_TYPES,
              read_only=True),
    ParamSpec("gripper_topic", "vla/gripper_command", "gripper opening in (std_msgs/Float64, 0 closed .. 1 open)",
              read_only=True),
    ParamSpec("instruction_topic", "vla/instruction", "instruction output (latched)", read_only=True),
    ParamSpec("publish_instruction", True, "publish each episode's instruction", read_only=True),
    ParamSpec("robot_description_topic", "robot_description", "where the simulated Panda's URDF is published, "
              "latched, as robot_state_publisher does, for ik_node, RViz and Foxglove ('' = not published)",
              read_only=True),
    ParamSpec("publish_tip_pose", True, "publish /sim/tip_pose at the joint state rate", read_only=True),
    ParamSpec("publish_cubes", True, "publish /sim/cubes/<colour> at the camera rate", read_only=True),
]


def _make_node_class():
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.duration import Duration
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, JointState
    from std_msgs.msg import Float64, Float64MultiArray, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory

    from ..imaging import rgb_to_image_fields
    from .ros_common import diagnostic_array, diagnostic_level, latched_qos, seconds_to_stamp

    command_classes = {COMMAND_JOINT_STATE: JointState, COMMAND_FLOAT64_MULTI_ARRAY: Float64MultiArray,
                       COMMAND_JOINT_TRAJECTORY: JointTrajectory}
    # Reliable, newest frame only: every subscriber QoS (reliable or best effort) can connect, and
    # a slow subscriber never makes the simulation wait.
    image_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.VOLATILE)

    class SimNode(Node):
        def __init__(self, **node_kwargs):
            super().__init__(NODE_NAME, **node_kwargs)
            self.params = declare_parameters(self, PARAMS)
            p = self.params
            camera = CameraConfig(width=p["image_width"], height=p["image_height"], eye=tuple(p["camera_eye"]),
                                  target=tuple(p["camera_target"]), fov_deg=p["camera_fov_deg"])
            self.joint_state_pub = self.create_publisher(JointState, p["joint_states_topic"], 10)
            self.image_pub = self.create_publisher(Image, p["image_topic"], image_qos)
            self.info_pub = self.create_publisher(CameraInfo, p["camera_info_topic"], image_qos)
            self.instruction_pub = (self.create_publisher(String, p["instruction_topic"], latched_qos())
                                    if p["publish_instruction"] else None)
            self.tip_pub = self.create_publisher(PoseStamped, "sim/tip_pose", 10) if p["publish_tip_pose"] else None
            self.cube_pubs = ({c: self.create_publisher(PoseStamped, f"sim/cubes/{c}", 10) for c in CUBE_COLOURS}
                              if p["publish_cubes"] else {})
            self.clock_pub = None if p["real_time"] else self.create_publisher(Clock, "/clock", 10)
            self.status_pub = self.create_publisher(DiagnosticArray, "~/status", 10)
            self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            self._msgs = {"joint_state": JointState, "image": Image, "info": CameraInfo, "pose": PoseStamped,
                          "clock": Clock, "string": String}
            self._to_fields = rgb_to_image_fields
            self._seconds_to_stamp = seconds_to_stamp
            self._level = diagnostic_level(ok_states=("ok",))
            self._camera = camera

            scene = PandaScene(seed=p["seed"], physics_dt=1.0 / p["physics_hz"], camera=camera)
            self.description_pub = None
            if p["robot_description_topic"]:
                self.description_pub = self.create_publisher(String, p["robot_description_topic"], latched_qos())
                with open(scene.urdf_path, encoding="utf-8") as f:
                    self.description_pub.publish(String(data=f.read()))
            self._renderer = None
            try:
                if p["render_process"]:
                    self._renderer = RenderProcess(dict(camera=camera, cube_size=scene.cube_size,
                                                        urdf_path=scene.urdf_path))
                self.sim = SimLoop(scene, target=p["target"] or None, real_time=p["real_time"], speed=p["speed"],
                                   joint_state_rate_hz=p["joint_state_rate_hz"], camera_rate_hz=p["camera_rate_hz"],
                                   max_lag_s=p["max_lag_s"], max_command_jump_rad=p["max_command_jump_rad"],
                                   renderer=self._renderer, on_step=self._on_step,
                                   on_joint_state=self._publish_state, on_image=self._publish_image,
                                   on_episode=self._publish_episode, on_error=self._log_error)
            except ValueError:
                scene.close()
                if self._renderer is not None:
                    self._renderer.close()
                raise

            self.create_subscription(command_classes[p["command_type"]], p["command_topic"], self._on_command, 10)
            self.create_subscription(Float64, p["gripper_topic"], self._on_gripper, 10)
            self.create_service(Trigger, "~/reset", self._on_reset)
            self.create_timer(1.0 / p["status_rate_hz"], self._on_status)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="sim_node-physics", daemon=True)
            self._thread.start()
            self.get_logger().info(
                f"sim_node ready: seed {self.sim.episode.seed} '{self.sim.episode.instruction}', "
                f"{'real time' if p['real_time'] else 'simulated time on /clock'}, camera {p['camera_rate_hz']:g} Hz")

        # physics thread ---------------------------------------------------------------------------
        def _run(self):
            while not self._stop.is_set():
                try:
                    wait = self.sim.run_once()
                except Exception as exc:  # never let the physics thread die silently
                    self.get_logger().error(f"simulation step failed: {exc!r}", throttle_duration_sec=2.0)
                    wait = 0.1
                if wait > 0:
                    self._stop.wait(wait)

        def _stamp(self, sim_time: float):
            if self.clock_pub is None:
                return self.get_clock().now().to_msg()
            return self._seconds_to_stamp(sim_time)

        def _on_step(self, sim_time):
            if self.clock_pub is not None:
                self.clock_pub.publish(self._msgs["clock"](clock=self._seconds_to_stamp(sim_time)))

        def _publish_state(self, snap):
            stamp = self._stamp(snap.sim_time)
            msg = self._msgs["joint_state"](name=list(snap.names), position=[float(v) for v in snap.positions],
                                            velocity=[float(v) for v in snap.velocities])
            msg.header.stamp = stamp
            self.joint_state_pub.publish(msg)
            if self.tip_pub is not None:
                self.tip_pub.publish(self._pose(stamp, snap.tip_position, snap.tip_quaternion))

        def _pose(self, stamp, position, quaternion=(0.0, 0.0, 0.0, 1.0)):
            msg = self._msgs["pose"]()
            msg.header.stamp, msg.header.frame_id = stamp, self.params["base_frame"]
            msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in position)
            o = msg.pose.orientation
            o.x, o.y, o.z, o.w = (float(v) for v in quaternion)
            return msg

        def _publish_image(self, sim_time, rgb, age_s):
            if self.clock_pub is None:  # real time: the wall time the frame shows, not when it was ready
                stamp = (self.get_clock().now() - Duration(nanoseconds=int(age_s * 1e9))).to_msg()
            else:
                stamp = self._seconds_to_stamp(sim_time)
            fields = self._to_fields(rgb, "rgb8")
            msg = self._msgs["image"](height=fields.height, width=fields.width, encoding=fields.encoding,
                                      is_bigendian=fields.is_bigendian, step=fields.step, data=fields.data.tobytes())
            msg.header.stamp, msg.header.frame_id = stamp, self.params["camera_frame"]
            self.image_pub.publish(msg)
            self.info_pub.publish(self._camera_info(stamp))
            snap = self.sim.snapshot()
            if snap is not None:
                for colour, pub in self.cube_pubs.items():
                    pub.publish(self._pose(stamp, snap.cube_positions[colour]))

        def _camera_info(self, stamp):
            fx, fy, cx, cy = self._camera.intrinsics()
            info = self._msgs["info"](width=self._camera.width, height=self._camera.height, distortion_model="plumb_bob",
                                      d=[0.0] * 5, k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0],
                                      r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                                      p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0])
            info.header.stamp, info.header.frame_id = stamp, self.params["camera_frame"]
            return info

        def _publish_episode(self, episode):
            if self.instruction_pub is not None:
                self.instruction_pub.publish(self._msgs["string"](data=episode.instruction))
            self.get_logger().info(f"episode seed {episode.seed}: '{episode.instruction}'")

        def _log_error(self, message):
            self.get_logger().error(message, throttle_duration_sec=2.0)

        # inputs (executor thread) -----------------------------------------------------------------
        def _on_command(self, msg):
            kind = self.params["command_type"]
            try:
                if kind == COMMAND_FLOAT64_MULTI_ARRAY:
                    q = order_joint_positions([], msg.data, PANDA_ARM_JOINTS)
                elif kind == COMMAND_JOINT_TRAJECTORY:
                    if not msg.points:
                        raise ValueError("joint trajectory has no points")
                    q = order_joint_positions(msg.joint_names, msg.points[-1].positions, PANDA_ARM_JOINTS)
                else:
                    q = order_joint_positions(msg.name, msg.position, PANDA_ARM_JOINTS)
            except ValueError as exc:
                self.sim.counters["bad_commands"] += 1
                self._log_error(f"ignoring joint command: {exc}")
                return
            self.sim.command_joints(q)  # limits are checked by the scene when applied

        def _on_gripper(self, msg):
            self.sim.command_gripper(msg.data)  # range checked by the scene when applied

        def _on_reset(self, request, response):
            try:
                episode = self.reset_episode()
            except (TimeoutError, ValueError) as exc:
                response.success, response.message = False, str(exc)
                return response
            response.success, response.message = True, f"seed {episode.seed}: {episode.instruction}"
            return response

        def _on_status(self):
            for pub in (self.status_pub, self.diag_pub):
                pub.publish(diagnostic_array(self, "openvla_ros: sim_node", self.sim.status(), level_of_state=self._level))

        # Python API (tests, the demo) ---------------------------------------------------------------
        def reset_episode(self, seed: int | None = None, target: str | None = None, timeout: float = 10.0):
            """New episode (the next seed by default), applied by the physics thread; returns its Episode."""
            return self.sim.request_reset(seed, target, timeout)

        def snapshot(self):
            return self.sim.snapshot()

        def close(self):
            self._stop.set()
            self._thread.join(5.0)
            self.sim.scene.close()
            if self._renderer is not None:
                self._renderer.close()

    return SimNode


def make_node(**node_kwargs):
    """Build the node (rclpy must be initialised); keyword arguments go to rclpy's Node."""
    return _make_node_class()(**node_kwargs)


def main(args=None) -> int:
    from .ros_common import spin_node

    return spin_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
