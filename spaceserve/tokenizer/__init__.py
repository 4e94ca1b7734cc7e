"""Tokenizers: a byte-level fallback for models shipped without tokenizer files."""

from __future__ import annotations

from spaceserve.tokenizer.base import IncrementalDetokenizer, Tokenizer
from spaceserve.tokenizer.byte_level import ByteLevelTokenizer, SpecialTokenIds
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE, ChatTemplate

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "ByteLevelTokenizer",
    "ChatTemplate",
    "IncrementalDetokenizer",
    "SpecialTokenIds",
    "Tokenizer",
]
