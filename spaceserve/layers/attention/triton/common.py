"""What the attention kernels share: tunable launch configurations and their defaults, the host-side work lists,
the dot precision per dtype, and how a head dimension is split into power-of-two parts for the dots.

The defaults below are what the backend and the vision towers use; scripts/tune_attention.py times grids of
configurations on the GPU and says which values to put here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from triton import knobs

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 runs kernels on CPU tensors (tests)."""
    return bool(knobs.runtime.interpret)


def _check_power_of_two(owner: str, **values: int) -> None:
    for label, value in values.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{owner}.{label} must be a power of two, got {value}")


@dataclass(frozen=True)
class AttentionTiling:
    """Tile shapes of the FlashAttention-style kernels (paged prefill, vision varlen)."""

    block_m: int  # query rows per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        _check_power_of_two("AttentionTiling", block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps)
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"tl.dot needs tiles of at least 16, got block_m {self.block_m}, block_n {self.block_n}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


@dataclass(frozen=True)
class DecodeConfig:
    """Split-KV decode. split_tokens and max_splits fix how a sequence's context is cut into splits (a function of
    its own length only, so results never depend on the batch); the rest only changes speed."""

    split_tokens: int = 256  # context tokens per split, grown past max_splits splits
    block_n: int = 64  # keys per inner step (clamped to split_tokens)
    max_splits: int = 32  # partial results kept per (sequence, head)
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 4  # split programs launched per SM (they stride over the splits)

    def __post_init__(self) -> None:
        _check_power_of_two(
            "DecodeConfig", split_tokens=self.split_tokens, block_n=self.block_n, num_warps=self.num_warps
        )
        if self.split_tokens < 16 or self.block_n < 16:
            raise ValueError(f"DecodeConfig needs split_tokens and block_n >= 16, got {self.split_tokens}, {self.block_n}")
        if self.max_splits < 1 or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"DecodeConfig: max_splits, num_stages and programs_per_sm must be >= 1, got {self}")


# Defaults, per kernel. Short vision segments (Qwen2.5-VL's windows of 64 patches) get their own tiles: a
# 128-row tile would leave half of each program masked.
DECODE_CONFIG = DecodeConfig()
PREFILL_TILING = AttentionTiling(128, 64, 8, 3)
VARLEN_TILING = AttentionTiling(128, 64, 8, 3)
VARLEN_SHORT_TILING = AttentionTiling(64, 64, 4, 2)
SHORT_SEGMENT_TOKENS = 64  # segments no longer than this use VARLEN_SHORT_TILING
# the interpreter pays per program and per op: small tiles keep the tests quick
INTERPRETER_TILING = AttentionTiling(16, 16, 1, 1)


def attention_tiling(head_dim: int) -> AttentionTiling:
    """The paged prefill kernel's default tiles."""
    return INTERPRETER_TILING if interpreting() else PREFILL_TILING


def varlen_tiling(max_seqlen: int) -> AttentionTiling:
    """The vision varlen kernel's default tiles for a batch whose longest segment has max_seqlen rows."""
    if interpreting():
        return INTERPRETER_TILING
    return VARLEN_SHORT_TILING if max_seqlen <= SHORT_SEGMENT_TOKENS else VARLEN_TILING


def split_head_dim(head_dim: int, min_rest: int = 16) -> tuple[int, int]:
    """(main, rest): the largest power of two <= head_dim, and a power of two >= min_rest covering the remainder (0
    when head_dim is a power of two). Dots over 64 + 16 columns do 80 columns of work where one padded dot does 128."""
    if head_dim < 16:
        raise ValueError(f"head_dim must be >= 16, got {head_dim}")
    main = 1 << (head_dim.bit_length() - 1)
    remainder = head_dim - main
    if remainder == 0:
        return main, 0
    return main, max(min_rest, 1 << (remainder - 1).bit_length())


HEAD_SPLITS = ("padded", "split", "split32")


def head_dim_parts(head_dim: int, mode: str) -> tuple[int, int]:
    """The vision varlen kernel's (main, rest) column parts for `mode` (see HEAD_SPLITS and varlen.py)."""
    if mode == "padded":
        if head_dim < 16:
            raise ValueError(f"head_dim must be >= 16, got {head_dim}")
        return 1 << (head_dim - 1).bit_length(), 0
    if mode == "split":
        return split_head_dim(head_dim)
    if mode == "split32":
        return split_head_dim(head_dim, min_rest=32)
    raise ValueError(f"unknown head-dim split {mode!r}; known: {', '.join(HEAD_SPLITS)}")


def _default_head_split() -> str:
    mode = os.environ.get("SPACESERVE_VARLEN_HEAD_SPLIT", "padded")
    if mode not in HEAD_SPLITS:
        raise ValueError(f"SPACESERVE_VARLEN_HEAD_SPLIT must be one of {', '.join(HEAD_SPLITS)}, got {mode!r}")
    return mode


# The vision kernel's default: "padded" (head_dim 80 computed as 128). The "split" modes (80 = 64 + 16 or 64 + 32,
# no dot work on padding) pass under the interpreter but fault on the H200 with an out-of-bounds shared-memory read
# inside the dot (compute-sanitizer, commit 2f5dcb2: benchmarks/results/vision-graphs-h200/), as an earlier split
# kernel did (c1cf0dd, reverted in fcc662e). SPACESERVE_VARLEN_HEAD_SPLIT=split picks one without a code change.
VARLEN_HEAD_SPLIT = _default_head_split()


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
