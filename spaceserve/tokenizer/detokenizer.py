"""Incremental detokenizers: generated ids in, new text out, one id at a time."""

from __future__ import annotations

import codecs
from collections.abc import Mapping

import tokenizers
from tokenizers.decoders import DecodeStream


class HFDetokenizer:
    """Streams through the tokenizers library's DecodeStream, which buffers incomplete UTF-8 itself."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._held_back: list[int] = []  # ids since the stream last produced text
        self._text = ""

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tokenizer, token_id)  # None: nothing decodable yet (or an unknown id)
        if piece is None:
            self._held_back.append(token_id)
            return ""
        self._held_back.clear()
        self._text += piece
        return piece

    def finish(self) -> str:
        """End of the stream: what DecodeStream still holds, decoded as a whole decode() would (U+FFFD)."""
        piece = self._tokenizer.decode(self._held_back, skip_special_tokens=self._skip_special_tokens)
        self._held_back.clear()
        self._text += piece
        return piece

    @property
    def text(self) -> str:
        return self._text


class ByteLevelDetokenizer:
    """For ByteLevelTokenizer: an id is one byte (id % 256) unless it is a special token.

    A special token that is kept ends any incomplete UTF-8 sequence before it (as U+FFFD); a skipped one is
    invisible, so bytes on either side of it still join.
    """

    def __init__(self, special_tokens: Mapping[int, str], skip_special_tokens: bool = True) -> None:
        self._special_tokens = special_tokens
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""

    def step(self, token_id: int) -> str:
        special = self._special_tokens.get(token_id)
        if special is None:
            piece = self._utf8.decode(bytes((token_id % 256,)))
        elif self._skip_special_tokens:
            piece = ""
        else:
            piece = self._drain() + special
        self._text += piece
        return piece

    def finish(self) -> str:
        """End of the stream: an incomplete trailing UTF-8 sequence comes out as U+FFFD."""
        piece = self._drain()
        self._text += piece
        return piece

    def _drain(self) -> str:
        piece = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return piece

    @property
    def text(self) -> str:
        return self._text
