import pytest

from openvla_ros.vla.prompt import build_prompt, prompt_style_for


def test_openvla_prompt():
    assert build_prompt("Pick up the Red Screw") == "In: What action should the robot take to pick up the red screw?\nOut:"


def test_vicuna_prompt():
    text = build_prompt("open the drawer", "vicuna")
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert text.endswith("USER: What action should the robot take to open the drawer? ASSISTANT:")
    assert prompt_style_for("vicuna-v15-7b") == "vicuna"
    assert prompt_style_for("llama2-7b-pure") == "openvla"


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_empty_instruction_is_an_error(bad):
    with pytest.raises(ValueError, match="instruction is empty"):
        build_prompt(bad)


def test_unknown_style():
    with pytest.raises(ValueError, match="'chatml'"):
        build_prompt("x", "chatml")
