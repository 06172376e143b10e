"""Message types for bags: the definitions a bag stores, ``.msg`` text, and the distributions' stores.

rosbag2 bags (metadata version >= 4, and every mcap) and ROS 1 bags store the definition of each
topic's message type. `bag_typestore` builds a `rosbags` type store from those definitions on top
of a distribution's built-in types, so a bag recorded with a lab's own message package reads here
without that package. `register_msg_definitions` does the same for a writer from ``.msg`` text, and
`find_msg_definition` looks a type's ``.msg`` file up in the installed ROS packages
(``AMENT_PREFIX_PATH``), which is how a recorder subscribed to a custom type can store it.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

# Built-in scalar and string types of the .msg language (never looked up as message files).
_PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
               "uint32", "int64", "uint64", "string", "wstring", "time", "duration"}


class MessageTypeError(ValueError):
    """A message definition that cannot be parsed or resolved; the message names the type."""


def _base_store(name: str):
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores(name))


def _types_of_connection(msgdef, msgtype: str) -> dict:
    """Parse trees of the types one connection's stored definition holds ({} when it stores none)."""
    from rosbags.interfaces import MessageDefinitionFormat
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    if msgdef is None or msgdef.format == MessageDefinitionFormat.NONE or not msgdef.data:
        return {}
    if msgdef.format == MessageDefinitionFormat.MSG:
        return dict(get_types_from_msg(msgdef.data, msgtype))
    sep = "=" * 80 + "\n"
    types: dict = {}
    if msgdef.data.startswith(f"{sep}IDL: "):
        for block in msgdef.data.split(sep)[1:]:
            _, idl = block.split("\n", 1)
            types.update(get_types_from_idl(idl))
    else:
        types.update(get_types_from_idl(msgdef.data))
    return types


@lru_cache(maxsize=32)
def _merged_store(base: str, definitions: tuple[tuple[str, str, str], ...]):
    """A store with the bag's definitions first and `base`'s types for everything they leave out."""
    from rosbags.interfaces import MessageDefinition, MessageDefinitionFormat
    from rosbags.typesys import Stores, get_typestore

    bag_types: dict = {}
    for msgtype, fmt, data in definitions:
        bag_types.update(_types_of_connection(MessageDefinition(MessageDefinitionFormat(fmt), data), msgtype))
    store = get_typestore(Stores.EMPTY)
    if bag_types:
        store.register(bag_types)
    builtin = _base_store(base)
    store.register({k: v for k, v in builtin.fielddefs.items() if k not in store.fielddefs})
    return store


def bag_typestore(connections: Iterable, base: str):
    """A type store for a bag's `connections`: their stored definitions, then the `base` store's types.

    `base` is a `rosbags.typesys.Stores` value (``ros2_kilted``, ``ros1_noetic``, ...). Where the bag
    and the distribution define a type differently, the bag's definition is the one its bytes follow.
    """
    definitions = []
    for c in connections:
        msgdef = getattr(c, "msgdef", None)
        if msgdef is None or not msgdef.data:
            continue
        definitions.append((c.msgtype, msgdef.format.value, msgdef.data))
    try:
        return _merged_store(base, tuple(sorted(set(definitions))))
    except Exception as exc:  # rosbags raises parser and type-system errors of several classes
        types = sorted({d[0] for d in definitions})
        raise MessageTypeError(f"the message definitions stored in the bag ({types}) do not parse: {exc}") from exc


def msg_dependencies(store, msgtype: str) -> set[str]:
    """Message types `msgtype`'s fields name that `store` does not know yet."""
    missing = set()
    for _, (kind, detail) in store.fielddefs[msgtype][1]:
        names = []
        if kind.name == "NAME":
            names.append(detail)
        elif kind.name in ("ARRAY", "SEQUENCE") and detail[0][0].name == "NAME":
            names.append(detail[0][1])
        for name in names:
            if name not in store.fielddefs and name.split("/")[-1] not in _PRIMITIVES:
                missing.add(name)
    return missing


def find_msg_definition(msgtype: str, prefixes: Iterable[str] | None = None) -> str | None:
    """The text of ``<prefix>/share/<pkg>/msg/<Type>.msg`` for ``pkg/msg/Type``, or None.

    `prefixes` defaults to ``AMENT_PREFIX_PATH`` (where sourced ROS installs put their packages).
    """
    pkg, _, name = msgtype.partition("/msg/")
    if not name:
        return None
    if prefixes is None:
        prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    for prefix in prefixes:
        candidate = Path(prefix) / "share" / pkg / "msg" / f"{name}.msg"
        if candidate.is_file():
            return candidate.read_text()
    return None


def register_msg_definitions(store, definitions: Mapping[str, str] | None = None, *, wanted: Iterable[str] = (),
                             prefixes: Iterable[str] | None = None) -> list[str]:
    """Add types from ``.msg`` text to `store` (in place); returns the types added.

    `definitions` maps ``pkg/msg/Type`` to its ``.msg`` text; types in `wanted` (and the types their
    fields name) that neither the store nor `definitions` has are looked up with
    `find_msg_definition`. MessageTypeError names a type whose definition is nowhere to be found.
    """
    from rosbags.typesys import get_types_from_msg

    texts = dict(definitions or {})
    pending = [t for t in list(texts) + list(wanted) if t not in store.fielddefs]
    added: list[str] = []
    seen: set[str] = set()
    while pending:
        msgtype = pending.pop()
        if msgtype in store.fielddefs or msgtype in seen:
            continue
        seen.add(msgtype)
        text = texts.get(msgtype)
        if text is None:
            text = find_msg_definition(msgtype, prefixes)
        if text is None:
            raise MessageTypeError(f"message type {msgtype!r} is unknown: give its .msg definition or install its "
                                   f"package (searched AMENT_PREFIX_PATH)")
        try:
            store.register(dict(get_types_from_msg(text, msgtype)))
        except Exception as exc:  # parser / conflicting-definition errors of rosbags
            raise MessageTypeError(f"message definition of {msgtype!r} is unusable: {exc}") from exc
        added.append(msgtype)
        pending.extend(msg_dependencies(store, msgtype))
    return added


def numeric_fields(msg, prefix: str = "") -> list[tuple[str, float]]:
    """(field path, value) of every number in a message, in definition order, header excluded.

    Arrays give one entry per element (``name.0``, ``name.1``, ...); strings and nested headers are
    skipped. This is how an action is read from a message type this package has no rule for.
    """
    import numpy as np

    out: list[tuple[str, float]] = []
    fields = getattr(msg, "__dataclass_fields__", None)
    if fields is None:
        return out
    for name in fields:
        if name == "header" or name.startswith("_"):
            continue
        value = getattr(msg, name)
        path = f"{prefix}{name}"
        if isinstance(value, (bool, np.bool_)):
            out.append((path, float(value)))
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out.append((path, float(value)))
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            out.extend((f"{path}.{i}", float(v)) for i, v in enumerate(value.reshape(-1)))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                out.extend(numeric_fields(item, f"{path}.{i}."))
        elif hasattr(value, "__dataclass_fields__") and type(value).__name__ not in ("Header", "std_msgs__msg__Header"):
            out.extend(numeric_fields(value, f"{path}."))
    return out
