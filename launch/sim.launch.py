"""The simulated Panda cell: sim_node -> vla_node -> ik_node -> sim_node.

    ros2 launch openvla_ros sim.launch.py checkpoint:=/path/to/checkpoint [device:=cuda]

Each node gets its own parameter file, the robot file (ik_node) and then config/sim_bringup.yaml,
whose node sections hold the simulated cell's settings: the same files, in the same order, that
`openvla-ros bringup --config config/sim_bringup.yaml` uses where `ros2 launch` is not available.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
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
        DeclareLaunchArgument("device", default_value="cpu", description="cpu or cuda[:N]"),
        DeclareLaunchArgument("dtype", default_value="float32", description="float32 | bfloat16 | float16"),
        DeclareLaunchArgument("seed", default_value="0", description="first episode's seed"),
        DeclareLaunchArgument("real_time", default_value="true",
                              description="false: simulated time on /clock (all nodes use_sim_time)"),
        DeclareLaunchArgument("sim_config", default_value=PathJoinSubstitution([config, "sim_node.yaml"]),
                              description="sim_node parameter file"),
        DeclareLaunchArgument("vla_config", default_value=PathJoinSubstitution([config, "vla_node.yaml"]),
                              description="vla_node parameter file"),
        DeclareLaunchArgument("ik_config", default_value=PathJoinSubstitution([config, "ik_node.yaml"]),
                              description="ik_node parameter file"),
        DeclareLaunchArgument("robot_config", default_value=PathJoinSubstitution([config, "robots", "panda.yaml"]),
                              description="robot parameter file for ik_node"),
        DeclareLaunchArgument("cell_config", default_value=PathJoinSubstitution([config, "sim_bringup.yaml"]),
                              description="settings of the simulated cell (loaded last)"),
    ]
    namespace = LaunchConfiguration("namespace")
    cell = LaunchConfiguration("cell_config")
    real_time = LaunchConfiguration("real_time")
    # The other nodes follow /clock exactly when sim_node runs on simulated time.
    sim_time = {"use_sim_time": ParameterValue(
        PythonExpression(["'", real_time, "'.lower() not in ('true', '1')"]), value_type=bool)}
    sim = Node(
        package="openvla_ros", executable="sim_node", name="sim_node", output="screen", namespace=namespace,
        parameters=[LaunchConfiguration("sim_config"), cell, {
            "seed": ParameterValue(LaunchConfiguration("seed"), value_type=int),
            "real_time": ParameterValue(real_time, value_type=bool),
        }],
    )
    vla = Node(
        package="openvla_ros", executable="vla_node", name="vla_node", output="screen", namespace=namespace,
        parameters=[LaunchConfiguration("vla_config"), cell, {
            "checkpoint": LaunchConfiguration("checkpoint"),
            "engine": LaunchConfiguration("engine"),
            "device": LaunchConfiguration("device"),
            "dtype": LaunchConfiguration("dtype"),
        }, sim_time],
    )
    ik = Node(
        package="openvla_ros", executable="ik_node", name="ik_node", output="screen", namespace=namespace,
        parameters=[LaunchConfiguration("ik_config"), LaunchConfiguration("robot_config"), cell, sim_time],
    )
    return LaunchDescription(arguments + [sim, vla, ik])
