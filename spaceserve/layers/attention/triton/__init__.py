"""Triton kernels behind the `triton` attention backend and the vision towers' varlen attention."""

from spaceserve.layers.attention.triton.common import (
    DECODE_CONFIG,
    PREFILL_TILING,
    VARLEN_SHORT_TILING,
    VARLEN_TILING,
    AttentionTiling,
    DecodeConfig,
    attention_tiling,
    build_work_list,
    interpreting,
    split_head_dim,
    varlen_tiling,
)
from spaceserve.layers.attention.triton.kv_store import store_kv
from spaceserve.layers.attention.triton.paged_decode import num_decode_splits, paged_decode
from spaceserve.layers.attention.triton.paged_prefill import paged_prefill
from spaceserve.layers.attention.triton.varlen import varlen_attention

__all__ = [
    "DECODE_CONFIG",
    "PREFILL_TILING",
    "VARLEN_SHORT_TILING",
    "VARLEN_TILING",
    "AttentionTiling",
    "DecodeConfig",
    "attention_tiling",
    "build_work_list",
    "interpreting",
    "num_decode_splits",
    "paged_decode",
    "paged_prefill",
    "split_head_dim",
    "store_kv",
    "varlen_attention",
    "varlen_tiling",
]
