"""The launch files run through the genuine `launch` / `launch_ros` API, where those can be imported.

They are not installable from the package index (a ROS machine has them: `colcon test` there runs
this file); here the module is skipped and test_launch_files.py checks the same files statically.
Each launch description is built by `PythonLaunchDescriptionSource`, its arguments are resolved
by `DeclareLaunchArgument`, and each `Node` expands its substitutions as `ros2 launch` would just
before starting the process. The parameter files and inline dictionaries it would pass are then
merged in order, as rclpy reads them, and must give the node a valid parameter set.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

launch = pytest.importorskip("launch")
launch_ros = pytest.importorskip("launch_ros.actions")

from openvla_ros.nodes.params import validate_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "openvla_ros"


@pytest.fixture
def package_share(tmp_path, monkeypatch):
    """An ament prefix holding this checkout's config/ and launch/, so FindPackageShare finds them."""
    prefix = tmp_path / "prefix"
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / PACKAGE).write_text("")
    share = prefix / "share" / PACKAGE
    share.mkdir()
    (share / "config").symlink_to(ROOT / "config")
    (share / "launch").symlink_to(ROOT / "launch")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    return share


def _node_matches(key: str, fqn: str) -> bool:
    """rclpy's match of a parameter file's node key against a node's fully qualified name."""
    import re

    key = key if key.startswith("/") else "/" + key
    pattern = key.replace("/**", "(/\\w+)*").replace("/*", "(/\\w+)")
    return re.fullmatch(pattern, fqn) is not None


def run_launch_file(name: str, **arguments) -> dict:
    """fully qualified node name -> (executable, merged parameters) for the nodes the file starts."""
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch_ros.actions import Node

    description = PythonLaunchDescriptionSource(str(ROOT / "launch" / name)).try_get_launch_description_without_context()
    context = LaunchContext()
    context.launch_configurations.update({k: str(v) for k, v in arguments.items()})
    started = {}
    for entity in description.entities:
        if isinstance(entity, DeclareLaunchArgument):
            entity.visit(context)  # the default, or an error for a missing required argument
        elif isinstance(entity, Node):
            if entity.condition is not None and not entity.condition.evaluate(context):
                continue
            entity._perform_substitutions(context)  # what Node.execute does before spawning
            # No namespace given: the node runs in "/" (launch_ros marks it unspecified).
            fqn = "/" + entity.node_name.replace("<node_namespace_unspecified>", "").strip("/")
            params = {}
            for argument, is_file in entity._Node__expanded_parameter_arguments or []:
                assert is_file, argument
                data = yaml.safe_load(Path(argument).read_text()) or {}
                for key, section in data.items():
                    if _node_matches(key, fqn):
                        params.update(section.get("ros__parameters", {}) or {})
            started[fqn] = (entity.node_executable, params)
    return started


def _params_table(executable: str):
    import importlib

    return importlib.import_module(f"openvla_ros.nodes.{executable}").PARAMS


def test_arm_launch_gives_both_nodes_the_base_frame_argument_and_valid_parameters(package_share):
    nodes = run_launch_file("openvla_arm.launch.py", checkpoint="/models/openvla-7b", base_frame="fr3_link0")
    assert sorted(nodes) == ["/ik_node", "/vla_node"]
    for fqn, (executable, params) in nodes.items():
        assert params["base_frame"] == "fr3_link0", fqn
        params.pop("use_sim_time")
        validate_all(_params_table(executable), params)
    assert nodes["/vla_node"][1]["checkpoint"] == "/models/openvla-7b"
    assert nodes["/ik_node"][1]["tip_frame"] == "panda_grasptarget"  # from the robot file


def test_arm_launch_without_ik_node_and_without_a_checkpoint(package_share):
    assert sorted(run_launch_file("openvla_arm.launch.py", checkpoint="x", use_ik_node="false")) == ["/vla_node"]
    with pytest.raises(Exception, match="checkpoint"):
        run_launch_file("openvla_arm.launch.py")


def test_sim_launch_starts_the_cell_with_the_cell_settings_last(package_share):
    nodes = run_launch_file("sim.launch.py", checkpoint="/tmp/tiny", real_time="false")
    assert sorted(nodes) == ["/ik_node", "/sim_node", "/vla_node"]
    assert nodes["/vla_node"][1]["blend_policy"] == "ensemble"  # sim_bringup.yaml over vla_node.yaml
    assert nodes["/ik_node"][1]["use_sim_urdf"] is True
    assert nodes["/vla_node"][1]["use_sim_time"] is True and nodes["/sim_node"][1]["real_time"] is False
    for fqn, (executable, params) in nodes.items():
        params.pop("use_sim_time", None)
        validate_all(_params_table(executable), params)


def test_a_namespace_argument_moves_every_node_and_the_parameter_files_still_apply(package_share):
    nodes = run_launch_file("sim.launch.py", checkpoint="/tmp/tiny", namespace="left_arm")
    assert sorted(nodes) == ["/left_arm/ik_node", "/left_arm/sim_node", "/left_arm/vla_node"]
    assert nodes["/left_arm/vla_node"][1]["blend_policy"] == "ensemble"
    assert nodes["/left_arm/ik_node"][1]["tip_frame"] == "panda_grasptarget"
