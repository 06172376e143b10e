"""vla_node in its own process, driven and observed from this one (real rclpy, tiny torch engine)."""
import contextlib
import time

import pytest
from std_srvs.srv import Trigger

from openvla_ros.nodes.bench_control import StreamMonitor, VlaNodeProcess, isolated_ros_env, summarise
from ros_helpers import wait_until as wait_for

pytestmark = pytest.mark.ros


@contextlib.contextmanager
def vla_node_in_a_process(tmp_path, monkeypatch, params: dict, domain_base: int):
    """vla_node in a child process on a private ROS domain, and a StreamMonitor in this one."""
    import rclpy

    env = isolated_ros_env(domain_id=domain_base + (int(time.time()) % 50))
    env["ROS_LOG_DIR"] = str(tmp_path)
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR"):
        monkeypatch.setenv(key, env[key])
    context = rclpy.Context()
    rclpy.init(context=context)
    monitor = None
    try:
        with VlaNodeProcess(params, env, tmp_path / "vla_node.log") as node:
            monitor = StreamMonitor(context, camera_hz=20.0)
            yield node, monitor
    finally:
        if monitor is not None:
            monitor.close()
        rclpy.shutdown(context=context)


def test_cross_process_stream_stop_and_reset(tmp_path, tiny_checkpoint, monkeypatch):
    params = {"checkpoint": tiny_checkpoint, "start_enabled": True, "control_rate_hz": 100.0,
              "base_frame": "panda_link0"}
    with vla_node_in_a_process(tmp_path, monkeypatch, params, domain_base=150) as (node, monitor):
        monitor.send_instruction("reach the red cube")
        assert wait_for(lambda: monitor.snapshot()[1], 90), node.log()[-3000:]
        # every chunk's stamp is one of the images we sent, and it arrived after that image
        twists, chunks, status = monitor.snapshot()
        sent = set(round(s, 6) for s in monitor.images_sent)
        for arrival, stamp in chunks:
            assert round(stamp, 6) in sent
            assert arrival > stamp
        first_moving = wait_for(lambda: next((t for t in monitor.snapshot()[0] if t[2] > 0), None), 30)
        assert first_moving is not None
        assert first_moving[0] > min(monitor.images_sent)
        time.sleep(1.0)
        t0 = monitor.now()
        time.sleep(1.0)
        summary = summarise(*monitor.snapshot(), rate=100.0, t_start=t0, t_end=monitor.now())
        assert summary["achieved_rate_hz"] > 50, summary  # liveness, not a timing target

        # a new instruction starts a new buffer epoch (old plans flushed)
        epoch = int(wait_for(lambda: monitor.snapshot()[2].get("buffer.epoch"), 5))
        monitor.send_instruction("reach the blue cube")
        assert wait_for(lambda: int(monitor.snapshot()[2].get("buffer.epoch", epoch)) > epoch, 5)

        # ~/stop zeroes the stream and it stays zero
        response = monitor.call_service(Trigger, "/vla_node/stop", Trigger.Request())
        assert response.success
        t_stop = monitor.now()
        time.sleep(0.5)
        after = [t for t in monitor.snapshot()[0] if t[0] > t_stop + 0.05]
        assert len(after) > 20 and all(t[2] == 0 for t in after), (len(after), [t for t in after if t[2]][:3], t_stop)
        assert wait_for(lambda: monitor.snapshot()[2].get("state") == "stopped", 3)
        assert node.alive()


def test_engine_in_a_child_process_feeds_the_stream(tmp_path, tiny_checkpoint, monkeypatch):
    """inference_process: the engine runs in vla_node's child process; chunks and motion still arrive."""
    params = {"checkpoint": tiny_checkpoint, "start_enabled": True, "inference_process": True}
    with vla_node_in_a_process(tmp_path, monkeypatch, params, domain_base=100) as (node, monitor):
        monitor.send_instruction("reach the red cube")
        assert wait_for(lambda: len(monitor.snapshot()[1]) >= 3, 90), node.log()[-3000:]
        assert wait_for(lambda: any(t[2] > 0 for t in monitor.snapshot()[0]), 10)
        assert node.alive()
