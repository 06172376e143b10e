"""ik_node: TwistStamped end-effector commands in, joint targets for the arm's controller out.

    ros2 run openvla_ros ik_node --ros-args --params-file config/ik_node.yaml --params-file config/robots/panda.yaml

Subscribes `/vla/eef_delta` (geometry_msgs/TwistStamped) and `/joint_states`; a timer at `rate_hz`
publishes the integrated joint targets as trajectory_msgs/JointTrajectory (joint_trajectory_controller),
std_msgs/Float64MultiArray (forward_position_controller) or sensor_msgs/JointState (the simulated
arm), per `output_type`, in the order of `joint_names`. Gripper commands are forwarded. All
decisions (timeouts, holds, re-seeding, refusals) live in `openvla_ros.control.ik_controller`.

The URDF comes from `urdf_path`, else the `robot_description` parameter, else (only with
`use_sim_urdf: true`) the simulated Panda's, else the latched `robot_description_topic` the robot's
bringup publishes; until a model is known the node commands nothing.
"""
from __future__ import annotations

from ..control.ik_controller import (DEFAULT_COMMAND_TIMEOUT_S, DEFAULT_JOINT_STATE_TIMEOUT_S,
                                     DEFAULT_RESEED_THRESHOLD_RAD, STATE_COMMAND_TIMEOUT,
                                     STATE_NO_COMMAND, STATE_OK, STATE_WAITING_FOR_JOINT_STATES, IkController,
                                     resolve_urdf_source)
from ..control.kinematics import PARAM_DEFAULTS as KIN, TWIST_FRAMES, kinematics_from_params
from .params import ParamSpec, declare_parameters

NODE_NAME = "ik_node"
OUTPUT_JOINT_TRAJECTORY = "joint_trajectory"
OUTPUT_FLOAT64_MULTI_ARRAY = "float64_multi_array"
OUTPUT_JOINT_STATE = "joint_state"
OUTPUT_TYPES = (OUTPUT_JOINT_TRAJECTORY, OUTPUT_FLOAT64_MULTI_ARRAY, OUTPUT_JOINT_STATE)
STATE_WAITING_FOR_URDF = "waiting_for_robot_description"

PARAMS = [
    # robot model (config/robots/<arm>.yaml); empty lists take the URDF's values
    ParamSpec("urdf_path", "", "URDF file (empty: robot_description)", read_only=True),
    ParamSpec("robot_description", "", "URDF XML, as robot_state_publisher's parameter", read_only=True),
    ParamSpec("robot_description_topic", "robot_description",
              "latched URDF topic used when no URDF parameter is set ('' = none)", read_only=True),
    ParamSpec("use_sim_urdf", False, "with no URDF set, use the simulated Panda's (never on a real arm)", read_only=True),
    ParamSpec("base_frame", KIN["base_frame"], "base frame: twists and the workspace box are in it", read_only=True),
    ParamSpec("tip_frame", KIN["tip_frame"], "controlled tip frame", read_only=True),
    ParamSpec("joint_names", KIN["joint_names"], "controlled joints in the controller's order (empty: the chain)",
              read_only=True, item_type=str),
    ParamSpec("position_lower", KIN["position_lower"], "joint lower limits (empty: URDF)", "rad", read_only=True, item_type=float),
    ParamSpec("position_upper", KIN["position_upper"], "joint upper limits (empty: URDF)", "rad", read_only=True, item_type=float),
    ParamSpec("velocity_limits", KIN["velocity_limits"], "joint velocity limits (empty: URDF)", "rad/s",
              read_only=True, item_type=float),
    ParamSpec("position_margin", KIN["position_margin"], "kept clear of the position limits", "rad", min=0.0, max=1.0,
              read_only=True),
    ParamSpec("rest_posture", KIN["rest_posture"], "nullspace target posture (empty: middle of the limits)", "rad",
              read_only=True, item_type=float),
    ParamSpec("nullspace_gain", KIN["nullspace_gain"], "pull towards the rest posture", "1/s", min=0.0, max=100.0,
              read_only=True),
    ParamSpec("nullspace_max_speed", KIN["nullspace_max_speed"], "cap on the nullspace joint speed", "rad/s",
              min=1e-6, max=10.0, read_only=True),
    ParamSpec("workspace_min", KIN["workspace_min"], "tip workspace box lower corner in base_frame (empty: no box)", "m",
              read_only=True, item_type=float),
    ParamSpec("workspace_max", KIN["workspace_max"], "tip workspace box upper corner in base_frame", "m",
              read_only=True, item_type=float),
    ParamSpec("singularity_lower_threshold", KIN["singularity_lower_threshold"],
              "Jacobian condition number where deceleration starts", min=1.0, max=1e6, read_only=True),
    ParamSpec("singularity_hard_stop_threshold", KIN["singularity_hard_stop_threshold"],
              "Jacobian condition number where the arm halts", min=1.0, max=1e6, read_only=True),
    ParamSpec("damping_sigma", KIN["damping_sigma"], "damping starts below this smallest singular value",
              min=1e-9, max=10.0, read_only=True),
    ParamSpec("max_damping", KIN["max_damping"], "damping at a singularity", min=1e-9, max=10.0, read_only=True),
    ParamSpec("twist_frame", KIN["twist_frame"], "axes of the incoming twists: base_frame or tip_frame (tool)",
              choices=TWIST_FRAMES, read_only=True),
    # loop and I/O (config/ik_node.yaml; the controller topic usually in the robot file)
    ParamSpec("rate_hz", 100.0, "rate of the joint targets", "Hz", min=1.0, max=1000.0, read_only=True),
    ParamSpec("command_timeout", DEFAULT_COMMAND_TIMEOUT_S, "hold when no twist arrived for this long", "s",
              min=0.001, max=10.0),
    ParamSpec("joint_state_timeout", DEFAULT_JOINT_STATE_TIMEOUT_S, "hold when the joint states are older", "s",
              min=0.001, max=10.0),
    ParamSpec("reseed_threshold", DEFAULT_RESEED_THRESHOLD_RAD,
              "slew the command back to the measured joints when they drift this far from it (raised to at least "
              "5 periods of motion at each joint's velocity limit)", "rad",
              min=1e-4, max=3.2),
    ParamSpec("twist_topic", "vla/eef_delta", "input twists (geometry_msgs/TwistStamped)", read_only=True),
    ParamSpec("joint_states_topic", "joint_states", "measured joint states (sensor_msgs/JointState)", read_only=True),
    ParamSpec("output_type", OUTPUT_JOINT_TRAJECTORY, "message type of the joint targets", choices=OUTPUT_TYPES,
              read_only=True),
    ParamSpec("command_topic", "joint_trajectory_controller/joint_trajectory", "joint target topic", read_only=True),
    ParamSpec("gripper_input_topic", "vla/gripper_command", "gripper commands in (std_msgs/Float64)", read_only=True),
    ParamSpec("gripper_command_topic", "gripper/command", "where gripper commands are forwarded ('' = not forwarded)",
              read_only=True),
    ParamSpec("status_rate_hz", 2.0, "rate of ~/status and /diagnostics", "Hz", min=0.1, max=50.0, read_only=True),
]


def _make_node_class():
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64, Float64MultiArray, String
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from .ros_common import diagnostic_array, diagnostic_level, latched_qos, node_seconds, seconds_to_stamp

    output_classes = {OUTPUT_JOINT_TRAJECTORY: JointTrajectory, OUTPUT_FLOAT64_MULTI_ARRAY: Float64MultiArray,
                      OUTPUT_JOINT_STATE: JointState}

    class IkNode(Node):
        def __init__(self, **node_kwargs):
            super().__init__(NODE_NAME, **node_kwargs)
            self.params = declare_parameters(self, PARAMS, on_change=self._on_param)
            p = self.params
            self.controller: IkController | None = None
            self.period = 1.0 / p["rate_hz"]
            self.command_pub = self.create_publisher(output_classes[p["output_type"]], p["command_topic"], 10)
            self.gripper_pub = (self.create_publisher(Float64, p["gripper_command_topic"], 10)
                                if p["gripper_command_topic"] else None)
            self.status_pub = self.create_publisher(DiagnosticArray, "~/status", 10)
            self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            self._level = diagnostic_level(ok_states=(STATE_OK,),
                                           warn_states=(STATE_NO_COMMAND, STATE_COMMAND_TIMEOUT,
                                                        STATE_WAITING_FOR_JOINT_STATES, STATE_WAITING_FOR_URDF))
            self._msg = {"trajectory": JointTrajectory, "point": JointTrajectoryPoint, "array": Float64MultiArray,
                         "joint_state": JointState, "float": Float64}

            source = resolve_urdf_source(p["urdf_path"], p["robot_description"], p["use_sim_urdf"])
            if source is not None:
                self._build_controller(source)  # configuration errors raise ValueError: the node does not start
            elif p["robot_description_topic"]:
                self.create_subscription(String, p["robot_description_topic"], self._on_robot_description, latched_qos())
                self.get_logger().info(f"no URDF parameter set: waiting for {p['robot_description_topic']}")
            else:
                raise ValueError("no URDF: set urdf_path or robot_description (or robot_description_topic; "
                                 "use_sim_urdf: true for the simulated Panda)")

            self.create_subscription(TwistStamped, p["twist_topic"], self._on_twist, 10)
            self.create_subscription(JointState, p["joint_states_topic"], self._on_joint_state, 10)
            if self.gripper_pub is not None:
                self.create_subscription(Float64, p["gripper_input_topic"], self._on_gripper, 10)
            self.create_timer(self.period, self._on_tick)
            self.create_timer(1.0 / p["status_rate_hz"], self._on_status)

        def _build_controller(self, urdf_source: str) -> None:
            p = self.params
            kinematics = kinematics_from_params(urdf_source, p)
            self.controller = IkController(kinematics, rate_hz=p["rate_hz"], clock=lambda: node_seconds(self),
                                           command_timeout=p["command_timeout"],
                                           joint_state_timeout=p["joint_state_timeout"],
                                           reseed_threshold=p["reseed_threshold"])
            self.joint_names = list(kinematics.joint_names)
            self.get_logger().info(
                f"ik_node ready: {kinematics.base_frame} -> {kinematics.tip_frame}, joints {self.joint_names}, "
                f"{p['rate_hz']:.0f} Hz, {p['output_type']} on {p['command_topic']}")

        # inputs
        def _on_robot_description(self, msg):
            if self.controller is not None:
                return
            try:
                self._build_controller(msg.data)
            except ValueError as exc:
                self.get_logger().error(f"cannot use the robot description: {exc}", throttle_duration_sec=5.0)

        def _on_twist(self, msg):
            if self.controller is None:
                return
            t = msg.twist
            try:
                self.controller.on_twist(msg.header.frame_id,
                                         (t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z))
            except ValueError as exc:
                self.get_logger().error(str(exc), throttle_duration_sec=2.0)

        def _on_joint_state(self, msg):
            if self.controller is None:
                return
            try:
                self.controller.on_joint_state(msg.name, msg.position)
            except ValueError as exc:
                self.get_logger().error(f"ignoring joint state: {exc}", throttle_duration_sec=2.0)

        def _on_gripper(self, msg):
            if self.controller is None:
                return
            try:
                value = self.controller.on_gripper(msg.data)
            except ValueError as exc:
                self.get_logger().error(f"not forwarding gripper command: {exc}", throttle_duration_sec=2.0)
                return
            self.gripper_pub.publish(self._msg["float"](data=value))

        def _on_param(self, name, value):
            if self.controller is not None and name in ("command_timeout", "joint_state_timeout", "reseed_threshold"):
                setattr(self.controller, name, value)

        # outputs
        def _on_tick(self):
            if self.controller is None:
                return
            out = self.controller.tick()
            if out.q_target is not None:
                self.command_pub.publish(self._command_message([float(v) for v in out.q_target], out.time))

        def _command_message(self, q: list, tick_time: float | None = None):
            kind = self.params["output_type"]
            if kind == OUTPUT_FLOAT64_MULTI_ARRAY:
                return self._msg["array"](data=q)
            if kind == OUTPUT_JOINT_STATE:
                msg = self._msg["joint_state"](name=self.joint_names, position=q)
                # Stamped with the tick's instant (what the targets are for), not the publish time.
                msg.header.stamp = (seconds_to_stamp(tick_time) if tick_time is not None and tick_time >= 0
                                    else self.get_clock().now().to_msg())
                return msg
            msg = self._msg["trajectory"](joint_names=self.joint_names)
            # Zero stamp: joint_trajectory_controller starts the trajectory on receipt, so clock
            # offsets between this node and the controller cannot delay or skip the point.
            point = self._msg["point"](positions=q)
            point.time_from_start.sec = int(self.period)
            point.time_from_start.nanosec = int(round((self.period - int(self.period)) * 1e9))
            msg.points = [point]
            return msg

        def _on_status(self):
            status = (self.controller.status() if self.controller is not None
                      else {"state": STATE_WAITING_FOR_URDF})
            for pub in (self.status_pub, self.diag_pub):
                pub.publish(diagnostic_array(self, "openvla_ros: ik_node", status, level_of_state=self._level))

        def close(self):
            pass

    return IkNode


def make_node(**node_kwargs):
    """Build the node (rclpy must be initialised); keyword arguments go to rclpy's Node."""
    return _make_node_class()(**node_kwargs)


def main(args=None) -> int:
    from .ros_common import spin_node

    return spin_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
