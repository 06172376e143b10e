"""The few rclpy calls whose API differs between Humble, Jazzy and Kilted, behind one interface.

Everything else the nodes use exists with the same signature from Humble on; test_ros_compat.py
scans the package for rclpy calls Humble lacks, so a new one has to come through here.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional


def has_post_set_parameters_callback(node) -> bool:
    """Iron and later run post-set callbacks after the parameters are stored; Humble has none."""
    return callable(getattr(node, "add_post_set_parameters_callback", None))


def add_parameter_callbacks(node, validate: Callable[[List[Any]], Any], apply: Callable[[List[Any]], None],
                            *, post_set: Optional[bool] = None) -> None:
    """Register `validate` (returns a SetParametersResult) and `apply` (runs once a change is accepted).

    Iron and later: `validate` as an on-set callback, `apply` as a post-set callback. Humble: one
    on-set callback that calls `apply` when `validate` accepted. Humble runs on-set callbacks
    newest first and applies the parameters once all accepted, so registered before any other
    on-set callback of the node, ours runs last and `apply` only sees changes that are stored.
    `post_set` forces one path (None: what the node's rclpy has).
    """
    if post_set is None:
        post_set = has_post_set_parameters_callback(node)
    if post_set:
        node.add_on_set_parameters_callback(validate)
        node.add_post_set_parameters_callback(apply)
        return

    def validate_then_apply(params):
        result = validate(params)
        if result.successful:
            apply(params)
        return result

    node.add_on_set_parameters_callback(validate_then_apply)


def subscription_event_callbacks(**callbacks):
    """rclpy's SubscriptionEventCallbacks: `rclpy.event_handler` from Iron on, `rclpy.qos_event` on
    Humble (still there later, but importing it warns)."""
    try:
        from rclpy.event_handler import SubscriptionEventCallbacks
    except ImportError:
        from rclpy.qos_event import SubscriptionEventCallbacks
    return SubscriptionEventCallbacks(**callbacks)
