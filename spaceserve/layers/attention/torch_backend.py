"""Reference attention in plain PyTorch: runs on CPU and CUDA, one sequence at a time. Faster kernels must agree
with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spaceserve.layers.attention.backend import AttentionBackend, AttentionMetadata


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # loops over sequences on host values: always eager

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        block_size = kv_cache.shape[2]
        output = torch.empty_like(query)
        query_start = 0
        for b, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu)):
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[b, :num_blocks].long()
            keys = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            values = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            q = query[query_start : query_start + query_len]
            # query i sits at absolute position seq_len - query_len + i and sees keys 0..that position
            q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=num_heads != num_kv_heads,
            )
            output[query_start : query_start + query_len] = out.transpose(0, 1)
            query_start += query_len
        return output
