"""`openvla-ros eval bag` end to end: a recorded bag (mcap), the real tiny engine, the report files."""
import json

import numpy as np

from openvla_ros.cli import main
from openvla_ros.eval.bag_writer import BagWriter
from conftest import random_image


def write_demo_bag(path, storage="mcap", frames=6):
    with BagWriter(path, storage=storage) as bag:
        bag.write_string("/vla/instruction", 0.0, "reach the red cube")
        for i in range(frames):
            t = 1.0 + 0.2 * i
            bag.write_image("/camera/image_raw", t, random_image(i, (96, 128, 3)))
            bag.write_twist("/vla/eef_delta", t, [0.05, -0.02, 0.0], [0.0, 0.0, 0.1])
    return path


def test_eval_bag_writes_reports(tmp_path, tiny_checkpoint, capsys):
    bag = write_demo_bag(tmp_path / "demo_bag")
    out = tmp_path / "eval"
    code = main(["eval", "bag", "--checkpoint", str(tiny_checkpoint), "--bags", str(bag), "--out", str(out),
                 "--truth-topic", "/vla/eef_delta"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 6
    assert set(summary["mae"]) >= {"dx", "dy", "dz"}
    lines = (out / "predictions.csv").read_text().strip().splitlines()
    assert len(lines) == 7
    assert (out / "report.md").exists() and list(out.glob("*.png"))
    assert "tiny" in capsys.readouterr().out


def test_eval_errors_name_the_problem(tmp_path, tiny_checkpoint, capsys):
    bag = write_demo_bag(tmp_path / "bag2", storage="sqlite3", frames=2)
    code = main(["eval", "bag", "--checkpoint", str(tiny_checkpoint), "--bags", str(bag), "--out", str(tmp_path / "o"),
                 "--truth-topic", "/nope"])
    err = capsys.readouterr().err
    assert code == 2 and "/nope" in err and "/camera/image_raw" in err
    assert main(["eval", "topics", str(bag)]) == 0
    out = capsys.readouterr().out
    assert "/camera/image_raw\tsensor_msgs/msg/Image\t2" in out
