"""The Triton attention backend: a KV store kernel, split-KV decode over the paged cache, and one causal prefill
launch for every sequence with more than one new token (chunked prefill over a cached prefix included).

Decode reads only device tensors and never the host copies of the sequence lengths, so a CUDA graph captured
over padded metadata (seq_lens 0, slot -1 in the padding rows) replays correctly. A mixed batch runs both
kernels: each skips the other's rows on the device, so every row is computed by the same kernel whatever else
shares its batch.
"""

from __future__ import annotations

import torch

from spaceserve.layers.attention.backend import AttentionBackend, AttentionMetadata
from spaceserve.layers.attention.triton import (
    DECODE_CONFIG,
    AttentionTiling,
    DecodeConfig,
    attention_tiling,
    build_work_list,
    paged_decode,
    paged_prefill,
    store_kv,
)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True  # the decode path reads only device tensors and launches a shape-fixed grid

    def __init__(self, decode_config: DecodeConfig | None = None, prefill_tiling: AttentionTiling | None = None) -> None:
        """decode_config: split size and launch settings of the decode kernels (the split size is fixed, so results
        do not depend on the batch); prefill_tiling: tiles of the prefill kernel. None: the tuned defaults in
        spaceserve.layers.attention.triton.common."""
        self.decode_config = decode_config or DECODE_CONFIG
        self.prefill_tiling = prefill_tiling
        self._prefill_work: tuple[AttentionMetadata, int, torch.Tensor] | None = None

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        _check_inputs(query, key, value, kv_cache, metadata)
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(query)
        self.attend(out, query, kv_cache, metadata, scale)
        return out

    def attend(
        self, out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> None:
        """Fill out [N, H, D] from the cache, which already holds this step's K/V."""
        has_prefill = metadata.max_query_len > 1
        if has_prefill:
            tiling = self.prefill_tiling or attention_tiling(query.shape[2])
            paged_prefill(
                out,
                query,
                kv_cache,
                metadata.block_tables,
                metadata.seq_lens,
                metadata.query_start_loc,
                self._prefill_work_list(metadata, tiling.block_m, query.device),
                scale,
                tiling,
            )
        if not has_prefill or 1 in metadata.query_lens_cpu:
            paged_decode(
                out,
                query,
                kv_cache,
                metadata.block_tables,
                metadata.seq_lens,
                metadata.query_start_loc,
                scale,
                self.decode_config,
            )

    def _prefill_work_list(self, metadata: AttentionMetadata, block_m: int, device: torch.device) -> torch.Tensor:
        """Built on the first layer of a step and reused by the others (they share the metadata object)."""
        cached = self._prefill_work
        if cached is not None and cached[0] is metadata and cached[1] == block_m:
            return cached[2]
        work = build_work_list(metadata.query_lens_cpu, block_m, min_length=2, device=device)
        self._prefill_work = (metadata, block_m, work)
        return work


def _check_inputs(query, key, value, kv_cache, metadata: AttentionMetadata) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous [2, num_blocks, block_size, Hkv, D] tensor, got {tuple(kv_cache.shape)}")
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    if key.shape[1:] != (num_kv_heads, head_dim) or value.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"key/value {tuple(key.shape)} do not match the cache's [{num_kv_heads}, {head_dim}] per token")
    if query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} needs head_dim {head_dim} and a multiple of {num_kv_heads} heads")
    if query.stride(2) != 1:
        raise ValueError("query must have a contiguous head dimension")
    if not (query.dtype == key.dtype == value.dtype == kv_cache.dtype):
        raise ValueError(f"query/key/value/kv_cache dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}, {kv_cache.dtype}")
    if metadata.block_tables.dtype != torch.int32 or metadata.block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be a row-contiguous int32 tensor")
