"""Declare-once ROS parameters: one table per node with type, description, unit and validation.

`ParamSpec.validate` is plain Python (tested without ROS); `declare_parameters(node, specs)` declares
every parameter with a descriptor (description + unit, numeric range, allowed values), validates the
values that came from YAML/launch, and rejects invalid runtime changes with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any  # its Python type is the parameter type (bool, int, float, str, list[str], list[float])
    description: str
    unit: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    read_only: bool = False
    # Element type of a list parameter. Needed when the default is empty (e.g. "[] = take the
    # URDF's limits"): ROS types an empty list as a string array otherwise, and a YAML list of
    # floats would then be rejected.
    item_type: type | None = None

    @property
    def list_item_type(self) -> type:
        if self.item_type is not None:
            return self.item_type
        return type(self.default[0]) if self.default else str

    @property
    def type(self) -> type:
        return type(self.default)

    def describe(self) -> str:
        unit = f" [{self.unit}]" if self.unit else ""
        choices = f" One of {list(self.choices)}." if self.choices else ""
        return f"{self.description}{unit}.{choices}"

    def validate(self, value):
        """Return `value` converted to the declared type, or raise ValueError naming the parameter."""
        expected = self.type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is list:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"parameter {self.name!r}: expected a list, got {value!r}")
            value = list(value)
            item = self.list_item_type
            if item is float:
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                    raise ValueError(f"parameter {self.name!r}: expected a list of finite numbers, got {value!r}")
                value = [float(v) for v in value]
            elif not all(isinstance(v, item) for v in value):
                raise ValueError(f"parameter {self.name!r}: expected a list of {item.__name__}, got {value!r}")
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"parameter {self.name!r}: expected {expected.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"parameter {self.name!r}: must be finite, got {value!r}")
        if self.min is not None and value < self.min:
            raise ValueError(f"parameter {self.name!r}: {value!r} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ValueError(f"parameter {self.name!r}: {value!r} is above the maximum {self.max}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {self.name!r}: {value!r} is not one of {list(self.choices)}")
        return value


def validate_all(specs: Sequence[ParamSpec], values: dict) -> dict:
    """Validate a full set of values (e.g. a YAML file's) against the table; unknown names are errors."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(values) - set(by_name) - {"use_sim_time"})
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; known: {sorted(by_name)}")
    return {s.name: s.validate(values.get(s.name, s.default)) for s in specs}


def load_yaml_parameters(path, node_name: str) -> dict:
    """`ros__parameters` for `node_name` in a ROS 2 parameter file (also the `/**` and `/**/node_name`
    wildcard sections, the latter how this package's files address a node in any namespace)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"parameter file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    params: dict = {}
    for key in ("/**", f"/**/{node_name}", node_name, f"/{node_name}"):
        section = data.get(key)
        if isinstance(section, dict):
            params.update(section.get("ros__parameters", {}) or {})
    return params


def declare_parameters(node, specs: Sequence[ParamSpec],
                       on_change: Callable[[str, Any], None] | None = None, *, post_set: bool | None = None) -> dict:
    """Declare every spec on an rclpy node; returns the validated values. Invalid start values raise.

    The returned dict stays live: an accepted runtime change (``ros2 param set`` on a parameter
    that is not read-only) updates it, then ``on_change(name, value)`` runs. Invalid changes are
    rejected with the reason from `ParamSpec.validate`. Types are strict, as in rclcpp: a float
    parameter given an integer (``100`` instead of ``100.0``) is an error naming the parameter.
    ``post_set`` picks the callback path (see `ros_compat.add_parameter_callbacks`; None: the
    node's rclpy decides).
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
    from rclpy.exceptions import ParameterException
    from rclpy.parameter import Parameter

    from .ros_compat import add_parameter_callbacks

    values = {}
    for spec in specs:
        descriptor = ParameterDescriptor(description=spec.describe(), read_only=spec.read_only)
        if spec.choices:
            descriptor.additional_constraints = f"one of {list(spec.choices)}"
        if spec.type in (int, float) and (spec.min is not None or spec.max is not None):
            lo = spec.min if spec.min is not None else (-2**63 if spec.type is int else -math.inf)
            hi = spec.max if spec.max is not None else (2**63 - 1 if spec.type is int else math.inf)
            if spec.type is int:
                descriptor.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
        try:
            if spec.type is list:
                ptype = {str: Parameter.Type.STRING_ARRAY, float: Parameter.Type.DOUBLE_ARRAY,
                         int: Parameter.Type.INTEGER_ARRAY, bool: Parameter.Type.BOOL_ARRAY}[spec.list_item_type]
                param = node.declare_parameter(spec.name, spec.default if spec.default else ptype, descriptor)
            else:
                param = node.declare_parameter(spec.name, spec.default, descriptor)
        except ParameterException as exc:  # wrong type or out of the descriptor's range
            detail = exc.args[0] if exc.args else str(exc)
            raise ValueError(f"parameter {spec.name!r}: {detail}") from None
        values[spec.name] = spec.validate(param.value if param.value is not None else spec.default)

    by_name = {s.name: s for s in specs}

    def on_set(params):
        for p in params:
            spec = by_name.get(p.name)
            if spec is None:
                continue
            try:
                spec.validate(p.value)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def after_set(params):
        for p in params:
            spec = by_name.get(p.name)
            if spec is None:
                continue
            values[p.name] = spec.validate(p.value)
            if on_change is not None:
                on_change(p.name, values[p.name])

    add_parameter_callbacks(node, on_set, after_set, post_set=post_set)
    return values
