"""The package must run on Humble (rclpy 3.3, Python 3.10), which cannot be installed here.

Checked statically instead:

* no rclpy API Humble lacks: an AST scan of the package's sources against a list of rclpy names
  that are newer than Humble. The list was made by diffing the public functions, classes, methods
  and their arguments of ros2/rclpy's `humble` branch (commit b488272b1ba8, 2024-11-25) against
  its `jazzy` and `rolling` branches, `rclpy/rclpy/**/*.py`. Names too generic to flag by
  attribute alone (`Subscription.callback`, `Client.service_name`) are left out; context-manager
  use of nodes/executors (`with node:`, Jazzy+) cannot be seen without types and is not used.
  Only `openvla_ros/nodes/ros_compat.py` may use these names, behind a fallback.
* no Python newer than 3.10: `vermin -t=3.10-` over the package, launch files and setup.py.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "openvla_ros" / "nodes" / "ros_compat.py"

# rclpy modules added after Humble.
POST_HUMBLE_MODULES = {
    "rclpy.clock_type", "rclpy.destroyable", "rclpy.event_handler", "rclpy.logging_service",
    "rclpy.parameter_client", "rclpy.parameter_event_handler", "rclpy.service_introspection",
    "rclpy.type_description_service", "rclpy.type_hash",
}
# Functions, methods and classes added after Humble (attribute or imported name).
POST_HUMBLE_NAMES = {
    # rclpy.node.Node
    "add_post_set_parameters_callback", "add_pre_set_parameters_callback",
    "remove_post_set_parameters_callback", "remove_pre_set_parameters_callback",
    "count_clients", "count_services", "get_fully_qualified_node_names", "list_parameters", "wait_for_node",
    # rclpy.client.Client / rclpy.service.Service
    "configure_introspection",
    # rclpy.subscription
    "get_publisher_count", "MessageInfo",
    # rclpy.logging, rclpy.parameter
    "get_logger_level", "get_parameter_value", "parameter_dict_from_yaml_file",
    # rclpy (top level), rclpy.context
    "try_shutdown", "InitContextManager", "track_node", "untrack_node",
    # rclpy.timer, rclpy.clock, rclpy.duration, rclpy.time
    "TimerInfo", "ClockChange", "TimeJumpDictionary", "DurationType",
}
# Keyword arguments added after Humble, by the callable's attribute name.
POST_HUMBLE_KEYWORDS = {
    "create_timer": {"autostart"},  # Node.create_timer, Jazzy
    "Timer": {"autostart"},
    "create_node": {"enable_logger_service"},  # rclpy.create_node, Iron
    "Node": {"enable_logger_service"},
    "call": {"timeout_sec"},  # Client.call, Iron
    "set_logger_level": {"detailed_error"},
}


def package_sources() -> list[Path]:
    files = sorted((ROOT / "openvla_ros").rglob("*.py")) + sorted((ROOT / "launch").glob("*.py"))
    return [f for f in files if f != COMPAT]


def post_humble_uses(source: str, filename: str = "<source>") -> list[str]:
    """Each use of an rclpy API newer than Humble in `source`, as 'file:line: what'."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in POST_HUMBLE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rclpy"):
            if node.module in POST_HUMBLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            for alias in node.names:
                if f"{node.module}.{alias.name}" in POST_HUMBLE_MODULES or alias.name in POST_HUMBLE_NAMES:
                    found.append(f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in POST_HUMBLE_NAMES:
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            for kw in node.keywords:
                if kw.arg in POST_HUMBLE_KEYWORDS.get(name, ()):
                    found.append(f"{where}: {name}(..., {kw.arg}=...)")
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:  # `with rclpy.init():` returns a context manager from Kilted on
                call = item.context_expr
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "init" \
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == "rclpy":
                    found.append(f"{where}: with rclpy.init()")
    return found


def test_the_package_uses_no_rclpy_api_that_humble_lacks():
    uses = []
    for path in package_sources():
        uses += post_humble_uses(path.read_text(), str(path.relative_to(ROOT)))
    assert uses == [], "rclpy API newer than Humble (route it through nodes/ros_compat.py):\n" + "\n".join(uses)


def test_the_humble_api_scan_finds_each_kind_of_newer_call():
    source = "\n".join([
        "from rclpy.event_handler import SubscriptionEventCallbacks",
        "import rclpy.type_hash",
        "from rclpy.timer import TimerInfo",
        "node.add_post_set_parameters_callback(cb)",
        "node.create_timer(0.1, cb, autostart=False)",
        "client.call(request, timeout_sec=1.0)",
        "with rclpy.init():\n    pass",
        "node.create_timer(0.1, cb)",  # fine on Humble
        "client.wait_for_service(timeout_sec=1.0)",  # fine on Humble
        "from rclpy.qos import QoSProfile",  # fine on Humble
    ])
    uses = post_humble_uses(source, "sample.py")
    assert sorted(int(u.split(":")[1]) for u in uses) == [1, 2, 3, 4, 5, 6, 7], uses


def test_the_compat_module_is_where_the_newer_parameter_callback_is_used():
    assert any("add_post_set_parameters_callback" in u for u in post_humble_uses(COMPAT.read_text()))


def _vermin():
    exe = Path(sys.executable).with_name("vermin")
    if exe.exists():
        return str(exe)
    found = shutil.which("vermin")
    if found is None:
        pytest.fail("vermin is not installed: it is pinned in requirements.lock (make setup installs it)")
    return found


def _vermin_310(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([_vermin(), "-t=3.10-", "--violations", "--no-tips", *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


def test_the_package_needs_no_python_newer_than_3_10():
    result = _vermin_310(ROOT / "openvla_ros", ROOT / "launch", ROOT / "setup.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_python_version_check_rejects_3_11_syntax_and_stdlib(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("import tomllib\n\ntry:\n    pass\nexcept* ValueError:\n    pass\n")
    result = _vermin_310(newer)
    assert result.returncode != 0 and "tomllib" in result.stdout and "except*" in result.stdout, result.stdout


def test_the_package_compiles_with_python_3_10_where_one_is_installed():
    """vermin knows the features; Python 3.10's own parser is the final word on syntax (skips without one)."""
    import glob

    candidates = [shutil.which("python3.10")] + sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.10*/bin/python3.10")))
    exe = None
    for candidate in filter(None, candidates):  # a pyenv shim exists but fails when 3.10 is not selected
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                               capture_output=True, text=True, timeout=60)
        if probe.stdout.strip() == "True":
            exe = candidate
            break
    if exe is None:
        pytest.skip("no Python 3.10 interpreter (PATH, ~/.pyenv/versions)")
    files = [str(p) for p in sorted((ROOT / "openvla_ros").rglob("*.py")) + sorted((ROOT / "launch").glob("*.py"))]
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\n"
    result = subprocess.run([exe, "-c", code, *files], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
