"""Tokenizers: Hugging Face tokenizer.json when the model has one, a byte-level fallback when it does not."""

from __future__ import annotations

import os
from pathlib import Path

from spaceserve.models.config import ModelConfig
from spaceserve.tokenizer.base import IncrementalDetokenizer, Tokenizer
from spaceserve.tokenizer.byte_level import ByteLevelTokenizer, SpecialTokenIds
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE, ChatTemplate
from spaceserve.tokenizer.hf import HFTokenizer

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "ByteLevelTokenizer",
    "ChatTemplate",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "SpecialTokenIds",
    "Tokenizer",
    "load_tokenizer",
]


def load_tokenizer(model_dir: str | os.PathLike[str] | None, model_config: ModelConfig) -> Tokenizer:
    """HFTokenizer when `model_dir` has a tokenizer.json, else ByteLevelTokenizer with the config's special ids."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        default_eos = model_config.eos_token_ids[0] if model_config.eos_token_ids else None
        return HFTokenizer.from_dir(model_dir, default_eos_token_id=default_eos)
    return ByteLevelTokenizer(SpecialTokenIds.from_model_config(model_config), model_config.text.vocab_size)
