"""The one prompt builder for OpenVLA checkpoints (current "In: ... Out:" style and the v01 Vicuna style)."""
from __future__ import annotations

from .constants import PROMPT_STYLE_OPENVLA, PROMPT_STYLE_VICUNA, VICUNA_SYSTEM_PROMPT

PROMPT_STYLES = (PROMPT_STYLE_OPENVLA, PROMPT_STYLE_VICUNA)


def normalise_instruction(instruction: str) -> str:
    """Validate an instruction and return it as the prompt uses it (lower case, trimmed)."""
    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
    # Only the ends are trimmed (a topic message often carries a newline); inner text is kept as
    # the reference keeps it, so tokens stay identical.
    text = instruction.strip()
    if not text:
        raise ValueError(f"instruction is empty: {instruction!r}")
    return text.lower()


def build_prompt(instruction: str, style: str = PROMPT_STYLE_OPENVLA) -> str:
    """Return the text prompt the model was trained with for `instruction`."""
    text = normalise_instruction(instruction)
    if style == PROMPT_STYLE_OPENVLA:
        return f"In: What action should the robot take to {text}?\nOut:"
    if style == PROMPT_STYLE_VICUNA:
        return f"{VICUNA_SYSTEM_PROMPT} USER: What action should the robot take to {text}? ASSISTANT:"
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


def prompt_style_for(llm_backbone_id: str) -> str:
    """The style a checkpoint was trained with, from its LLM id (v01 checkpoints use Vicuna)."""
    return PROMPT_STYLE_VICUNA if llm_backbone_id.startswith("vicuna") else PROMPT_STYLE_OPENVLA
