"""The paged torch backend equals dense causal attention for ragged batches mixing prefill, chunked prefill over a
cached prefix and decode, with block tables in random order."""

import torch
import torch.nn.functional as F

from spaceserve.layers.attention import TorchAttentionBackend, build_attention_metadata

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 4, 2, 16, 4, 40


def dense_reference(q, k, v, scale):
    """q: [Lq, H, D] for the last Lq positions of a context of k/v: [L, Hkv, D]."""
    total, q_len = k.shape[0], q.shape[0]
    mask = torch.arange(total)[None, :] <= torch.arange(total - q_len, total)[:, None]
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def test_paged_attention_matches_dense_causal_attention():
    gen = torch.Generator().manual_seed(0)
    kv_cache = torch.randn(2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM, generator=gen)  # garbage in unused slots
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    # (tokens already cached, new tokens): a fresh prefill, a chunk over a cached prefix, two decodes
    shapes = [(0, 11), (9, 6), (13, 1), (4, 1)]
    scale = DIM**-0.5
    full_k, full_v, tables = [], [], []
    for cached, new in shapes:
        total = cached + new
        blocks = [free_blocks.pop() for _ in range(-(-total // BLOCK))]
        tables.append(blocks)
        k = torch.randn(total, KV_HEADS, DIM, generator=gen)
        v = torch.randn(total, KV_HEADS, DIM, generator=gen)
        for i in range(cached):  # the prefix is already in the cache
            kv_cache[0, blocks[i // BLOCK], i % BLOCK] = k[i]
            kv_cache[1, blocks[i // BLOCK], i % BLOCK] = v[i]
        full_k.append(k)
        full_v.append(v)
    queries = [torch.randn(new, HEADS, DIM, generator=gen) for _, new in shapes]
    metadata = build_attention_metadata(
        [n for _, n in shapes], [c + n for c, n in shapes], tables, BLOCK, torch.device("cpu")
    )
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    out = TorchAttentionBackend().forward(torch.cat(queries), new_k, new_v, kv_cache, metadata, scale)
    expected = torch.cat([dense_reference(q, k, v, scale) for q, k, v in zip(queries, full_k, full_v)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for (cached, new), k, blocks in zip(shapes, full_k, tables):  # new keys were written where the table says
        last = cached + new - 1
        torch.testing.assert_close(kv_cache[0, blocks[last // BLOCK], last % BLOCK], k[last])
