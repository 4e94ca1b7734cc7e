"""Chained content hashes of full KV blocks, the keys of the prefix cache.

A block's hash covers its parent's hash (hence the whole prefix), its token ids and the hashes of the images whose
placeholders overlap it. The images matter: every `<|image_pad|>` token has the same id, so two prompts that differ
only in an image have identical token ids and only the image hash tells their KV apart.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from spaceserve.core.request import Request

# Domain-separation tags, so that no parent/tokens/extra-key split can be confused with another.
_ROOT = b"spaceserve-kv-root"
_PARENT = b"P"
_TOKENS = b"T"
_EXTRA = b"E"


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """sha256 of (parent hash, token ids, extra keys); extra keys are str, bytes or int (mm hashes)."""
    hasher = hashlib.sha256()
    hasher.update(_ROOT if parent_hash is None else _PARENT + parent_hash)
    tokens = array("q", token_ids).tobytes()
    hasher.update(_TOKENS + len(token_ids).to_bytes(8, "little") + tokens)
    # repr of a tuple of str/bytes/int is unambiguous (quoted, escaped, typed) and stable across runs.
    hasher.update(_EXTRA + repr(tuple(extra_keys)).encode())
    return hasher.digest()


def block_extra_keys(request: Request, start: int, end: int) -> tuple[str, ...]:
    """The mm_hash of every image whose placeholder overlaps token range [start, end), in placeholder order."""
    return tuple(feature.mm_hash for _, feature in request.mm_features_overlapping(start, end))


def extend_block_hashes(request: Request, block_size: int) -> int:
    """Append to `request.block_hashes` the hashes of its full blocks not hashed yet; returns how many."""
    token_ids = request.all_token_ids
    num_full_blocks = len(token_ids) // block_size
    first_new = len(request.block_hashes)
    for index in range(first_new, num_full_blocks):
        start, end = index * block_size, (index + 1) * block_size
        parent = request.block_hashes[index - 1] if index > 0 else None
        block_hash = hash_block(parent, token_ids[start:end], block_extra_keys(request, start, end))
        request.block_hashes.append(block_hash)
    return max(0, num_full_blocks - first_new)
