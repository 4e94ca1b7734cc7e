"""Tokenizers: Hugging Face tokenizer.json when the model has one, a byte-level fallback when it does not."""

from __future__ import annotations

import os
from pathlib import Path

from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ModelConfig
from spaceserve.tokenizer.base import IncrementalDetokenizer, Tokenizer
from spaceserve.tokenizer.byte_level import ByteLevelTokenizer, SpecialTokenIds
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE, ChatTemplate
from spaceserve.tokenizer.hf import HFTokenizer
from spaceserve.tokenizer.no_tokenizer import NoTokenizer

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "ByteLevelTokenizer",
    "ChatTemplate",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "NoTokenizer",
    "SpecialTokenIds",
    "Tokenizer",
    "load_tokenizer",
    "load_tokenizer_for",
]


def load_tokenizer(
    model_dir: str | os.PathLike[str] | None,
    model_config: ModelConfig,
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    skip_tokenizer_init: bool = False,
) -> Tokenizer:
    """HFTokenizer when the tokenizer directory (`tokenizer_dir`, else `model_dir`) has a tokenizer.json, else
    ByteLevelTokenizer with the config's special ids; NoTokenizer with `skip_tokenizer_init`."""
    default_eos = model_config.eos_token_ids[0] if model_config.eos_token_ids else None
    if skip_tokenizer_init:
        return NoTokenizer(model_config.text.vocab_size, default_eos)
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise ConfigError(f"tokenizer {tokenizer_dir} has no tokenizer.json")
        return HFTokenizer.from_dir(tokenizer_dir, default_eos_token_id=default_eos)
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(model_dir, default_eos_token_id=default_eos)
    return ByteLevelTokenizer(SpecialTokenIds.from_model_config(model_config), model_config.text.vocab_size)


def load_tokenizer_for(config) -> Tokenizer:
    """The tokenizer an EngineConfig names: --tokenizer, else the model directory's; none with skip_tokenizer_init."""
    return load_tokenizer(
        config.model_dir, config.model_config, tokenizer_dir=config.tokenizer,
        skip_tokenizer_init=config.skip_tokenizer_init,
    )
