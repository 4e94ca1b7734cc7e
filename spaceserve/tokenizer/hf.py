"""Hugging Face tokenizers: tokenizer.json through the `tokenizers` library, settings from tokenizer_config.json."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from spaceserve.core.errors import ConfigError
from spaceserve.tokenizer.base import Message
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE, ChatTemplate, find_chat_template
from spaceserve.tokenizer.detokenizer import HFDetokenizer

# tokenizer_config.json keys whose token strings chat templates may refer to (transformers passes them too).
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer:
    """A tokenizers.Tokenizer plus the eos token and chat template its model directory declares."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token_id: int,
        chat_template: str = QWEN2_VL_CHAT_TEMPLATE,
        template_tokens: dict[str, str] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._eos_token_id = eos_token_id
        self._chat_template = ChatTemplate(chat_template)
        self._template_tokens = dict(template_tokens or {})
        special = {token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special}
        self._all_special_ids = tuple(sorted(special | {eos_token_id}))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str], default_eos_token_id: int | None = None) -> HFTokenizer:
        """Load tokenizer.json; eos from tokenizer_config.json, else `default_eos_token_id` (the model config's)."""
        directory = Path(model_dir)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # the library raises plain Exception for unreadable or malformed files
            raise ConfigError(f"cannot load {directory / 'tokenizer.json'}: {exc}") from None
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
        template_tokens = {
            key: token for key in _TEMPLATE_TOKEN_KEYS if (token := _token_string(config.get(key))) is not None
        }
        eos_token = template_tokens.get("eos_token")
        if eos_token is not None:
            eos_token_id = tokenizer.token_to_id(eos_token)
            if eos_token_id is None:
                raise ConfigError(f"tokenizer_config.json's eos_token {eos_token!r} is not in the vocabulary")
        elif default_eos_token_id is not None:
            eos_token_id = default_eos_token_id
        else:
            raise ConfigError(f"{directory} names no eos token (tokenizer_config.json eos_token)")
        return cls(
            tokenizer,
            eos_token_id=eos_token_id,
            chat_template=find_chat_template(directory) or QWEN2_VL_CHAT_TEMPLATE,
            template_tokens=template_tokens,
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return self._all_special_ids

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        chat_template: Any = None,
        **template_kwargs: Any,
    ) -> str:
        template = chat_template or self._chat_template  # a ChatTemplate given by the caller (--chat-template)
        return template.render(messages, add_generation_prompt, **{**self._template_tokens, **template_kwargs})

    def new_detokenizer(self, skip_special_tokens: bool = True) -> HFDetokenizer:
        return HFDetokenizer(self._tokenizer, skip_special_tokens)


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
