"""`colcon build` for real, and every node started from the install space as `ros2 run` would.

colcon (colcon-core, colcon-ros, colcon-python-setup-py, pinned in requirements.lock) builds the
package into a temporary install space. The layout a ROS machine relies on is checked, and each
node is started from `lib/openvla_ros/<node>` in the environment `install/setup.sh` makes, with
the parameter files from `share/openvla_ros/config`: it must reach the graph and do its first
work (publish, offer its services), and stop with exit status 0 on SIGINT (what `ros2 launch` and
Ctrl-C send). The nodes run on this venv's rclpy: Kilted in `.venv`, Jazzy in `.venv-jazzy`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import probe, rclpy_context, ros_env, wait_until  # noqa: F401

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "openvla_ros"
NODES = ["vla_node", "ik_node", "sim_node", "bag_player", "recorder"]
START_TIMEOUT = 120.0  # s; imports torch / pybullet on a loaded 2-core machine
STOP_TIMEOUT = 30.0


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.fail(f"{name} is not installed in {exe.parent}: it is pinned in requirements.lock (make setup)")
    return str(exe)


@pytest.fixture(scope="session")
def install_space(tmp_path_factory):
    work = tmp_path_factory.mktemp("colcon")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [_tool("colcon"), "--log-base", str(work / "log"), "build", "--base-paths", str(ROOT),
         "--packages-select", PACKAGE, "--build-base", str(work / "build"), "--install-base", str(work / "install"),
         "--event-handlers", "console_direct-"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work / "install"


def _setup_env(install: Path) -> dict:
    """The environment after `. install/setup.sh` (run by sh, as a user's shell would)."""
    script = f". '{install / 'setup.sh'}' && env -0"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, check=True, timeout=60).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def test_colcon_installs_the_layout_a_ros_machine_needs(install_space):
    prefix = install_space / PACKAGE
    share = prefix / "share" / PACKAGE
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    assert (share / "package.xml").is_file()
    assert sorted(p.name for p in (share / "launch").iterdir()) == sorted(p.name for p in (ROOT / "launch").glob("*.launch.py"))
    installed_config = sorted(p.relative_to(share / "config").as_posix() for p in (share / "config").rglob("*.yaml"))
    assert installed_config == sorted(p.relative_to(ROOT / "config").as_posix() for p in (ROOT / "config").rglob("*.yaml"))
    for node in NODES:
        exe = prefix / "lib" / PACKAGE / node
        assert exe.is_file() and os.access(exe, os.X_OK), exe


def test_the_install_space_is_what_sourcing_setup_sh_puts_first(install_space):
    env = _setup_env(install_space)
    code = ("import openvla_ros; from ament_index_python.packages import get_package_share_directory as g; "
            "print(openvla_ros.__file__); print(g('openvla_ros'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=install_space, timeout=120).stdout.split()
    assert out[0].startswith(str(install_space)), out  # not the source tree's editable install
    assert out[1] == str(install_space / PACKAGE / "share" / PACKAGE)


def _write_bag(path: Path) -> Path:
    from openvla_ros.eval.bag_writer import BagWriter

    with BagWriter(path, "mcap") as w:
        w.write_string("/vla/instruction", 0.95, "pick up the screw")
        for i in range(10):
            w.write_image("/camera/image_raw", 1.0 + 0.1 * i, np.full((6, 8, 3), 10 * i, np.uint8))
    return path


def _node_command(node: str, share: Path, tmp_path: Path, tiny_checkpoint) -> tuple[list[str], list[str]]:
    """ROS arguments for `node` and the topics/services that show it is working."""
    config = share / "config"
    files = {"ik_node": [config / "ik_node.yaml", config / "robots" / "panda.yaml"]}.get(node, [config / f"{node}.yaml"])
    args = ["--ros-args"]
    for f in files:
        args += ["--params-file", str(f)]
    extra = {
        "vla_node": [f"checkpoint:={tiny_checkpoint}"],
        "ik_node": ["use_sim_urdf:=true"],
        "sim_node": [],
        "bag_player": [f"bag:={_write_bag(tmp_path / 'bag')}", "loop:=true"],
        "recorder": ["topics:=['/vla/instruction:std_msgs/msg/String']", f"out_dir:={tmp_path / 'bags'}"],
    }[node]
    for item in extra:
        args += ["-p", item]
    return args


def _readiness(node: str):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image, JointState

    return {
        "vla_node": ("topic", DiagnosticArray, "/vla/status"),
        "ik_node": ("topic", DiagnosticArray, "/ik_node/status"),
        "sim_node": ("topic", JointState, "/joint_states"),
        "bag_player": ("topic", Image, "/camera/image_raw"),
        "recorder": ("service", None, "/recorder/start"),
    }[node]


@pytest.mark.parametrize("node", NODES)
def test_each_installed_node_starts_like_ros2_run_works_and_stops_cleanly(install_space, probe, tmp_path,
                                                                        tiny_checkpoint, node):
    from std_srvs.srv import Trigger

    prefix = install_space / PACKAGE
    env = _setup_env(install_space)
    kind, msg_type, name = _readiness(node)
    if kind == "topic":
        probe.record(msg_type, name)
    command = [str(prefix / "lib" / PACKAGE / node)] + _node_command(node, prefix / "share" / PACKAGE, tmp_path,
                                                                     tiny_checkpoint)
    log = tmp_path / f"{node}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        if kind == "topic":
            ready = probe.wait_for(name, timeout=START_TIMEOUT) is not None
        else:
            client = probe.node.create_client(Trigger, name)
            ready = client.wait_for_service(timeout_sec=START_TIMEOUT)
        assert ready, f"{node} never showed up on {name}:\n" + log.read_text()[-3000:]
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGINT)
        code = process.wait(STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert code == 0, f"{node} exited with {code}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]


# ------------------------------------------------------------------------- package.xml (static)
# rosdep key of each third-party module the package imports, checked against ros/rosdistro:
# rosdep/python.yaml for the python3-* keys, the humble/jazzy/kilted distribution.yaml files for
# ROS packages (pinocchio is one there).
ROSDEP_KEY = {
    "rclpy": "rclpy", "rcl_interfaces": "rcl_interfaces", "builtin_interfaces": "builtin_interfaces",
    "sensor_msgs": "sensor_msgs", "geometry_msgs": "geometry_msgs", "std_msgs": "std_msgs", "std_srvs": "std_srvs",
    "trajectory_msgs": "trajectory_msgs", "diagnostic_msgs": "diagnostic_msgs", "rosgraph_msgs": "rosgraph_msgs",
    "launch": "launch", "launch_ros": "launch_ros", "ament_index_python": "ament_index_python",
    "pinocchio": "pinocchio",
    "numpy": "python3-numpy", "yaml": "python3-yaml", "cv2": "python3-opencv", "PIL": "python3-pil",
    "matplotlib": "python3-matplotlib", "h5py": "python3-h5py", "tqdm": "python3-tqdm",
    "transformers": "python3-transformers-pip", "timm": "python3-timm-pip",
    "rosbags": "python3-rosbags-pip", "pybullet": "python3-pybullet-pip", "pybullet_data": "python3-pybullet-pip",
    "onnxruntime": "python3-onnxruntime-pip", "psutil": "python3-psutil",
}
# Installed with pip (package.xml says why in a comment): no rosdep key exists, or (torch,
# torchvision) the key's apt build is CPU-only. apsw comes with rosbags.
NO_ROSDEP_KEY = {"safetensors", "tokenizers", "accelerate", "peft", "onnx", "onnxscript", "bitsandbytes", "tensorrt",
                 "torchao", "pyarrow", "av", "tfrecord", "wandb", "apsw", "torch", "torchvision"}


def _third_party_imports() -> dict[str, str]:
    import ast

    found = {}
    for path in sorted((ROOT / "openvla_ros").rglob("*.py")) + sorted((ROOT / "launch").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("openvla_ros", "__future__"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_package_xml_lists_every_imported_dependency_with_its_rosdep_key():
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "package.xml").getroot()
    exec_keys = {e.text for e in root.iter("exec_depend")}
    test_keys = {e.text for e in root.iter("test_depend")}
    imports = _third_party_imports()
    unknown = {m: f for m, f in imports.items() if m not in ROSDEP_KEY and m not in NO_ROSDEP_KEY}
    assert unknown == {}, f"imports with no rosdep key decided (add it to package.xml and ROSDEP_KEY): {unknown}"
    missing = {m: ROSDEP_KEY[m] for m in imports if m in ROSDEP_KEY and ROSDEP_KEY[m] not in exec_keys}
    assert missing == {}, f"package.xml lacks exec_depend for: {missing}"
    assert exec_keys <= set(ROSDEP_KEY.values()), f"unverified keys: {exec_keys - set(ROSDEP_KEY.values())}"
    assert {"python3-pytest", "python3-pytest-timeout"} <= test_keys  # pytest.ini passes --timeout
