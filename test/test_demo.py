"""The demo loop end to end in miniature: every artefact is produced, loadable and consistent; steps resume."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from openvla_ros import demo
from openvla_ros.demo import DONE_FILE, STEPS, DemoConfig, run_demo, step_inputs

TINY = dict(episodes=3, held_out=1, eval_episodes=1, steps=2, batch_size=2, episode_seconds=3.0,
            sensitivity_frames=2, chunk=2, augment=True, dagger_episodes=1, dagger_steps=2,
            latency_sweep_episodes=1, latency_sweep_latencies_s=(0.3,), latency_sweep_strategies=("replace", "auto"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    summary = run_demo(run_dir, progress=False, **TINY)
    return run_dir, summary


def test_recorded_bags_hold_every_topic_and_the_expert_action(tiny_run):
    from openvla_ros.eval.bags import BagReadOptions, list_topics, read_frames
    from openvla_ros.sim.scene import instruction_for, target_for_seed

    run_dir, summary = tiny_run
    record = json.loads((run_dir / "record" / DONE_FILE).read_text())["result"]
    assert len(record["episodes"]) == 3
    assert [len(bags) for bags in demo.split_bags(record, DemoConfig(**TINY))] == [2, 1]
    # held_out is not a recording setting: another split of the same bags.
    assert [len(bags) for bags in demo.split_bags(record, DemoConfig(**{**TINY, "held_out": 2}))] == [1, 2]
    assert summary["recorded"]["train_episodes"] == 2 and summary["recorded"]["held_out_episodes"] == 1
    episode = record["episodes"][0]
    topics = {t.name: t.msgtype for t in list_topics(episode["bag"])}
    assert topics == {demo.TOPIC_IMAGE: "sensor_msgs/msg/Image", demo.TOPIC_INSTRUCTION: "std_msgs/msg/String",
                      demo.TOPIC_TWIST: "geometry_msgs/msg/TwistStamped", demo.TOPIC_GRIPPER: "std_msgs/msg/Float64",
                      demo.TOPIC_TIP_POSE: "geometry_msgs/msg/PoseStamped",
                      demo.TOPIC_JOINT_STATES: "sensor_msgs/msg/JointState"}
    frames = read_frames(episode["bag"], BagReadOptions(truth_topic=demo.TOPIC_TWIST, image_topic=demo.TOPIC_IMAGE,
                                                       gripper_topic=demo.TOPIC_GRIPPER))
    assert len(frames) == episode["frames"] >= 1
    seed = demo.record_seed(DemoConfig(**TINY), 0)
    assert episode["instruction"] == instruction_for(target_for_seed(seed))
    first = next(iter(frames))
    assert first.image.shape == (224, 224, 3) and first.instruction == episode["instruction"]
    # The first recorded action is the expert's from the rest posture: a capped step (4 cm per
    # period) with zero rotation and an open gripper.
    assert np.linalg.norm(first.truth[:3]) == pytest.approx(0.04, abs=1e-9)
    assert np.allclose(first.truth[3:6], 0.0) and first.truth[6] == 1.0


def test_trained_checkpoint_loads_and_predicts_a_chunk(tiny_run):
    run_dir, summary = tiny_run
    train = json.loads((run_dir / "train" / DONE_FILE).read_text())["result"]
    assert train["steps"] == 2 and math.isfinite(train["final_loss"])
    config = json.loads((Path(train["checkpoint"]) / "config.json").read_text())
    assert config["openvla_ros_training"]["center_crop_at_inference"] is True
    engine = demo.make_engine(train["checkpoint"], center_crop=train["center_crop"])
    chunk = engine.predict(np.zeros((224, 224, 3), np.uint8), "reach the red cube", stamp=3.0)
    assert chunk.actions.shape == (2, 7) and chunk.is_finite and chunk.stamp == 3.0 and chunk.dt == 0.2


def test_dagger_step_trains_on_on_the_models_rollouts_and_later_steps_use_its_model(tiny_run):
    from openvla_ros.training.data import EpisodeReadOptions, read_episode

    run_dir, summary = tiny_run
    train = json.loads((run_dir / "train" / DONE_FILE).read_text())["result"]
    dagger = json.loads((run_dir / "dagger" / DONE_FILE).read_text())["result"]
    assert dagger["rollout_episodes"] == 1 and dagger["steps"] == 2 and math.isfinite(dagger["final_loss"])
    assert Path(dagger["checkpoint"]) == run_dir / "dagger" / "model" != Path(train["checkpoint"])
    bag = run_dir / "dagger" / "bags" / "rollout_0000"
    outcome = json.loads(Path(f"{bag}.json").read_text())
    assert outcome["seed"] == demo.dagger_seed(DemoConfig(**TINY), 0)
    assert outcome["options"]["checkpoint"] == train["checkpoint"]
    # The rollout is a training episode like the demonstrations (the trainer reads it the same way).
    read = EpisodeReadOptions(image_topic=demo.TOPIC_IMAGE, instruction_topic=demo.TOPIC_INSTRUCTION,
                              action_topic=demo.TOPIC_TWIST, gripper_topic=demo.TOPIC_GRIPPER, dt=0.2)
    assert len(read_episode(bag, read).actions) == dagger["rollout_frames"] == outcome["result"]["frames"] >= 1
    # The continued model is what the later steps evaluate and deploy.
    for step in ("closed_loop", "deploy_ros"):
        assert json.loads((run_dir / step / DONE_FILE).read_text())["result"]["checkpoint"] == dagger["checkpoint"]
    assert summary["dagger"]["rollout_episodes"] == 1 and summary["training"]["checkpoint"] == train["checkpoint"]
    engine = demo.make_engine(dagger["checkpoint"], center_crop=dagger["center_crop"])
    assert engine.predict(np.zeros((224, 224, 3), np.uint8), "reach the red cube").is_finite


def test_rollout_recording_keeps_the_models_episode_and_labels_every_state_with_the_expert(tiny_run, tmp_path):
    """DAgger data: the model drives exactly as in the closed loop; the bag's actions are the expert's."""
    from openvla_ros.eval.bags import BagReadOptions, RosBag, read_frames
    from openvla_ros.sim.expert import ReachExpert
    from openvla_ros.sim.rollout import panda_kinematics
    from openvla_ros.sim.scene import instruction_for, target_for_seed

    run_dir, _ = tiny_run
    train = json.loads((run_dir / "train" / DONE_FILE).read_text())["result"]
    engine = demo.make_engine(train["checkpoint"], center_crop=train["center_crop"])
    seed = demo.dagger_seed(DemoConfig(**TINY), 7)
    loop = dict(max_seconds=1.0, control_rate_hz=100.0, replan_period_s=0.1, sim_latency_s=0.1,
                blend_policy="ensemble")
    out = demo.record_rollout(tmp_path / "rollout", seed, checkpoint=train["checkpoint"],
                              center_crop=train["center_crop"], engine=engine, **loop)
    target = target_for_seed(seed)
    assert out["target"] == target and out["frames"] == 5  # 1 s of 0.2 s periods (a 2-step model does not arrive)
    # The same episode unrecorded: recording does not change what the model sees or does.
    scene = demo.closed_loop_scene(seed, 100.0)
    try:
        cube = scene.reset(seed)[target]
        episode = demo.closed_loop_episode(scene, panda_kinematics(), demo.EngineSource(engine), target,
                                           instruction_for(target), **loop)
    finally:
        scene.close()
    assert out["success"] == episode.success and out["final_distance_m"] == pytest.approx(episode.final_distance_m)
    with RosBag(tmp_path / "rollout") as bag:
        tips = np.array([[m.msg.pose.position.x, m.msg.pose.position.y, m.msg.pose.position.z]
                         for m in bag.messages([demo.TOPIC_TIP_POSE])])
    np.testing.assert_allclose(tips, np.array(episode.tip_path)[:5], atol=1e-5)
    assert np.linalg.norm(tips[-1] - tips[0]) > 1e-3  # the model moved the arm
    frames = list(read_frames(tmp_path / "rollout", BagReadOptions(
        truth_topic=demo.TOPIC_TWIST, image_topic=demo.TOPIC_IMAGE, sync="nearest", tolerance=0.001)))
    assert len(frames) == 5 and frames[0].instruction == instruction_for(target)
    for frame, tip in zip(frames, tips):
        np.testing.assert_allclose(frame.truth, ReachExpert().action(tip, cube)[:6], atol=1e-5)


def test_open_loop_reports_exist_per_held_out_bag(tiny_run):
    run_dir, summary = tiny_run
    result = json.loads((run_dir / "open_loop" / DONE_FILE).read_text())["result"]
    assert len(result["bags"]) == 1
    bag_dir = Path(result["bags"][0]["dir"])
    bag_summary = json.loads((bag_dir / "summary.json").read_text())
    assert bag_summary["frames"] == result["frames"] >= 1
    pairs = bag_summary["instruction_sensitivity"]["pairs"]
    assert {pairs[0]["a"], pairs[0]["b"]} == {"reach the red cube", "reach the blue cube"}
    assert pairs[0]["frames"] == min(2, bag_summary["frames"])
    assert (bag_dir / "report.md").is_file() and (bag_dir / "predictions.csv").is_file()
    assert summary["open_loop"]["l2_mean"] == pytest.approx(result["l2_mean"])


def test_closed_loop_episodes_and_summary(tiny_run):
    run_dir, summary = tiny_run
    episodes = json.loads((run_dir / "closed_loop" / "episodes.json").read_text())
    assert set(episodes) == set(demo.POLICY_ORDER)
    seed = demo.eval_seed(DemoConfig(**TINY), 0)
    model, swapped = episodes[demo.POLICY_MODEL][0], episodes[demo.POLICY_SWAPPED][0]
    assert model["seed"] == swapped["seed"] == seed and model["target"] != swapped["target"]
    # 1.6 s at 100 Hz, unless the target was reached at a check.
    assert model["ticks"] == round(TINY["episode_seconds"] * 100) or model["success"]
    # The model ran every replan period (0.1 s by default); the path has one point per check (0.2 s).
    ticks_per_replan = round(DemoConfig(**TINY).replan_period_s * 100)
    assert ticks_per_replan == 10
    assert model["calls"] == math.ceil(model["ticks"] / ticks_per_replan)
    assert len(model["tip_path"]) == model["ticks"] // 20 + 1
    # The arm moved: the IK integrated the model's twists into joint motion.
    path = np.array(model["tip_path"])
    assert np.linalg.norm(path[-1] - path[0]) > 1e-3
    for key in ("closed_loop_success_rate", "blind_baseline_success_rate", "mean_target_baseline_success_rate",
                "expert_success_rate", "swapped_instruction_success_rate", "control_rate_hz", "inference_latency_ms"):
        assert key in summary
    assert summary["control_rate_configured_hz"] == 100.0
    assert summary["inprocess_closed_loop_success_rate"] == float(model["success"])
    assert summary["inprocess_inference_latency_ms"]["count"] == model["calls"]
    # The scripted expert reaches within 1.6 s only when the cube is close; its rate is 0 or 1 here.
    assert summary["expert_success_rate"] == float(episodes[demo.POLICY_EXPERT][0]["success"])


def test_report_and_plots_are_written(tiny_run):
    run_dir, summary = tiny_run
    report = (run_dir / "report.md").read_text()
    assert "closed-loop success (ROS 2 graph)" in report and "Deployed through the ROS 2 graph" in report
    for png in ("closed_loop_success.png", "training_loss.png", "tip_paths.png"):
        data = (run_dir / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}" in report
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_finished_steps_are_skipped_and_changed_ones_redone(tiny_run, capsys):
    run_dir, summary = tiny_run
    before = {s: (run_dir / s / DONE_FILE).stat().st_mtime_ns for s in STEPS[:-1]}
    again = run_demo(run_dir, progress=True, **TINY)
    err = capsys.readouterr().err
    for step in STEPS[:-1]:
        assert f"step {step}: already done" in err
        assert (run_dir / step / DONE_FILE).stat().st_mtime_ns == before[step]
    assert again["closed_loop_success_rate"] == summary["closed_loop_success_rate"]
    # Another in-process policy set changes only the closed-loop inputs; the in-process backend
    # reports the in-process model (not run here) and does not deploy through ROS.
    changed = run_demo(run_dir, progress=True, **{**TINY, "policies": (demo.POLICY_EXPERT,),
                                                  "closed_loop_backend": "inprocess"})
    err = capsys.readouterr().err
    assert "step closed_loop: running" in err and "step train: already done" in err and "deploy_ros" not in err
    assert set(changed["closed_loop"]) == {demo.POLICY_EXPERT} and changed["closed_loop_success_rate"] is None
    assert changed["closed_loop_backend"] == "inprocess" and changed["deploy_ros"] is None


def test_step_inputs_chain_and_validation():
    base = step_inputs(DemoConfig())
    more_steps = step_inputs(DemoConfig(steps=7))
    assert base["record"] == more_steps["record"]
    assert base["train"] != more_steps["train"] and base["closed_loop"] != more_steps["closed_loop"]
    with pytest.raises(ValueError, match="held_out"):
        DemoConfig(episodes=3, held_out=3).validated()
    with pytest.raises(ValueError, match="policies"):
        DemoConfig(policies=("oracle",)).validated()
    with pytest.raises(ValueError, match="sim_latency_s"):
        DemoConfig(sim_latency_s=float("nan")).validated()
    with pytest.raises(ValueError, match="closed_loop_backend"):
        DemoConfig(closed_loop_backend="gazebo").validated()
    with pytest.raises(ValueError, match="ros_policies"):
        DemoConfig(ros_policies=(demo.POLICY_EXPERT,)).validated()
    with pytest.raises(ValueError, match="unknown steps"):
        run_demo("/nonexistent/never", redo=("fly",))
    with pytest.raises(ValueError, match="blend_policy"):
        DemoConfig(blend_policy="average").validated()
    with pytest.raises(ValueError, match="train_processes"):
        DemoConfig(batch_size=8, train_processes=3).validated()
    # The closed loop's blending is a closed-loop setting only; the recording's and training's stay.
    other_blend = step_inputs(replace(DemoConfig(), blend_policy="crossfade"))
    assert other_blend["train"] == base["train"] and other_blend["closed_loop"] != base["closed_loop"]
    paired = step_inputs(replace(DemoConfig(), paired_targets=not DemoConfig().paired_targets))
    assert paired["record"] != base["record"] and paired["train"] != base["train"]
    # DAgger settings change the DAgger round and what follows it, never the recording or first training.
    off, on = step_inputs(DemoConfig(dagger_episodes=0)), step_inputs(DemoConfig(dagger_episodes=5))
    longer = step_inputs(DemoConfig(dagger_episodes=5, dagger_steps=7))
    assert off["train"] == on["train"] == longer["train"] and on["dagger"] != longer["dagger"]
    assert on["closed_loop"] != longer["closed_loop"] and on["deploy_ros"] != longer["deploy_ros"]
    # While off, the later steps depend on the first training only (runs made before DAgger resume).
    assert "dagger" not in off["closed_loop"] and off["closed_loop"] == step_inputs(
        DemoConfig(dagger_episodes=0, dagger_steps=7))["closed_loop"]
    for bad in dict(dagger_episodes=-1), dict(dagger_steps=0), dict(dagger_lr=0.0), dict(dagger_episodes=1.5):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DemoConfig(**bad).validated()


def test_deployment_ran_through_the_ros_graph_and_moved_the_arm_via_ik_node(tiny_run):
    from openvla_ros.sim.scene import instruction_for, target_for_seed

    run_dir, summary = tiny_run
    result = json.loads((run_dir / "deploy_ros" / DONE_FILE).read_text())["result"]
    assert result["mode"] == "ros" and summary["closed_loop_backend"] == "ros"
    # The checkpoint was trained with crop augmentation, so vla_node centre-crops.
    assert result["center_crop"] is True
    episodes = json.loads((run_dir / "deploy_ros" / "episodes.json").read_text())
    assert set(episodes) == {demo.POLICY_MODEL}
    ep = episodes[demo.POLICY_MODEL][0]
    seed = demo.eval_seed(DemoConfig(**TINY), 0)
    assert ep["seed"] == seed and ep["target"] == target_for_seed(seed)
    assert ep["instruction"] == instruction_for(ep["target"])  # what sim_node published for the episode
    # The model's chunks became twists on /vla/eef_delta, ik_node integrated them into joint commands
    # and sim_node applied those (nothing else publishes /joint_commands).
    # (On a loaded CPU the episode's chunk count can read 0 while a chunk from just before the
    # episode window still drives the first twists; the moving twists are what must be there.)
    assert ep["moving_twists"] > 0, {k: ep[k] for k in ("chunks", "moving_twists", "twists", "wall_s")}
    assert ep["ik_steps"] > 0 and ep["joint_commands"] > 0 and ep["sim_joint_commands"] > 0
    assert result["ik_node_counters"]["twists"] >= ep["moving_twists"]
    path = np.array(ep["tip_path"])
    assert path.shape[1] == 3 and np.linalg.norm(path[-1] - path[0]) > 1e-4
    # It ran until success or the episode time was up (simulated time, paced to the wall clock).
    assert ep["success"] or ep["episode_s"] >= TINY["episode_seconds"] - 1e-6
    assert ep["success"] == (ep["final_distance_m"] <= 0.05)
    assert summary["closed_loop_success_rate"] == float(ep["success"])
    assert summary["control_rate_hz"] == pytest.approx(ep["twists"] / ep["wall_s"])
    assert summary["joint_command_rate_hz"] == pytest.approx(ep["joint_commands"] / ep["wall_s"])
    assert summary["inference_latency_ms"]["count"] == ep["chunks"]
    assert summary["deploy_ros"]["policies"][demo.POLICY_MODEL]["episode_wall_s"] == [ep["wall_s"]]
    # The graph ran isolated: a demo domain id and logs under the run directory (unless preset).
    env = result["ros_env"]
    if "ROS_DOMAIN_ID" in env:
        assert demo.DEMO_DOMAIN_IDS[0] <= int(env["ROS_DOMAIN_ID"]) <= demo.DEMO_DOMAIN_IDS[1]
    if "ROS_LOG_DIR" in env:
        assert Path(env["ROS_LOG_DIR"]) == run_dir / "deploy_ros" / "ros_log"
    print("deploy_ros figures:", {k: ep[k] for k in ("wall_s", "episode_s", "twists", "joint_commands", "chunks",
                                                    "underrun_ticks", "steady_underrun_ticks", "real_time_factor")},
          "twist Hz", round(summary["control_rate_hz"], 1), "joint command Hz", round(summary["joint_command_rate_hz"], 1),
          "latency", summary["inference_latency_ms"], "graph ready s", round(result["graph_ready_s"], 1))


def test_ros_isolation_env_keeps_the_users_settings(tmp_path, monkeypatch):
    import random

    for key in demo.ROS_ISOLATION_VARS:
        monkeypatch.delenv(key, raising=False)
    env = demo.ros_isolation_env(tmp_path, random.Random(3))
    assert set(env) == set(demo.ROS_ISOLATION_VARS)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST" and env["ROS_LOG_DIR"] == str(tmp_path)
    assert demo.DEMO_DOMAIN_IDS[0] <= int(env["ROS_DOMAIN_ID"]) <= demo.DEMO_DOMAIN_IDS[1]
    monkeypatch.setenv("ROS_DOMAIN_ID", "7")
    env = demo.ros_isolation_env(tmp_path)
    assert "ROS_DOMAIN_ID" not in env and set(env) == {"ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR"}
    with demo._EnvVars(env):
        assert os.environ["ROS_LOG_DIR"] == str(tmp_path) and os.environ["ROS_DOMAIN_ID"] == "7"
    assert "ROS_LOG_DIR" not in os.environ and os.environ["ROS_DOMAIN_ID"] == "7"


def test_center_crop_follows_the_checkpoint(tmp_path):
    assert demo.checkpoint_center_crop(tmp_path, default=True) is True  # no config.json: the default
    (tmp_path / "config.json").write_text(json.dumps({"openvla_ros_training": {"center_crop_at_inference": False}}))
    assert demo.checkpoint_center_crop(tmp_path, default=True) is False


def test_noise_injection_moves_the_arm_off_course_but_records_the_clean_expert_action(tmp_path):
    """DART-style recording: the executed actions carry noise, the bag's labels are the expert's for each state."""
    from openvla_ros.eval.bags import BagReadOptions, read_frames
    from openvla_ros.sim.expert import ReachExpert
    from openvla_ros.sim.scene import PandaScene, target_for_seed

    seed = 7
    clean = demo.record_episode(tmp_path / "clean", seed, max_seconds=1.0)
    noisy = demo.record_episode(tmp_path / "noisy", seed, max_seconds=1.0, action_noise_m=0.01)
    options = BagReadOptions(truth_topic=demo.TOPIC_TWIST, image_topic=demo.TOPIC_IMAGE, sync="nearest",
                             tolerance=0.001)
    tips = {}
    for name in ("clean", "noisy"):
        from openvla_ros.eval.bags import RosBag

        with RosBag(tmp_path / name) as bag:
            tips[name] = np.array([[m.msg.pose.position.x, m.msg.pose.position.y, m.msg.pose.position.z]
                                   for m in bag.messages([demo.TOPIC_TIP_POSE])])
    assert clean["frames"] == noisy["frames"] == len(tips["clean"]) == 5
    # The arm went elsewhere with noise (after the first action) ...
    assert np.abs(tips["noisy"][2:] - tips["clean"][2:]).max() > 0.003
    # ... yet every recorded action is exactly the expert's for the state it was recorded in.
    scene = PandaScene(seed)
    cube = scene.cube_position(target_for_seed(seed))
    scene.close()
    expert = ReachExpert()
    frames = list(read_frames(tmp_path / "noisy", options))
    assert len(frames) == 5
    for frame, tip in zip(frames, tips["noisy"]):
        # (1e-5 m: the bag's tip pose and the scene's tip position differ by pybullet's link-frame rounding)
        np.testing.assert_allclose(frame.truth[:3], expert.action(tip, cube)[:3], atol=1e-5)
    with pytest.raises(ValueError, match="record_noise_m"):
        DemoConfig(record_noise_m=-0.1).validated()


def test_settling_records_the_expert_stopping_at_the_goal(tmp_path):
    """With settle_s the bag goes on after the cube is reached, until the expert's actions are small."""
    from openvla_ros.eval.bags import BagReadOptions, read_frames

    seed = 3
    plain = demo.record_episode(tmp_path / "plain", seed)
    settled = demo.record_episode(tmp_path / "settled", seed, settle_s=0.6)
    assert plain["success"] and settled["success"]
    assert settled["frames"] == plain["frames"] + 3  # 0.6 s at the 0.2 s control period
    options = BagReadOptions(truth_topic=demo.TOPIC_TWIST, image_topic=demo.TOPIC_IMAGE, sync="nearest",
                             tolerance=0.001)
    speeds = [float(np.linalg.norm(f.truth[:3])) for f in read_frames(tmp_path / "settled", options)]
    assert len(speeds) == settled["frames"]
    # The last labels (m/s) are much slower than the approach: the bag shows where to stop.
    assert speeds[-1] < 0.2 * max(speeds)
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match="settle_s"):
            demo.record_episode(tmp_path / "bad", seed, settle_s=bad)
    with pytest.raises(ValueError, match="not a whole number"):  # 0.1 s of a 0.2 s period is not rounded away
        demo.record_episode(tmp_path / "bad", seed, settle_s=0.1)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="record_settle_s"):
        DemoConfig(record_settle_s=-1.0).validated()
    with pytest.raises(ValueError, match="action_bin_sigma"):
        DemoConfig(action_bin_sigma=-1.0).validated()
    # Recordings made before settling existed are still found finished while it is off.
    common = dict(storage="sqlite3", max_seconds=8.0, noise_m=0.0, random_start_probability=0.0)
    assert "settle_s" not in demo.recording_options(**common, settle_s=0.0)
    assert demo.recording_options(**common, settle_s=0.6)["settle_s"] == 0.6


def test_relabelled_bags_hold_the_same_frames_with_the_other_instruction_and_its_expert_actions(tmp_path):
    """relabel_other_targets: per other colour, the same frames, that colour's instruction, and the expert's
    action towards that cube from each recorded state; split_bags trains on those of training episodes only."""
    from openvla_ros.eval.bags import BagReadOptions, RosBag, read_frames
    from openvla_ros.sim.expert import ReachExpert
    from openvla_ros.sim.scene import CUBE_COLOURS, PandaScene, instruction_for, target_for_seed

    seed = 5
    target = target_for_seed(seed)
    other = next(c for c in CUBE_COLOURS if c != target)
    result = demo.record_episode(tmp_path / "ep", seed, max_seconds=1.0, action_noise_m=0.01,
                                 relabel_other_targets=True)
    relabelled = tmp_path / f"ep_as_{other}"
    assert result["relabelled"] == [str(relabelled)]
    assert "relabelled" not in demo.record_episode(tmp_path / "plain", seed, max_seconds=1.0)
    options = BagReadOptions(truth_topic=demo.TOPIC_TWIST, image_topic=demo.TOPIC_IMAGE, sync="nearest",
                             tolerance=0.001)
    own, relabel = (list(read_frames(p, options)) for p in (tmp_path / "ep", relabelled))
    assert len(own) == len(relabel) == result["frames"] == 5
    instructions, tips = {}, None
    for name in ("ep", relabelled.name):
        with RosBag(tmp_path / name) as bag:
            instructions[name] = [m.msg.data for m in bag.messages([demo.TOPIC_INSTRUCTION])]
            if tips is None:
                tips = [np.array([m.msg.pose.position.x, m.msg.pose.position.y, m.msg.pose.position.z])
                        for m in bag.messages([demo.TOPIC_TIP_POSE])]
    assert instructions == {"ep": [instruction_for(target)], relabelled.name: [instruction_for(other)]}
    scene = PandaScene(seed)
    cubes = {c: scene.cube_position(c) for c in (target, other)}
    scene.close()
    expert = ReachExpert()
    for a, b, tip in zip(own, relabel, tips):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_allclose(a.truth[:3], expert.action(tip, cubes[target])[:3], atol=1e-5)
        np.testing.assert_allclose(b.truth[:3], expert.action(tip, cubes[other])[:3], atol=1e-5)
    assert np.abs(own[0].truth[:3] - relabel[0].truth[:3]).max() > 0.01  # the cubes are apart: other labels
    # Training gets the relabelled bags of the training episodes; the held-out bags stay as recorded.
    record = {"episodes": [{"bag": f"b{i}", "relabelled": [f"b{i}_as_x"]} for i in range(4)]}
    assert demo.split_bags(record, DemoConfig(episodes=4, held_out=1)) == (
        ["b0", "b1", "b2", "b0_as_x", "b1_as_x", "b2_as_x"], ["b3"])
    common = dict(storage="sqlite3", max_seconds=8.0, noise_m=0.0, random_start_probability=0.0, settle_s=0.0)
    assert "relabel_other_targets" not in demo.recording_options(**common)  # older recordings still resume
    assert "relabel_other_targets" not in step_inputs(DemoConfig())["record"]
    assert step_inputs(DemoConfig(relabel_other_targets=True))["record"]["relabel_other_targets"] is True


def test_random_starts_are_seeded_inside_the_start_region_and_clear_of_the_cubes():
    from openvla_ros.sim.scene import START_MIN_CUBE_CLEARANCE_M, START_TIP_REGION

    cubes = {"red": np.array([0.45, 0.0, 0.025]), "blue": np.array([0.6, 0.15, 0.025])}
    assert all(demo.random_start_tip(s, cubes, 0.0) is None for s in range(20))
    starts = [demo.random_start_tip(s, cubes, 1.0) for s in range(200)]
    lo, hi = (np.asarray(v) for v in START_TIP_REGION)
    for tip in starts:
        assert np.all(tip >= lo) and np.all(tip <= hi)
        assert min(np.linalg.norm(tip - c) for c in cubes.values()) >= START_MIN_CUBE_CLEARANCE_M
    np.testing.assert_array_equal(starts[5], demo.random_start_tip(5, cubes, 1.0))  # seeded
    half = [demo.random_start_tip(s, cubes, 0.5) is not None for s in range(400)]
    assert 0.4 < np.mean(half) < 0.6
    with pytest.raises(ValueError, match="probability"):
        demo.random_start_tip(0, cubes, 1.5)
    with pytest.raises(ValueError, match="random_start_probability"):
        DemoConfig(random_start_probability=-0.1).validated()
    with pytest.raises(ValueError, match="record_workers"):
        DemoConfig(record_workers=0).validated()


def test_parallel_recording_writes_the_same_episodes_with_random_starts(tmp_path):
    """Two recording processes give the bags one process gives; random starts begin away from rest."""
    from openvla_ros.eval.bags import RosBag
    from openvla_ros.sim.scene import PandaScene

    config = DemoConfig(episodes=4, held_out=1, episode_seconds=1.0, random_start_probability=0.5, paired_targets=True)
    results = {}
    for workers in (1, 2):
        run = tmp_path / f"w{workers}"
        results[workers] = demo.step_record(run, replace(config, record_workers=workers), demo._Progress(False, lambda: 0.0))
    assert results[1]["episodes"] == [
        {**e, "bag": e["bag"].replace(str(tmp_path / "w2"), str(tmp_path / "w1"))} for e in results[2]["episodes"]]
    assert results[1]["random_starts"] == sum(e["start_tip"] is not None for e in results[1]["episodes"])
    assert 0 < results[1]["random_starts"] < 4  # seeds 0 and 1 draw both kinds at probability 0.5
    # Paired targets: each scene (seed) twice, once per cube, with the same start.
    eps = results[1]["episodes"]
    assert [e["seed"] for e in eps] == [0, 0, 1, 1]
    assert [e["target"] for e in eps] == ["blue", "red", "blue", "red"]
    assert [e["instruction"] for e in eps[:2]] == ["reach the blue cube", "reach the red cube"]
    assert eps[0]["start_tip"] == eps[1]["start_tip"] and eps[2]["start_tip"] == eps[3]["start_tip"]
    assert demo.record_scene(replace(config, paired_targets=False), 3) == (3, None)
    with PandaScene(0) as scene:
        rest_tip = scene.tip_position()
    for e in results[2]["episodes"]:
        with RosBag(e["bag"]) as bag:
            first = next(iter(bag.messages([demo.TOPIC_TIP_POSE]))).msg.pose.position
        first = np.array([first.x, first.y, first.z])
        expected = rest_tip if e["start_tip"] is None else np.asarray(e["start_tip"])
        np.testing.assert_allclose(first, expected, atol=5e-3)


def test_the_latency_sweep_step_reports_every_cell_and_the_report_shows_it(tiny_run):
    run_dir, _ = tiny_run
    results = json.loads((run_dir / "latency" / "results.json").read_text())
    cells = {(c["geometry"], c["strategy"]): c for c in results["cells"]}
    assert set(cells) == {(g, s) for g in ("chunk", "one_action") for s in ("replace", "auto")}
    # The first action alone, 0.3 s late, has expired under the plain timeline; auto plays it.
    assert cells[("one_action", "replace")]["moving_fraction"] == 0.0
    assert cells[("one_action", "auto")]["moving_fraction"] > 0.9
    assert (run_dir / "latency" / "sweep.png").is_file() and (run_dir / "latency" / "report.md").is_file()
    report = (run_dir / "report.md").read_text()
    assert "## At other inference latencies" in report and "| one_action | auto |" in report
