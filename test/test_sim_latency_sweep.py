"""The closed loop at a given inference latency (sim.closed_loop) and the latency sweep (sim.latency_sweep).

The scripted expert stands in for a well-trained one-action model (K = 1, dt = 0.2 s, like the
released OpenVLA) whose answers arrive `latency` after their frame on the simulated clock; the
sweep itself runs the real tiny engine end to end through `openvla-ros eval latency`.
"""
import json

import numpy as np
import pytest

from openvla_ros.sim.closed_loop import ExpertSource, closed_loop_episode, closed_loop_scene
from openvla_ros.sim.latency_sweep import SweepConfig, read_latency_file
from openvla_ros.sim.rollout import panda_kinematics
from openvla_ros.sim.scene import instruction_for, target_for_seed

SEED = 100_003


class LateExpert(ExpertSource):
    """The expert's one action per call, delivered after the loop's simulated latency."""

    timed = True


@pytest.fixture(scope="module")
def cell():
    scene = closed_loop_scene(SEED, 100.0)
    kinematics = panda_kinematics()
    target = target_for_seed(SEED)

    def run(latency, **options):
        scene.reset(SEED)
        return closed_loop_episode(scene, kinematics, LateExpert(), target, instruction_for(target),
                                   max_seconds=6.0, replan_period_s=0.0, sim_latency_s=latency, **options)

    yield run
    scene.close()


def test_at_a_desktop_gpus_latency_the_timeline_alone_never_moves_a_one_action_model(cell):
    episode = cell(0.3, execution="timeline")
    assert not episode.success and episode.moving_fraction == 0.0 and episode.path_length_m < 1e-9


@pytest.mark.parametrize("latency", [0.3, 0.5, 0.8])
def test_arrival_execution_reaches_the_cube_at_0_3_to_0_8_s_of_latency(cell, latency):
    episode = cell(latency, execution="auto")
    assert episode.success, f"final distance {episode.final_distance_m:.3f} m at {latency} s"
    assert episode.moving_fraction > 0.95


def test_sync_waits_while_the_model_thinks(cell):
    # One action of 0.2 s per answer, then 0.2 s of thinking: the arm moves half the time.
    episode = cell(0.2, sync=True)
    assert episode.moving_fraction == pytest.approx(0.5, abs=0.03)
    arrival = cell(0.2, execution="arrival")
    assert arrival.time_to_success_s < episode.time_to_success_s


def test_the_episode_reports_smoothness_figures_that_see_velocity_steps(cell):
    smooth = cell(0.05, execution="arrival")
    late = cell(0.5, execution="arrival")
    for episode in (smooth, late):
        assert np.isfinite([episode.jerk_rms, episode.max_switch_jump, episode.path_length_m]).all()
        assert episode.path_length_m > 0.05
    # The expert's commands change more per answer when answers are 10x further apart.
    assert late.max_switch_jump > smooth.max_switch_jump


def test_forced_prefix_needs_an_engine_that_can_decode_one(cell):
    with pytest.raises(ValueError, match="forced_prefix needs a source"):
        cell(0.2, forced_prefix=True)


def test_latency_files_and_sweep_settings_are_checked_by_value(tmp_path):
    lines = tmp_path / "latencies.txt"
    lines.write_text("# measured on an Orin\n0.34\n\n0.52  # a slow one\n")
    assert read_latency_file(lines) == (0.34, 0.52)
    listed = tmp_path / "latencies.json"
    listed.write_text("[0.2, 0.25]")
    assert read_latency_file(listed) == (0.2, 0.25)
    bad = tmp_path / "bad.txt"
    bad.write_text("0.1\nfast\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not a latency in seconds: 'fast'"):
        read_latency_file(bad)
    with pytest.raises(ValueError, match=r"unknown strategies \['fastest'\]"):
        SweepConfig(strategies=("replace", "fastest")).validated()
    with pytest.raises(ValueError, match=r"latency values must be seconds >= 0, got \[-0.1\]"):
        SweepConfig(latencies_s=(0.1, -0.1)).validated()
    assert SweepConfig(measured_latencies_s=(0.3,)).validated().latency_axis == ["measured"]


def test_eval_latency_runs_every_cell_on_the_tiny_engine_and_writes_the_reports(tiny_chunk_checkpoint, tmp_path, capsys):
    from openvla_ros import cli

    out = tmp_path / "sweep"
    assert cli.main(["eval", "latency", "--checkpoint", str(tiny_chunk_checkpoint), "--latencies", "0.1,0.3",
                     "--strategies", "sync,replace,arrival,auto", "--episodes", "1", "--max-seconds", "0.6",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    cells = {(c["geometry"], c["latency_s"], c["strategy"]): c for c in results["cells"]}
    assert len(cells) == 2 * 2 * 4
    # The one-action model of the same network: expired on arrival at 0.3 s under the timeline
    # (nothing moves), played from its arrival otherwise.
    assert cells[("one_action", 0.3, "replace")]["moving_fraction"] == 0.0
    assert cells[("one_action", 0.3, "arrival")]["moving_fraction"] > 0.9
    assert cells[("chunk", 0.1, "replace")]["moving_fraction"] > 0.9
    assert (out / "sweep.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| arrival |" in report and "L = 0.3 s" in report
    assert "one_action: success" in capsys.readouterr().out


def test_eval_latency_names_a_bad_flag_value(tiny_chunk_checkpoint, tmp_path, capsys):
    from openvla_ros import cli

    assert cli.main(["eval", "latency", "--checkpoint", str(tiny_chunk_checkpoint), "--latencies", "0.1,soon",
                     "--out", str(tmp_path)]) == 2
    assert "--latencies: expected a comma-separated list, got '0.1,soon'" in capsys.readouterr().err


def test_prefix_decodes_each_chunk_after_the_committed_steps_of_the_latency(tiny_chunk_checkpoint):
    from openvla_ros.engines.torch_engine import TorchEngine
    from openvla_ros.sim.closed_loop import EngineSource

    engine = TorchEngine(tiny_chunk_checkpoint)  # K = 4 actions of 0.2 s

    class Recording(EngineSource):
        def __init__(self):
            super().__init__(engine)
            self.calls = []

        def __call__(self, scene, image, instruction, stamp, forced_prefix=None):
            chunk = super().__call__(scene, image, instruction, stamp, forced_prefix)
            self.calls.append((stamp, forced_prefix, chunk))
            return chunk

    source = Recording()
    scene = closed_loop_scene(SEED, 100.0)
    try:
        target = target_for_seed(SEED)
        closed_loop_episode(scene, panda_kinematics(), source, target, instruction_for(target), max_seconds=1.5,
                            replan_period_s=0.0, sim_latency_s=0.3, forced_prefix=True)
    finally:
        scene.close()
    assert len(source.calls) >= 4
    first_stamp, first_prefix, first = source.calls[0]
    assert first_prefix is None and first.forced_steps == 0  # no latency measured yet
    for stamp, prefix, chunk in source.calls[1:]:
        # 0.3 s of latency on 0.2 s actions: two actions are committed, two are decoded after them.
        assert prefix.shape == (2, 7) and chunk.forced_steps == 2 and chunk.chunk_len == 2
        assert chunk.stamp == pytest.approx(stamp + 0.4)
    # The committed actions are the plan the arm was executing: the second call's first committed
    # action lies inside the first chunk's actions 1..2 (the call came 0.3 s after the first frame).
    second_stamp, second_prefix, _ = source.calls[1]
    assert second_stamp == pytest.approx(0.3)
    expected = 0.5 * (first.actions[1, :3] + first.actions[2, :3])
    np.testing.assert_allclose(second_prefix[0, :3], expected, atol=1e-9)


def test_cells_do_not_depend_on_the_number_of_worker_processes(tiny_chunk_checkpoint):
    import functools

    from openvla_ros.engines import create_engine
    from openvla_ros.sim.latency_sweep import run_latency_sweep

    config = SweepConfig(latencies_s=(0.3,), strategies=("replace", "arrival"), geometries=("one_action",),
                         episodes=1, max_seconds=0.6)
    factory = functools.partial(create_engine, "torch", str(tiny_chunk_checkpoint))
    serial = run_latency_sweep(factory, [SEED], config)
    parallel = run_latency_sweep(factory, [SEED], config, workers=2)
    assert [(c.strategy, c.success, c.path_length_m, c.jerk_rms) for c in serial] == \
        [(c.strategy, c.success, c.path_length_m, c.jerk_rms) for c in parallel]
    assert serial[1].path_length_m > 0  # arrival moved the arm, so the comparison compares motion
    with pytest.raises(ValueError, match="workers > 1 needs a picklable engine factory"):
        run_latency_sweep(factory(), [SEED], config, workers=2)
