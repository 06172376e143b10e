"""Declare-once node parameters (openvla_ros.nodes.params) and config/vla_node.yaml.

Plain-Python validation and YAML loading run without ROS; the tests marked ``ros`` declare the
table on a real rclpy node (no spinning needed) to check start-up and runtime validation.
"""
import re
from pathlib import Path

import pytest
import yaml
from ros_helpers import rclpy_context, ros_env  # noqa: F401 - fixtures

from openvla_ros.nodes.params import ParamSpec, declare_parameters, load_yaml_parameters, validate_all
from openvla_ros.nodes.vla_node import NODE_NAME, PARAMS

CONFIG = Path(__file__).resolve().parents[1] / "config" / "vla_node.yaml"

RATE = ParamSpec("rate_hz", 100.0, "a rate", "Hz", min=1.0, max=1000.0)
COUNT = ParamSpec("count", 3, "a count", min=1, max=10)
MODE = ParamSpec("mode", "replace", "a mode", choices=("replace", "crossfade"))
FLAG = ParamSpec("flag", False, "a flag")
NAMES = ParamSpec("names", ["a", "b"], "some names")


@pytest.mark.parametrize("spec, value, needle", [
    (RATE, 0.5, r"'rate_hz'.*0\.5.*below the minimum 1\.0"),
    (RATE, 2000.0, r"'rate_hz'.*2000\.0.*above the maximum 1000\.0"),
    (RATE, float("nan"), r"'rate_hz'.*nan"),
    (RATE, float("inf"), r"'rate_hz'.*inf"),
    (RATE, "fast", r"'rate_hz'.*expected float.*'fast'"),
    (COUNT, 2.0, r"'count'.*expected int.*2\.0"),
    (COUNT, True, r"'count'.*expected int.*True"),
    (COUNT, 0, r"'count'.*0.*below the minimum 1"),
    (MODE, "blend", r"'mode'.*'blend'.*not one of \['replace', 'crossfade'\]"),
    (FLAG, "yes", r"'flag'.*expected bool.*'yes'"),
    (NAMES, "a,b", r"'names'.*expected a list.*'a,b'"),
])
def test_validation_errors_name_the_parameter_and_the_value(spec, value, needle):
    with pytest.raises(ValueError, match=needle):
        spec.validate(value)


def test_validation_converts_ints_for_floats_and_accepts_good_values():
    assert RATE.validate(100) == 100.0 and isinstance(RATE.validate(100), float)
    assert COUNT.validate(10) == 10
    assert MODE.validate("crossfade") == "crossfade"
    assert NAMES.validate(("x",)) == ["x"]
    assert RATE.describe() == "a rate [Hz]."
    assert MODE.describe() == "a mode. One of ['replace', 'crossfade']."


def test_validate_all_fills_defaults_and_rejects_unknown_names():
    specs = [RATE, COUNT, MODE]
    assert validate_all(specs, {"count": 5}) == {"rate_hz": 100.0, "count": 5, "mode": "replace"}
    assert validate_all(specs, {"use_sim_time": True})["count"] == 3
    with pytest.raises(ValueError, match=r"unknown parameters \['rte_hz'\]"):
        validate_all(specs, {"rte_hz": 10.0})


def test_yaml_loading_merges_the_wildcard_section_then_the_node_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "/**:\n  ros__parameters:\n    use_sim_time: true\n    base_frame: world\n    control_rate_hz: 50.0\n"
        "vla_node:\n  ros__parameters:\n    control_rate_hz: 200.0\n"
        "ik_node:\n  ros__parameters:\n    control_rate_hz: 5.0\n"
    )
    assert load_yaml_parameters(path, "vla_node") == {"use_sim_time": True, "base_frame": "world",
                                                      "control_rate_hz": 200.0}
    assert load_yaml_parameters(path, "ik_node")["control_rate_hz"] == 5.0
    assert load_yaml_parameters(path, "other_node") == {"use_sim_time": True, "base_frame": "world",
                                                        "control_rate_hz": 50.0}
    slashed = tmp_path / "slashed.yaml"
    slashed.write_text("/vla_node:\n  ros__parameters:\n    base_frame: tool0\n")
    assert load_yaml_parameters(slashed, "vla_node") == {"base_frame": "tool0"}
    with pytest.raises(ValueError, match="missing.yaml"):
        load_yaml_parameters(tmp_path / "missing.yaml", "vla_node")


def test_every_vla_node_parameter_is_in_the_config_file_and_vice_versa():
    values = load_yaml_parameters(CONFIG, NODE_NAME)
    names = [s.name for s in PARAMS]
    assert len(names) == len(set(names)), "a parameter is declared twice"
    assert sorted(values) == sorted(names)
    validated = validate_all(PARAMS, values)
    for spec in PARAMS:
        # ROS parameter types are strict: a float written as 100 would be an INTEGER and be refused.
        assert type(values[spec.name]) is spec.type, (spec.name, values[spec.name])
        assert validated[spec.name] == values[spec.name]


def test_every_parameter_line_in_the_config_file_carries_a_comment():
    names = {s.name for s in PARAMS}
    for line in CONFIG.read_text().splitlines():
        match = re.match(r"\s+(\w+):\s*\S", line)
        if match and match.group(1) in names:
            assert "#" in line, f"parameter line without a comment: {line!r}"


def test_config_file_is_plain_yaml_with_one_node_section_for_any_namespace():
    data = yaml.safe_load(CONFIG.read_text())
    key = f"/**/{NODE_NAME}"  # matches /vla_node and /left_arm/vla_node alike
    assert list(data) == [key] and list(data[key]) == ["ros__parameters"]


# ---------------------------------------------------------------------------------- with rclpy
def _node(context, overrides=()):
    import rclpy
    from rclpy.parameter import Parameter

    params = [Parameter(name, value=value) for name, value in overrides]
    return rclpy.create_node("params_test", context=context, parameter_overrides=params)


@pytest.mark.ros
def test_declared_parameters_take_overrides_and_reject_bad_start_values(rclpy_context):
    node = _node(rclpy_context, [("rate_hz", 250.0), ("mode", "crossfade")])
    try:
        values = declare_parameters(node, [RATE, COUNT, MODE, FLAG, NAMES])
        assert values == {"rate_hz": 250.0, "count": 3, "mode": "crossfade", "flag": False, "names": ["a", "b"]}
        descriptor = node.describe_parameter("rate_hz")
        assert descriptor.description == "a rate [Hz]."
        assert descriptor.floating_point_range[0].from_value == 1.0
    finally:
        node.destroy_node()

    for overrides, needle in ((("mode", "blend"),), r"'mode'.*'blend'"), \
                             ((("rate_hz", 0.5),), r"'rate_hz'.*0\.5"), \
                             ((("rate_hz", 100),), r"'rate_hz'.*100.*INTEGER.*DOUBLE"):
        node = _node(rclpy_context, overrides)
        try:
            with pytest.raises(ValueError, match=needle):
                declare_parameters(node, [RATE, MODE])
        finally:
            node.destroy_node()


# post_set=False is the path Humble takes (it has no post-set parameter callbacks), run here on
# this rclpy's node; None lets the installed rclpy decide.
@pytest.mark.ros
@pytest.mark.parametrize("post_set", [None, False], ids=["installed-rclpy", "humble-path"])
def test_runtime_changes_are_validated_and_update_the_live_values(rclpy_context, post_set):
    from rclpy.parameter import Parameter

    changes = []
    node = _node(rclpy_context)
    try:
        frozen = ParamSpec("frozen", 1.0, "read-only", read_only=True)
        values = declare_parameters(node, [RATE, MODE, frozen], on_change=lambda n, v: changes.append((n, v)),
                                    post_set=post_set)
        result = node.set_parameters([Parameter("mode", value="blend")])[0]
        assert not result.successful and "'blend'" in result.reason and "'mode'" in result.reason
        assert values["mode"] == "replace" and changes == []
        result = node.set_parameters([Parameter("rate_hz", value=5000.0)])[0]
        assert not result.successful and "5000" in result.reason
        assert node.set_parameters([Parameter("frozen", value=2.0)])[0].successful is False
        assert node.set_parameters([Parameter("mode", value="crossfade")])[0].successful
        assert values["mode"] == "crossfade" and changes == [("mode", "crossfade")]
        assert node.get_parameter("mode").value == "crossfade"
    finally:
        node.destroy_node()
