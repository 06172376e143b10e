import json
import subprocess
import sys

from PIL import Image

from openvla_ros.cli import main
from conftest import random_image


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "openvla_ros.cli", *args], capture_output=True, text=True, timeout=300)


def test_predict_json(tmp_path, tiny_checkpoint):
    image_file = tmp_path / "frame.png"
    Image.fromarray(random_image(0)).save(image_file)
    result = run_cli("predict", "--checkpoint", str(tiny_checkpoint), "--image", str(image_file),
                     "--instruction", "reach the red cube", "--repeat", "3", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["action"]) == 7 and len(out["tokens"]) == 7
    assert out["dims"][0] == "dx" and out["latency_ms"] > 0
    assert out["tokens_repeatable"] is True


def test_bench_engine_json(tiny_checkpoint):
    result = run_cli("bench", "engine", "--checkpoint", str(tiny_checkpoint), "--runs", "2", "--warmup", "1", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens_identical"] is True
    assert out["speedup_lm"] > 0 and out["speedup_total"] > 0
    assert set(out["ours_ms"]) >= {"prefill", "decode", "lm", "total"}


def test_make_tiny_checkpoint_and_errors(tmp_path, capsys):
    assert main(["make-tiny-checkpoint", str(tmp_path / "k2"), "--chunk", "2", "--seed", "3"]) == 0
    config = json.loads((tmp_path / "k2" / "config.json").read_text())
    assert config["action_chunk_len"] == 2
    assert main(["make-tiny-checkpoint", str(tmp_path / "k0"), "--chunk", "0"]) == 2
    assert "--chunk must be >= 1, got 0" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "k2"), "--image", str(tmp_path / "none.png"),
                 "--instruction", "x"]) == 2
    assert "none.png does not exist" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["predict", "--checkpoint", str(tmp_path / "missing"), "--image", str(tmp_path / "bad.png"),
                 "--instruction", "x"]) == 2
    assert "cannot read image" in capsys.readouterr().err
