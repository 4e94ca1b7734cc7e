"""A real Hugging Face tokenizer.json for the tiny test checkpoints (vocab_size 320).

Byte-level BPE laid out like Qwen's: the 256 byte tokens (GPT-2's byte-to-unicode alphabet) at ids 0..255 so
id == byte value, the 14 Qwen special tokens from `bos_token_id` on (256..269 by default, matching the tiny
configs), then BPE merges learned from a small fixed text up to the vocabulary size. The pre-tokenizer,
normalizer and decoder are Qwen2's, so transformers' Qwen2Tokenizer and the raw tokenizers library agree.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from spaceserve.tokenizer.byte_level import NUM_BYTE_TOKENS, QWEN_SPECIAL_TOKENS
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE

TINY_VOCAB_SIZE = 320
# Qwen2's pre-tokenization pattern (published in its tokenizer.json): contractions, letter runs, single digits,
# punctuation runs, newlines and spaces.
QWEN2_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MERGE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Describe this image in detail. "
    "What is in the picture? There is a cat sitting on the table next to the window. "
    "The image shows the sun setting over the sea, and the sky is orange and red. "
    "Answer the question with one word. Count the objects in the scene. "
    "system user assistant user assistant"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to 256 and up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in mapping)
    for offset, byte in enumerate(shifted):
        mapping[byte] = chr(256 + offset)
    return dict(sorted(mapping.items()))


def write_tiny_tokenizer(model_dir: Path, bos_token_id: int = 256, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `model_dir`; return it."""
    special_ids = {token: bos_token_id + offset for offset, token in enumerate(QWEN_SPECIAL_TOKENS)}
    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    vocab.update(special_ids)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = [[*word] for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(MERGE_CORPUS)]
    free_ids = [i for i in range(NUM_BYTE_TOKENS, vocab_size) if i not in special_ids.values()]
    merges = _learn_merges(words, set(vocab), budget=len(free_ids))
    for (left, right), token_id in zip(_new_tokens(merges, set(vocab)), free_ids):
        vocab[left + right] = token_id

    # The model is rebuilt now that the merges are known; the pipeline around it carries over.
    tokenizer.model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])

    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 4096,
        "errors": "replace",
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (model_dir / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    return model_dir


def _learn_merges(words: list[list[str]], known: set[str], budget: int) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair (ties broken by the pair itself) until `budget` new
    tokens exist or nothing is left to merge."""
    merges: list[tuple[str, str]] = []
    while len(_new_tokens(merges, known)) < budget:
        pairs = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        words = [_merge_pair(word, best) for word in words]
    return merges


def _new_tokens(merges: list[tuple[str, str]], known: set[str]) -> list[tuple[str, str]]:
    """The merges whose result is a token not seen before (two merge paths can spell the same token)."""
    seen = set(known)
    fresh = []
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            fresh.append((left, right))
    return fresh


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(word[index] + word[index + 1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return merged
