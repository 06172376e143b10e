"""Bring up the OpenVLA stack next to a real arm's driver: vla_node + ik_node.

    ros2 launch openvla_ros openvla_arm.launch.py checkpoint:=/models/openvla-7b engine:=torch device:=cuda \
        robot_config:=$(ros2 pkg prefix openvla_ros)/share/openvla_ros/config/robots/panda.yaml

The arm's driver (ros2_control) must already publish /joint_states and run the controller that
ik_node's `command_topic` feeds. Parameters come from config/vla_node.yaml, config/ik_node.yaml and
the robot file; the launch arguments override the few that change per run.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    config = PathJoinSubstitution([FindPackageShare("openvla_ros"), "config"])
    arguments = [
        DeclareLaunchArgument("checkpoint", description="OpenVLA checkpoint directory"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace of every node and its relative topics (e.g. left_arm)"),
        DeclareLaunchArgument("engine", default_value="torch", description="torch | bnb4 | bnb8 | onnx | tensorrt | remote"),
        DeclareLaunchArgument("device", default_value="cuda", description="cpu or cuda[:N]"),
        DeclareLaunchArgument("dtype", default_value="bfloat16", description="float32 | bfloat16 | float16"),
        DeclareLaunchArgument("unnorm_key", default_value="", description="dataset key for un-normalisation"),
        DeclareLaunchArgument("vla_config", default_value=PathJoinSubstitution([config, "vla_node.yaml"]),
                              description="vla_node parameter file"),
        DeclareLaunchArgument("ik_config", default_value=PathJoinSubstitution([config, "ik_node.yaml"]),
                              description="ik_node parameter file"),
        DeclareLaunchArgument("robot_config", default_value=PathJoinSubstitution([config, "robots", "panda.yaml"]),
                              description="robot parameter file (URDF, frames, joints, limits)"),
        DeclareLaunchArgument("use_ik_node", default_value="true",
                              description="false when MoveIt Servo consumes /vla/eef_delta instead"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock"),
        DeclareLaunchArgument("base_frame", default_value="panda_link0",
                              description="the arm's base frame, for both nodes: frame_id of vla_node's twists and "
                                          "ik_node's base_frame (overrides the robot file's; must be in its URDF)"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw", description="camera topic"),
        DeclareLaunchArgument("start_enabled", default_value="false",
                              description="follow the model without calling /vla_node/enable first"),
    ]
    namespace = LaunchConfiguration("namespace")
    use_sim_time = LaunchConfiguration("use_sim_time")
    # Set for every node from one argument each, after the parameter files, so they cannot disagree.
    shared = {"base_frame": LaunchConfiguration("base_frame"),
              "use_sim_time": ParameterValue(use_sim_time, value_type=bool)}
    vla = Node(
        package="openvla_ros", executable="vla_node", name="vla_node", output="screen", namespace=namespace,
        parameters=[LaunchConfiguration("vla_config"), {
            "checkpoint": LaunchConfiguration("checkpoint"),
            "engine": LaunchConfiguration("engine"),
            "device": LaunchConfiguration("device"),
            "dtype": LaunchConfiguration("dtype"),
            "unnorm_key": LaunchConfiguration("unnorm_key"),
            "image_topic": LaunchConfiguration("image_topic"),
            "start_enabled": ParameterValue(LaunchConfiguration("start_enabled"), value_type=bool),
        }, shared],
    )
    ik = Node(
        package="openvla_ros", executable="ik_node", name="ik_node", output="screen", namespace=namespace,
        condition=IfCondition(LaunchConfiguration("use_ik_node")),
        parameters=[LaunchConfiguration("ik_config"), LaunchConfiguration("robot_config"), shared],
    )
    return LaunchDescription(arguments + [vla, ik])
