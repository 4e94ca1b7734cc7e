"""What the engine needs from a tokenizer, whatever backs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Message = Mapping[str, Any]


@runtime_checkable
class IncrementalDetokenizer(Protocol):
    """Turns generated ids into text one id at a time; `text` is everything emitted so far (for stop strings)."""

    def step(self, token_id: int) -> str:
        """The new text this id completes; empty while a multi-byte character is still incomplete."""
        ...

    def finish(self) -> str:
        """End of the stream: the text still held back, an incomplete trailing character as U+FFFD."""
        ...

    @property
    def text(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def all_special_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in it (``<|im_start|>``, ``<|image_pad|>``) map to their ids.

        No BOS is prepended (Qwen uses none).
        """
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        chat_template: Any = None,
        **template_kwargs: Any,
    ) -> str: ...

    def new_detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer: ...
