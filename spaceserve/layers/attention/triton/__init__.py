"""Triton kernels behind the `triton` attention backend and the vision towers' varlen attention."""

from spaceserve.layers.attention.triton.common import AttentionTiling, attention_tiling, build_work_list, interpreting
from spaceserve.layers.attention.triton.kv_store import store_kv
from spaceserve.layers.attention.triton.paged_decode import num_decode_splits, paged_decode
from spaceserve.layers.attention.triton.paged_prefill import paged_prefill
from spaceserve.layers.attention.triton.varlen import varlen_attention

__all__ = [
    "AttentionTiling",
    "attention_tiling",
    "build_work_list",
    "interpreting",
    "num_decode_splits",
    "paged_decode",
    "paged_prefill",
    "store_kv",
    "varlen_attention",
]
