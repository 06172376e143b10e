"""Loading a checkpoint's tokenizer and building the prompt's token ids.

`tokenizer.json` is read with the `tokenizers` library, which is what the reference's fast Llama
tokenizer runs; a checkpoint with only `tokenizer.model` falls back to transformers (needs
sentencepiece). The reference appends the SentencePiece space piece ("▁", id 29871 for Llama 2)
after the prompt when it is not already the last token; its id is looked up, not assumed.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError
from .constants import SPACE_PIECE
from .prompt import build_prompt


class PromptTokenizer:
    """Instruction -> input ids: BOS + prompt tokens (+ the space piece)."""

    def __init__(self, checkpoint_dir):
        path = Path(checkpoint_dir)
        json_file = path / "tokenizer.json"
        if json_file.exists():
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_file(str(json_file))
            except Exception as exc:  # tokenizers raises a bare Exception for malformed files
                raise CheckpointError(f"cannot read {json_file}: {exc}") from None
            self._encode = lambda text: self._tok.encode(text).ids
            self._token_id = self._tok.token_to_id
        elif (path / "tokenizer.model").exists():
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(path))
            self._encode = lambda text: self._tok(text)["input_ids"]
            self._token_id = self._tok.convert_tokens_to_ids
        else:
            raise CheckpointError(f"{path} has no tokenizer.json or tokenizer.model")
        space = self._token_id(SPACE_PIECE)
        if space is None:
            raise CheckpointError(f"tokenizer in {path} has no {SPACE_PIECE!r} piece")
        self.space_token_id = int(space)
        bos = self._token_id("<s>")
        self.bos_token_id = None if bos is None else int(bos)

    def input_ids(self, instruction: str, prompt_style: str) -> list[int]:
        ids = list(self._encode(build_prompt(instruction, prompt_style)))
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            raise CheckpointError(f"tokenizer did not add BOS ({self.bos_token_id}); got {ids[:4]}")
        if ids[-1] != self.space_token_id:
            ids.append(self.space_token_id)
        return ids
