"""The tokenizer of an engine started with skip_tokenizer_init (a checkpoint without tokenizer files): prompts must be
token ids, outputs carry token ids and empty text. Whatever needs text fails with an error that says so."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spaceserve.core.errors import InvalidInputError
from spaceserve.tokenizer.base import Message

_NEEDS_TOKENIZER = "the engine was started with skip_tokenizer_init: {what} needs a tokenizer; send prompt_token_ids"


class NoTokenizer:
    def __init__(self, vocab_size: int, eos_token_id: int | None) -> None:
        self._vocab_size = vocab_size
        self._eos_token_id = -1 if eos_token_id is None else eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return ()

    def encode(self, text: str) -> list[int]:
        raise InvalidInputError(_NEEDS_TOKENIZER.format(what="a text prompt"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""

    def token_to_id(self, token: str) -> int | None:
        return None

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, *, chat_template: Any = None,
        **template_kwargs: Any,
    ) -> str:
        raise InvalidInputError(_NEEDS_TOKENIZER.format(what="a chat request"))

    def new_detokenizer(self, skip_special_tokens: bool = True) -> _NoText:
        return _NoText()


class _NoText:
    text = ""

    def step(self, token_id: int) -> str:
        return ""

    def finish(self) -> str:
        return ""
