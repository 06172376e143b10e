"""Static checks of every launch/*.launch.py (ros2 launch is not installable here) and of config/*.yaml.

For each launch file: it parses; every LaunchConfiguration it reads is declared with
DeclareLaunchArgument; every executable it starts is a console script in setup.py whose function
exists; every config file it names exists; the parameter names it sets inline, and those in the
config files, are declared in that node's PARAMS table.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from openvla_ros.nodes.bringup import read_bringup_file

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
CONFIG_FILES = sorted((ROOT / "config").rglob("*.yaml"))
ALWAYS_ALLOWED = {"use_sim_time"}


def console_scripts() -> dict:
    """name -> "module:function" from setup.py's console_scripts strings."""
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+)\s*=\s*([\w.]+:\w+)"', text))


def call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def string_arg(node: ast.Call, position: int = 0, keyword: str | None = None):
    if keyword:
        for kw in node.keywords:
            if kw.arg == keyword and isinstance(kw.value, ast.Constant):
                return kw.value.value
    if len(node.args) > position and isinstance(node.args[position], ast.Constant):
        return node.args[position].value
    return None


def node_modules() -> dict:
    """NODE_NAME -> module, for every console script of setup.py in openvla_ros.nodes."""
    found = {}
    for target in console_scripts().values():
        module_name = target.split(":")[0]
        if module_name.startswith("openvla_ros.nodes."):
            module = importlib.import_module(module_name)
            found[module.NODE_NAME] = module
    return found


def declared_params(node_name: str) -> set:
    return {s.name for s in node_modules()[node_name].PARAMS} | ALWAYS_ALLOWED


class LaunchFile:
    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)]

    def declared_arguments(self) -> set:
        return {string_arg(c, 0, "name") for c in self.calls if call_name(c) == "DeclareLaunchArgument"}

    def used_arguments(self) -> set:
        return {string_arg(c, 0, "variable_name") for c in self.calls if call_name(c) == "LaunchConfiguration"}

    def nodes(self) -> list:
        return [c for c in self.calls if call_name(c) == "Node"]

    def config_files(self) -> list:
        """Paths under config/ named as PathJoinSubstitution([config, "a", "b.yaml"]), where `config` is
        PathJoinSubstitution([FindPackageShare("openvla_ros"), "config"])."""
        found = []
        for c in self.calls:
            if call_name(c) == "PathJoinSubstitution" and c.args and isinstance(c.args[0], ast.List):
                elts = c.args[0].elts
                if elts and isinstance(elts[0], ast.Name) and elts[0].id == "config":
                    parts = [a.value for a in elts[1:] if isinstance(a, ast.Constant)]
                    if parts and parts[-1].endswith(".yaml"):
                        found.append("/".join(parts))
        return found

    def named_dicts(self) -> dict:
        """`name = {...}` assignments (parameter dicts shared by several nodes)."""
        return {t.id: n.value for n in ast.walk(self.tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                for t in n.targets if isinstance(t, ast.Name)}

    def inline_parameters(self, node_call: ast.Call) -> dict:
        """name -> value expression of the parameters a Node sets inline (dicts, or names of dicts)."""
        found = {}
        named = self.named_dicts()
        for kw in node_call.keywords:
            if kw.arg == "parameters" and isinstance(kw.value, ast.List):
                for element in kw.value.elts:
                    if isinstance(element, ast.Name) and element.id in named:
                        element = named[element.id]
                    if isinstance(element, ast.Dict):
                        found.update({k.value: v for k, v in zip(element.keys, element.values)
                                      if isinstance(k, ast.Constant)})
        return found


def launch_argument_of(value: ast.AST):
    """The launch argument a parameter value is, directly or through ParameterValue(...), or None."""
    if isinstance(value, ast.Call) and call_name(value) == "ParameterValue" and value.args:
        value = value.args[0]
    if isinstance(value, ast.Call) and call_name(value) == "LaunchConfiguration":
        return string_arg(value, 0, "variable_name")
    return None


def node_inline_parameters(node_call: ast.Call, launch: "LaunchFile | None" = None) -> set:
    if launch is not None:
        return set(launch.inline_parameters(node_call))
    names = set()
    for kw in node_call.keywords:
        if kw.arg == "parameters" and isinstance(kw.value, ast.List):
            for element in kw.value.elts:
                if isinstance(element, ast.Dict):
                    names |= {k.value for k in element.keys if isinstance(k, ast.Constant)}
    return names


def test_there_are_launch_files_and_setup_py_has_the_node_scripts():
    names = [p.name for p in LAUNCH_FILES]
    assert "sim.launch.py" in names and len(names) >= 2
    scripts = console_scripts()
    assert "openvla-ros" in scripts


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_arguments_executables_configs_and_parameters(path):
    launch = LaunchFile(path)
    used, declared = launch.used_arguments(), launch.declared_arguments()
    assert None not in used, "LaunchConfiguration with a non-literal name"
    assert used <= declared, f"{path.name}: LaunchConfiguration of undeclared arguments {sorted(used - declared)}"
    unused = declared - used
    assert not unused, f"{path.name}: declared but never used: {sorted(unused)}"

    scripts = console_scripts()
    assert launch.nodes(), f"{path.name} starts no node"
    for node in launch.nodes():
        executable = string_arg(node, keyword="executable")
        assert string_arg(node, keyword="package") == "openvla_ros"
        assert executable in scripts, f"{path.name}: executable {executable!r} is not a console script in setup.py"
        module, function = scripts[executable].split(":")
        assert callable(getattr(importlib.import_module(module), function))
        assert node_modules()[executable].__name__ == module  # the executable is named after the node
        inline = node_inline_parameters(node, launch)
        unknown = inline - declared_params(executable)
        assert not unknown, f"{path.name}: {executable} has no parameters {sorted(unknown)}"

    configs = launch.config_files()
    assert configs, f"{path.name} names no config file"
    for rel in configs:
        assert (ROOT / "config" / rel).is_file(), f"{path.name}: config/{rel} does not exist"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_a_launch_argument_setting_a_parameter_sets_it_on_every_node_that_has_it(path):
    """e.g. base_frame: vla_node stamps its twists with it and ik_node refuses twists in any other frame."""
    launch = LaunchFile(path)
    nodes = {string_arg(n, keyword="executable"): launch.inline_parameters(n) for n in launch.nodes()}
    for executable, params in nodes.items():
        for name, value in params.items():
            argument = launch_argument_of(value)
            if argument != name:
                continue
            for other, other_params in nodes.items():
                if name in declared_params(other) - ALWAYS_ALLOWED:
                    assert launch_argument_of(other_params.get(name, ast.Constant(None))) == name, \
                        f"{path.name}: argument {name!r} sets {executable}'s {name} but not {other}'s"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_find_the_package_share_through_substitutions(path):
    """Resolved when the launch description runs (FindPackageShare), not at import with os.path."""
    launch = LaunchFile(path)
    names = {call_name(c) for c in launch.calls}
    assert "get_package_share_directory" not in names and "join" not in names
    assert "FindPackageShare" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(ROOT / "config").as_posix())
def test_config_file_parameters_are_declared_by_their_nodes(path):
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict)
    for section, body in data.items():
        assert isinstance(body, dict) and set(body) == {"ros__parameters"}, f"{path.name}: bad section {section!r}"
        if section != "bringup" and section != "/**":
            # A node in any namespace: `ros2 launch ... namespace:=left_arm` must still apply it.
            assert section.startswith("/**/"), f"{path.name}: section {section!r} is not '/**/<node>'"
        name = section.removeprefix("/**/").lstrip("/")
        if name == "bringup":
            read_bringup_file(path)  # raises on unknown nodes, keys or missing files
            continue
        modules = node_modules()
        assert name in modules or name == "**", f"{path.name}: section {section!r} is no node of this package"
        keys = set(body["ros__parameters"] or {})
        allowed = declared_params(name) if name in modules else ALWAYS_ALLOWED
        assert keys <= allowed, f"{path.name}: {name} has no parameters {sorted(keys - allowed)}"
        if name in modules:
            specs = {s.name: s for s in modules[name].PARAMS}
            for key, value in body["ros__parameters"].items():
                if key in specs and value != []:  # [] = "not set" for list parameters
                    specs[key].validate(value)


def test_the_checker_catches_undeclared_arguments_unknown_executables_and_parameters(tmp_path):
    bad = tmp_path / "bad.launch.py"
    bad.write_text(
        "from launch.substitutions import LaunchConfiguration\n"
        "def generate_launch_description():\n"
        "    x = LaunchConfiguration('nope')\n"
        "    Node(package='openvla_ros', executable='ik_node', parameters=[{'rte_hz': 1.0}])\n")
    launch = LaunchFile(bad)
    assert launch.used_arguments() - launch.declared_arguments() == {"nope"}
    from openvla_ros.nodes.ik_node import PARAMS

    assert node_inline_parameters(launch.nodes()[0]) - {s.name for s in PARAMS} == {"rte_hz"}
