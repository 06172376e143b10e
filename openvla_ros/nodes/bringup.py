"""In-process bringup: several nodes of this package in one process, for machines without `ros2 launch`.

    openvla-ros bringup --config config/sim_bringup.yaml --set vla_node.checkpoint=/path/to/ckpt

Each node gets its parameters exactly as `ros2 launch` would give them: the same ROS 2 parameter
files (`--ros-args --params-file FILE`, in order, later files win), then per-node overrides. Each
node spins on its OWN SingleThreadedExecutor thread (docs/architecture.md: the multi-threaded
executor lost replies with these wheels).

A bringup file is itself a ROS 2 parameter file. Its `bringup` section names the nodes and the
parameter files (relative to the bringup file); its node sections are loaded after those files,
so it holds the overrides of this particular setup (launch files pass it to the nodes as well):

    bringup:
      ros__parameters:
        nodes: [sim_node, vla_node, ik_node]
        params_files: [sim_node.yaml, vla_node.yaml, ik_node.yaml, robots/panda.yaml]
    ik_node:
      ros__parameters:
        output_type: joint_state
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

BRINGUP_SECTION = "bringup"
# Node name -> module with PARAMS, NODE_NAME and make_node(**node_kwargs). Start order matters
# little (every input is optional until it arrives); the simulated arm first gives the others
# joint states and frames at once.
NODE_MODULES = {
    "sim_node": "openvla_ros.nodes.sim_node",
    "vla_node": "openvla_ros.nodes.vla_node",
    "ik_node": "openvla_ros.nodes.ik_node",
    "recorder": "openvla_ros.nodes.recorder",
    "bag_player": "openvla_ros.nodes.bag_player",
}
BRINGUP_KEYS = ("nodes", "params_files")


def node_module(name: str):
    if name not in NODE_MODULES:
        raise ValueError(f"unknown node {name!r}; known: {sorted(NODE_MODULES)}")
    return importlib.import_module(NODE_MODULES[name])


def read_bringup_file(path) -> tuple[list[str], list[Path]]:
    """(nodes, parameter files) of a bringup file; the files resolved against its folder, itself last."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bringup file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    section = ((data.get(BRINGUP_SECTION) or {}).get("ros__parameters") or {}) if isinstance(data, dict) else {}
    if not section:
        raise ValueError(f"{path} has no '{BRINGUP_SECTION}: ros__parameters:' section")
    unknown = sorted(set(section) - set(BRINGUP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} in the '{BRINGUP_SECTION}' section; known: {list(BRINGUP_KEYS)}")
    nodes = section.get("nodes") or []
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
        raise ValueError(f"{path}: '{BRINGUP_SECTION}.nodes' must be a non-empty list of node names, got {nodes!r}")
    for n in nodes:
        node_module(n)
    files = section.get("params_files") or []
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path}: '{BRINGUP_SECTION}.params_files' must be a list of paths, got {files!r}")
    resolved = []
    for f in files:
        p = Path(f) if Path(f).is_absolute() else path.parent / f
        if not p.is_file():
            raise ValueError(f"{path}: parameter file {f!r} not found (looked at {p})")
        resolved.append(p)
    return list(nodes), resolved + [path]


def coerce_override(node: str, name: str, value):
    """`value` typed as the node declares `name` (100 -> 100.0 for a float), validated."""
    specs = {s.name: s for s in node_module(node).PARAMS}
    if name == "use_sim_time":
        if not isinstance(value, bool):
            raise ValueError(f"{node}.use_sim_time must be true or false, got {value!r}")
        return value
    if name not in specs:
        raise ValueError(f"{node} has no parameter {name!r}; known: {sorted(specs)}")
    return specs[name].validate(value)


class Bringup:
    """Start nodes in this process, each on its own executor thread; `stop()` (or `with`) ends them.

    nodes: node names (keys of NODE_MODULES), started in this order.
    params_files: ROS 2 parameter files every node gets, in order (a node reads its own section).
    overrides: {node: {parameter: value}} applied after the files.
    node_kwargs: {node: {keyword: value}} extra arguments of that node's make_node (e.g. an engine).
    context: an rclpy Context already initialised (default: a new one, shut down by stop()).
    """

    def __init__(self, nodes: Sequence[str], params_files: Iterable = (),
                 overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 node_kwargs: Mapping[str, Mapping[str, Any]] | None = None, context=None):
        self.node_names = list(nodes)
        if not self.node_names:
            raise ValueError("no nodes to start")
        if len(set(self.node_names)) != len(self.node_names):
            raise ValueError(f"node listed twice: {self.node_names}")
        for n in self.node_names:
            node_module(n)
        self.params_files = [Path(p) for p in params_files]
        for p in self.params_files:
            if not p.is_file():
                raise ValueError(f"parameter file {p} does not exist")
        overrides = dict(overrides or {})
        extra = sorted(set(overrides) - set(self.node_names))
        if extra:
            raise ValueError(f"overrides for nodes that are not started: {extra}")
        self.overrides = {n: {k: coerce_override(n, k, v) for k, v in (overrides.get(n) or {}).items()}
                          for n in self.node_names}
        self.node_kwargs = {n: dict((node_kwargs or {}).get(n) or {}) for n in self.node_names}
        self._context = context
        self._owns_context = context is None
        self.nodes: dict[str, Any] = {}
        self._spinners: list[tuple[Any, Any, threading.Thread]] = []
        self.errors: dict[str, BaseException] = {}

    @classmethod
    def from_file(cls, path, overrides=None, nodes: Sequence[str] | None = None, **kw) -> "Bringup":
        file_nodes, files = read_bringup_file(path)
        return cls(nodes or file_nodes, files, overrides, **kw)

    def __getitem__(self, name: str):
        return self.nodes[name]

    @property
    def context(self):
        """The rclpy Context the nodes run in (after start()); other nodes of the caller can join it."""
        return self._context

    def start(self) -> "Bringup":
        import rclpy
        from rclpy.parameter import Parameter

        if self._context is None:
            self._context = rclpy.Context()
            rclpy.init(context=self._context)
        cli_args = ["--ros-args"]
        for p in self.params_files:
            cli_args += ["--params-file", str(p)]
        try:
            for name in self.node_names:
                module = node_module(name)
                params = [Parameter(k, value=v) for k, v in self.overrides[name].items()]
                node = module.make_node(context=self._context, cli_args=list(cli_args), parameter_overrides=params,
                                        **self.node_kwargs[name])
                self.nodes[name] = node
                self._spin(name, node)
        except BaseException:
            self.stop()
            raise
        return self

    def _spin(self, name: str, node) -> None:
        from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

        executor = SingleThreadedExecutor(context=self._context)
        executor.add_node(node)

        def spin():
            try:
                executor.spin()
            except ExternalShutdownException:
                pass
            except BaseException as exc:  # a callback raised: keep it for stop() / the caller
                self.errors[name] = exc
                logger.error("%s stopped: %r", name, exc)

        thread = threading.Thread(target=spin, name=f"bringup-{name}", daemon=True)
        thread.start()
        self._spinners.append((name, executor, thread))

    def stop(self, timeout: float = 5.0) -> None:
        import rclpy

        for name, executor, thread in reversed(self._spinners):
            executor.shutdown(timeout_sec=timeout)
            thread.join(timeout)
        self._spinners.clear()
        for name in reversed(list(self.nodes)):
            node = self.nodes.pop(name)
            close = getattr(node, "close", None)
            try:
                if close is not None:
                    close()
            finally:
                node.destroy_node()
        if self._owns_context and self._context is not None:
            if self._context.ok():
                rclpy.shutdown(context=self._context)
            self._context = None

    def __enter__(self) -> "Bringup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_set(items: Sequence[str]) -> dict:
    """["vla_node.checkpoint=/x", "ik_node.rate_hz=200.0"] -> {node: {param: value}} (values as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot or not node or not param:
            raise ValueError(f"--set expects NODE.PARAM=VALUE, got {item!r}")
        out.setdefault(node, {})[param] = yaml.safe_load(raw) if raw else ""
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="openvla-ros bringup", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="bringup file (nodes + parameter files), e.g. config/sim_bringup.yaml")
    parser.add_argument("--nodes", nargs="+", choices=sorted(NODE_MODULES), help="nodes to start (default: the config's)")
    parser.add_argument("--params-file", "--params", dest="params_files", action="append", default=[],
                        metavar="FILE", help="ROS 2 parameter file for every node (repeatable; after --config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.PARAM=VALUE",
                        help="override one parameter (value parsed as YAML; repeatable)")
    parser.add_argument("--checkpoint", help="shorthand for --set vla_node.checkpoint=PATH")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: until Ctrl-C)")
    return parser


def bringup_main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """`openvla-ros bringup`: start the nodes, run until Ctrl-C/SIGTERM or --seconds, stop them."""
    try:
        nodes, files = read_bringup_file(args.config) if args.config else ([], [])
        nodes = args.nodes or nodes
        if not nodes:
            raise ValueError("no nodes: give --config FILE or --nodes NAME ...")
        files = files + [Path(f) for f in args.params_files]
        overrides = parse_set(args.overrides)
        if args.checkpoint:
            overrides.setdefault("vla_node", {})["checkpoint"] = args.checkpoint
        bringup = Bringup(nodes, files, overrides)
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        bringup.start()
    except ValueError as exc:
        print(f"[error] {exc}")
        return 2
    print(f"bringup: running {', '.join(nodes)} (Ctrl-C to stop)", flush=True)
    try:
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        while not stop.is_set() and not bringup.errors:
            if deadline is not None and time.monotonic() >= deadline:
                break
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        bringup.stop()
        signal.signal(signal.SIGTERM, previous)
    for name, exc in bringup.errors.items():
        print(f"[error] {name} stopped: {exc!r}")
    return 1 if bringup.errors else 0


if __name__ == "__main__":
    raise SystemExit(bringup_main())
