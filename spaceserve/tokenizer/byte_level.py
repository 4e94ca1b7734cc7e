"""A tokenizer for models shipped without tokenizer files: UTF-8 bytes plus Qwen's special tokens.

Used e.g. when serving a real-size config with dummy weights: prompts still encode, chat templates still
render, and whatever ids the model samples still decode.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.models.config import ModelConfig
from spaceserve.tokenizer.base import Message
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE, ChatTemplate
from spaceserve.tokenizer.detokenizer import ByteLevelDetokenizer

# Qwen2-VL's special tokens in the order of SpecialTokenIds' fields (and of their ids in real checkpoints).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
NUM_BYTE_TOKENS = 256


@dataclass(frozen=True)
class SpecialTokenIds:
    endoftext: int
    im_start: int
    im_end: int
    object_ref_start: int
    object_ref_end: int
    box_start: int
    box_end: int
    quad_start: int
    quad_end: int
    vision_start: int
    vision_end: int
    vision_pad: int
    image_pad: int
    video_pad: int

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> SpecialTokenIds:
        """<|endoftext|> is bos_token_id and the eight text specials follow it; the vision ids come from the config.

        ModelConfig does not keep ``vision_token_id``; every Qwen2-VL / Qwen2.5-VL config puts it at
        vision_start + 2, so that is used.
        """
        bos = config.bos_token_id
        if bos is None:
            raise ConfigError("config.json lacks bos_token_id, which places Qwen's special tokens")
        return cls(
            endoftext=bos,
            im_start=bos + 1,
            im_end=bos + 2,
            object_ref_start=bos + 3,
            object_ref_end=bos + 4,
            box_start=bos + 5,
            box_end=bos + 6,
            quad_start=bos + 7,
            quad_end=bos + 8,
            vision_start=config.vision_start_token_id,
            vision_end=config.vision_end_token_id,
            vision_pad=config.vision_start_token_id + 2,
            image_pad=config.image_token_id,
            video_pad=config.video_token_id,
        )

    def by_token(self) -> dict[str, int]:
        return dict(zip(QWEN_SPECIAL_TOKENS, astuple(self)))


class ByteLevelTokenizer:
    """Text bytes are ids 0..255; special tokens have the ids the model config gives them.

    Decoding maps any other id (a dummy-weight model samples anything below vocab_size) to the byte id % 256.
    """

    def __init__(self, special_ids: SpecialTokenIds, vocab_size: int) -> None:
        self._id_by_special = special_ids.by_token()
        self._special_by_id = {token_id: token for token, token_id in self._id_by_special.items()}
        ids = list(self._id_by_special.values())
        if len(self._special_by_id) != len(ids):
            raise ConfigError(f"special token ids must be distinct, got {special_ids}")
        if min(ids) < NUM_BYTE_TOKENS or max(ids) >= vocab_size:
            raise ConfigError(f"special token ids must lie in [{NUM_BYTE_TOKENS}, {vocab_size}), got {special_ids}")
        self._special_ids = special_ids
        self._vocab_size = vocab_size
        by_length = sorted(self._id_by_special, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(token) for token in by_length) + ")")
        self._chat_template = ChatTemplate(QWEN2_VL_CHAT_TEMPLATE)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_id(self) -> int:
        return self._special_ids.im_end

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._special_by_id))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # split() with a capturing group alternates plain text (even indices) and special tokens (odd).
        for index, chunk in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self._id_by_special[chunk])
            else:
                try:
                    ids.extend(chunk.encode("utf-8"))
                except UnicodeEncodeError as exc:
                    raise InvalidInputError(f"text is not valid Unicode: {exc}") from None
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        detokenizer = self.new_detokenizer(skip_special_tokens)
        for token_id in ids:
            detokenizer.step(int(token_id))
        detokenizer.finish()
        return detokenizer.text

    def token_to_id(self, token: str) -> int | None:
        """Special tokens, and single characters that are one UTF-8 byte (ASCII)."""
        if token in self._id_by_special:
            return self._id_by_special[token]
        encoded = token.encode("utf-8", errors="replace")
        return encoded[0] if len(encoded) == 1 else None

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        chat_template: Any = None,
        **template_kwargs: Any,
    ) -> str:
        template = chat_template or self._chat_template  # a ChatTemplate given by the caller (--chat-template)
        return template.render(messages, add_generation_prompt, **template_kwargs)

    def new_detokenizer(self, skip_special_tokens: bool = True) -> ByteLevelDetokenizer:
        return ByteLevelDetokenizer(self._special_by_id, skip_special_tokens)
