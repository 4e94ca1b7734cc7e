"""What the attention kernels share: tile shapes, the host-side work lists, the dot precision per dtype."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from triton import knobs

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 runs kernels on CPU tensors (tests)."""
    return bool(knobs.runtime.interpret)


@dataclass(frozen=True)
class AttentionTiling:
    """Tile shapes of the FlashAttention-style kernels (paged prefill, vision varlen)."""

    block_m: int  # query rows per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def attention_tiling(head_dim: int) -> AttentionTiling:
    if interpreting():  # the interpreter pays per program and per op: small tiles keep the tests quick
        return AttentionTiling(16, 16, 1, 1)
    if head_dim <= 64:
        return AttentionTiling(128, 64, 4, 3)
    return AttentionTiling(128, 64, 8, 3)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get full-precision dots (the torch reference's numerics); tf32 is ignored for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def build_work_list(lengths: Sequence[int], block_m: int, min_length: int, device: torch.device) -> torch.Tensor:
    """[num_work, 2] int32 (segment index, first row) for every block_m rows of each segment with at least
    min_length rows. Later blocks come first: under a causal mask they see the most keys."""
    work = [
        (index, start)
        for index, length in enumerate(lengths)
        if length >= min_length
        for start in reversed(range(0, length, block_m))
    ]
    return torch.tensor(work, dtype=torch.int32, device=device).reshape(len(work), 2)
