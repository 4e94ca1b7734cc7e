"""The Triton attention kernels equal a dense reference on fresh random inputs: KV store (padded slots skipped),
split-KV decode over paged KV (GQA, block tables in random order, padded graph rows, stale host lengths), causal
prefill over a cached prefix, mixed batches, and vision varlen attention with head_dim 80.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; with CUDA the same
tests also run at Qwen2-VL sizes in bf16 (marked gpu)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from spaceserve.layers.attention import AttentionMetadata, build_attention_metadata, get_attention_backend

triton = pytest.importorskip("triton")

from spaceserve.layers.attention.triton import AttentionTiling, DecodeConfig, store_kv, varlen_attention  # noqa: E402
from spaceserve.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from spaceserve.layers.attention.varlen import build_varlen_segments, varlen_attention_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


@dataclass(frozen=True)
class Shapes:
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    split_tokens: int
    decode_contexts: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]  # (tokens already cached, new tokens) per sequence; new == 1 is a decode
    vision_heads: int
    vision_segments: tuple[int, ...]
    rel_tol: float


SMALL = Shapes(torch.float32, 4, 2, 16, 4, 16, (1, 5, 16, 17, 40, 77, 600), ((0, 11), (9, 6), (13, 1), (5, 37), (0, 2), (30, 5), (14, 18)), 2, (5, 1, 33, 16, 20), 1e-5)
QWEN2_VL_2B = Shapes(
    torch.bfloat16, 12, 2, 128, 16, 256, (1, 255, 256, 257, 1000, 4096, 3000, 17) * 4 + (9000, 20000),
    ((0, 1000), (3000, 700), (4000, 1), (16, 129), (0, 2), (511, 1), (62, 100)), 16, (9216, 1024, *([64] * 20), 1, 300), 1e-2,
)  # fmt: skip
QWEN2_VL_7B = Shapes(
    torch.bfloat16, 28, 4, 128, 16, 256, (4096, 1024, 77, 2049) * 4,
    ((0, 2048), (1500, 600), (700, 1), (33, 5)), 16, (1024, 1024, 1024, 1024, 5, 64), 1e-2,
)  # fmt: skip
# head_dim 24: the decode and prefill kernels' padded, masked head columns
SMALL_ODD_HEAD_DIM = Shapes(torch.float32, 6, 2, 24, 8, 32, (1, 9, 32, 33, 130, 2000), ((0, 19), (40, 3), (7, 1), (0, 40)), 3, (3, 17, 64), 1e-5)
SHAPES = [
    pytest.param(SMALL, id="small"),
    pytest.param(SMALL_ODD_HEAD_DIM, id="small-head-dim-24"),
    pytest.param(QWEN2_VL_2B, id="qwen2-vl-2b", marks=gpu_only),
    pytest.param(QWEN2_VL_7B, id="qwen2-vl-7b", marks=gpu_only),
]


@pytest.fixture
def gen():
    """A fresh seed every run, printed on failure."""
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def assert_close(out: torch.Tensor, expected: torch.Tensor, rel_tol: float) -> None:
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite output rows"
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < rel_tol, f"relative error {error:.2e} > {rel_tol:.0e}"


def reference_dtype() -> torch.dtype:
    return torch.float32 if HAS_CUDA else torch.float64


def dense_attention(q, k, v, scale, causal: bool):
    """q [Lq, H, D] at the last Lq positions of k/v [L, Hkv, D]; in float64 on CPU, float32 on CUDA."""
    dtype = reference_dtype()
    q, k, v = (x.to(dtype) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = None
    if causal:
        total, q_len = k.shape[0], q.shape[0]
        mask = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - q_len, total, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


@dataclass
class PagedBatch:
    kv_cache: torch.Tensor
    metadata: AttentionMetadata
    query: torch.Tensor
    new_key: torch.Tensor
    new_value: torch.Tensor
    full_keys: list[torch.Tensor]
    full_values: list[torch.Tensor]
    lengths: list[tuple[int, int]]


def make_paged_batch(gen, shapes: Shapes, lengths: list[tuple[int, int]], spare_blocks: int = 7) -> PagedBatch:
    """Sequences whose cached prefix is already in a random-garbage cache, block tables drawn in random order."""
    block = shapes.block_size
    blocks_needed = sum(-(-(c + n) // block) for c, n in lengths)
    num_blocks = blocks_needed + spare_blocks
    kv_cache = randn(gen, 2, num_blocks, block, shapes.kv_heads, shapes.head_dim, dtype=shapes.dtype)
    free = torch.randperm(num_blocks, generator=gen, device=DEVICE).tolist()
    tables, full_keys, full_values = [], [], []
    for cached, new in lengths:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block))]
        k = randn(gen, total, shapes.kv_heads, shapes.head_dim, dtype=shapes.dtype)
        v = randn(gen, total, shapes.kv_heads, shapes.head_dim, dtype=shapes.dtype)
        if cached:
            slots = torch.tensor([table[i // block] * block + i % block for i in range(cached)], device=DEVICE)
            kv_cache[0].view(-1, shapes.kv_heads, shapes.head_dim)[slots] = k[:cached]
            kv_cache[1].view(-1, shapes.kv_heads, shapes.head_dim)[slots] = v[:cached]
        tables.append(table)
        full_keys.append(k)
        full_values.append(v)
    metadata = build_attention_metadata([n for _, n in lengths], [c + n for c, n in lengths], tables, block, DEVICE)
    num_tokens = sum(n for _, n in lengths)
    query = randn(gen, num_tokens, shapes.heads, shapes.head_dim, dtype=shapes.dtype)
    new_key = torch.cat([k[c:] for k, (c, _) in zip(full_keys, lengths)])
    new_value = torch.cat([v[c:] for v, (c, _) in zip(full_values, lengths)])
    return PagedBatch(kv_cache, metadata, query, new_key, new_value, full_keys, full_values, lengths)


def expected_output(batch: PagedBatch, scale: float) -> torch.Tensor:
    parts, start = [], 0
    for (_, new), k, v in zip(batch.lengths, batch.full_keys, batch.full_values):
        parts.append(dense_attention(batch.query[start : start + new], k, v, scale, causal=True))
        start += new
    return torch.cat(parts)


def run_triton(backend: TritonAttentionBackend, batch: PagedBatch, scale: float, metadata=None) -> torch.Tensor:
    """store + attend into an output poisoned with NaN, so rows the kernels skip show up."""
    metadata = metadata or batch.metadata
    store_kv(batch.new_key, batch.new_value, batch.kv_cache, metadata.slot_mapping)
    out = torch.full_like(batch.query, float("nan"))
    backend.attend(out, batch.query, batch.kv_cache, metadata, scale)
    return out


@pytest.mark.parametrize("shapes", SHAPES)
def test_store_kv_writes_real_slots_and_skips_padding(gen, shapes):
    num_blocks, num_tokens = 13, 29
    cache = randn(gen, 2, num_blocks, shapes.block_size, shapes.kv_heads, shapes.head_dim, dtype=shapes.dtype)
    before = cache.clone()
    slots = torch.randperm(num_blocks * shapes.block_size, generator=gen, device=DEVICE)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen, device=DEVICE) < 0.3] = -1
    # value as a strided view into a wider projection output, as the model passes it
    qkv = randn(gen, num_tokens, 3, shapes.kv_heads, shapes.head_dim, dtype=shapes.dtype)
    key, value = qkv[:, 0].contiguous(), qkv[:, 2]
    store_kv(key, value, cache, slots)
    real = slots >= 0
    flat_before = before.view(2, -1, shapes.kv_heads, shapes.head_dim)
    expected = flat_before.clone()
    expected[0, slots[real]] = key[real]
    expected[1, slots[real]] = value[real]
    assert torch.equal(cache.view_as(expected), expected)


@pytest.mark.parametrize("shapes", SHAPES)
def test_decode_over_paged_kv_with_padded_graph_rows(gen, shapes):
    lengths = [(c - 1, 1) for c in shapes.decode_contexts]
    random.shuffle(lengths)
    batch = make_paged_batch(gen, shapes, lengths)
    scale = shapes.head_dim**-0.5
    expected = expected_output(batch, scale)

    # What a graphed decode passes: padded rows (seq_len 0, slot -1, table of zeros), a table as wide as the
    # longest allowed sequence, and host lengths left from another step.
    real, padding = len(lengths), 3
    md = batch.metadata
    width = md.block_tables.shape[1] + 5
    tables = torch.zeros(real + padding, width, dtype=torch.int32, device=DEVICE)
    tables[:real, : md.block_tables.shape[1]] = md.block_tables
    graphed = AttentionMetadata(
        query_start_loc=torch.arange(real + padding + 1, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.cat([md.seq_lens, torch.zeros(padding, dtype=torch.int32, device=DEVICE)]),
        block_tables=tables,
        slot_mapping=torch.cat([md.slot_mapping, torch.full((padding,), -1, dtype=torch.int64, device=DEVICE)]),
        query_lens_cpu=(1,) * (real + padding),
        seq_lens_cpu=(123456,) * (real + padding),
    )
    pad_q = randn(gen, padding, shapes.heads, shapes.head_dim, dtype=shapes.dtype)
    pad_kv = randn(gen, padding, shapes.kv_heads, shapes.head_dim, dtype=shapes.dtype)
    padded_batch = PagedBatch(
        batch.kv_cache,
        graphed,
        torch.cat([batch.query, pad_q]),
        torch.cat([batch.new_key, pad_kv]),
        torch.cat([batch.new_value, pad_kv]),
        batch.full_keys,
        batch.full_values,
        lengths,
    )
    cache_before = batch.kv_cache.clone()
    backend = TritonAttentionBackend(DecodeConfig(split_tokens=shapes.split_tokens))
    out = run_triton(backend, padded_batch, scale)
    assert_close(out[:real], expected, shapes.rel_tol)
    assert torch.equal(out[real:], torch.zeros_like(out[real:])), "padded rows must read as zeros"
    expected_cache = cache_before.view(2, -1, shapes.kv_heads, shapes.head_dim).clone()
    expected_cache[0, md.slot_mapping] = batch.new_key
    expected_cache[1, md.slot_mapping] = batch.new_value
    assert torch.equal(batch.kv_cache.view_as(expected_cache), expected_cache), "only the real rows' slots change"


@pytest.mark.parametrize("shapes", SHAPES)
def test_decode_result_does_not_depend_on_the_batch(gen, shapes):
    lengths = [(c - 1, 1) for c in shapes.decode_contexts]
    batch = make_paged_batch(gen, shapes, lengths)
    backend = TritonAttentionBackend(DecodeConfig(split_tokens=shapes.split_tokens))
    scale = shapes.head_dim**-0.5
    together = run_triton(backend, batch, scale)
    md = batch.metadata
    for b in random.sample(range(len(lengths)), 2):
        blocks = md.block_tables[b : b + 1, : -(-md.seq_lens_cpu[b] // shapes.block_size)]
        alone = AttentionMetadata(
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
            seq_lens=md.seq_lens[b : b + 1],
            block_tables=blocks.contiguous(),
            slot_mapping=md.slot_mapping[b : b + 1],
            query_lens_cpu=(1,),
            seq_lens_cpu=(md.seq_lens_cpu[b],),
        )
        out = torch.full_like(batch.query[b : b + 1], float("nan"))
        backend.attend(out, batch.query[b : b + 1], batch.kv_cache, alone, scale)
        assert torch.equal(out, together[b : b + 1])


@pytest.mark.parametrize("shapes", SHAPES)
def test_prefill_chunks_over_cached_prefix_in_a_mixed_batch(gen, shapes):
    longest = max(c + n for c, n in shapes.prefill)
    lengths = list(shapes.prefill) + [(random.randrange(longest), random.randrange(2, longest // 2))]
    random.shuffle(lengths)
    batch = make_paged_batch(gen, shapes, lengths)
    scale = shapes.head_dim**-0.5
    backend = TritonAttentionBackend(DecodeConfig(split_tokens=shapes.split_tokens))
    out = run_triton(backend, batch, scale)
    assert_close(out, expected_output(batch, scale), shapes.rel_tol)
    # forward() (store + attend) on a fresh copy of the batch gives the same rows
    assert torch.equal(out, backend.forward(batch.query, batch.new_key, batch.new_value, batch.kv_cache, batch.metadata, scale))


@pytest.mark.parametrize("shapes", SHAPES)
def test_prefill_only_batch(gen, shapes):
    lengths = [(c, n) for c, n in shapes.prefill if n > 1]
    batch = make_paged_batch(gen, shapes, lengths)
    scale = shapes.head_dim**-0.5
    out = run_triton(TritonAttentionBackend(DecodeConfig(split_tokens=shapes.split_tokens)), batch, scale)
    assert_close(out, expected_output(batch, scale), shapes.rel_tol)


@pytest.mark.parametrize(
    "config",
    [
        DecodeConfig(split_tokens=16, block_n=16, max_splits=4, programs_per_sm=1),  # long splits past 64 tokens
        DecodeConfig(split_tokens=32, block_n=16, max_splits=3, programs_per_sm=2),  # max_splits not a power of 2
        DecodeConfig(split_tokens=4096, block_n=32),  # one split per row: the merge kernel is never launched
    ],
    ids=lambda c: f"split{c.split_tokens}-n{c.block_n}-max{c.max_splits}",
)
def test_decode_configs_agree_with_the_reference(gen, config):
    """Every tunable decode setting computes the same function; rows of one split are finished by the split
    kernel (with and without a merge launch) and padded rows still read as zeros."""
    shapes = SMALL
    lengths = [(c - 1, 1) for c in (1, 3, 16, 17, 64, 65, 200)]
    random.shuffle(lengths)
    batch = make_paged_batch(gen, shapes, lengths)
    scale = shapes.head_dim**-0.5
    md = batch.metadata
    padded = AttentionMetadata(
        query_start_loc=torch.arange(len(lengths) + 2, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.cat([md.seq_lens, torch.zeros(1, dtype=torch.int32, device=DEVICE)]),
        block_tables=torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1])]),
        slot_mapping=torch.cat([md.slot_mapping, torch.full((1,), -1, dtype=torch.int64, device=DEVICE)]),
        query_lens_cpu=(1,) * (len(lengths) + 1),
        seq_lens_cpu=(7,) * (len(lengths) + 1),
    )
    pad_kv = randn(gen, 1, shapes.kv_heads, shapes.head_dim)
    padded_batch = PagedBatch(
        batch.kv_cache, padded, torch.cat([batch.query, randn(gen, 1, shapes.heads, shapes.head_dim)]),
        torch.cat([batch.new_key, pad_kv]), torch.cat([batch.new_value, pad_kv]),
        batch.full_keys, batch.full_values, lengths,
    )  # fmt: skip
    out = run_triton(TritonAttentionBackend(config), padded_batch, scale)
    assert_close(out[:-1], expected_output(batch, scale), shapes.rel_tol)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize(
    "tiling", [AttentionTiling(32, 16, 1, 1), AttentionTiling(16, 32, 2, 2)], ids=lambda t: f"m{t.block_m}-n{t.block_n}"
)
def test_prefill_tilings_agree_with_the_reference(gen, tiling):
    shapes = SMALL
    lengths = [(0, 45), (21, 33), (3, 1), (50, 7), (0, 2)]
    batch = make_paged_batch(gen, shapes, lengths)
    scale = shapes.head_dim**-0.5
    out = run_triton(TritonAttentionBackend(DecodeConfig(split_tokens=16), prefill_tiling=tiling), batch, scale)
    assert_close(out, expected_output(batch, scale), shapes.rel_tol)


@pytest.mark.parametrize(
    ("head_dim", "parts"), [(80, (64, 16)), (72, (64, 16)), (96, (64, 32)), (64, (64, 0)), (40, (32, 16)), (16, (16, 0))]
)
def test_split_head_dim_covers_the_head_with_dot_sized_parts(head_dim, parts):
    from spaceserve.layers.attention.triton import split_head_dim

    assert split_head_dim(head_dim) == parts


@pytest.mark.parametrize(
    ("head_dim", "tiling"),
    [
        (72, AttentionTiling(16, 16, 4, 2)),  # head_dim padded to 128 with masked columns
        (64, AttentionTiling(32, 16, 4, 2)),  # a power of two: no padding
        (96, AttentionTiling(16, 32, 4, 2)),
        (80, AttentionTiling(64, 64, 4, 2)),  # the short-window tiles: whole windows of 64 per program
    ],
    ids=lambda x: str(x) if isinstance(x, int) else f"m{x.block_m}-n{x.block_n}",
)
@pytest.mark.xfail(
    torch.cuda.is_available(),
    reason="on the H200 these non-default tilings leave rows unwritten (the towers' default tilings pass at real "
    "sizes in test_vision_varlen_attention_with_head_dim_80); not yet understood, see docs/PERFORMANCE.md",
    strict=False,
)
def test_vision_varlen_head_dims_and_tilings(gen, head_dim, tiling):
    lengths = [64, 64, 17, 1, 64, 40, 64, 100]
    random.shuffle(lengths)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    qkv = randn(gen, bounds[-1], 3, 2, head_dim)
    q, k, v = qkv.unbind(1)
    segments = build_varlen_segments(bounds, head_dim, DEVICE, use_triton=True, tiling=tiling)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, segments.cu_seqlens_device, segments.triton_work, head_dim**-0.5, tiling, out=out)
    expected = varlen_attention_reference(*(x.to(reference_dtype()) for x in (q, k, v)), segments)
    assert_close(out, expected, 1e-5)


def test_short_windows_get_their_own_tiles():
    from spaceserve.layers.attention.triton import common

    if common.interpreting():
        pytest.skip("the interpreter always uses its small tiles")
    assert common.varlen_tiling(64) == common.VARLEN_SHORT_TILING
    assert common.varlen_tiling(9216) == common.VARLEN_TILING


@pytest.mark.parametrize("shapes", SHAPES)
def test_vision_varlen_attention_with_head_dim_80(gen, shapes):
    head_dim, heads = 80, shapes.vision_heads
    lengths = list(shapes.vision_segments)
    random.shuffle(lengths)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    total = bounds[-1]
    qkv = randn(gen, total, 3, heads, head_dim, dtype=shapes.dtype)
    q, k, v = qkv.unbind(1)  # strided views, as the tower's qkv projection gives them
    segments = build_varlen_segments(bounds, head_dim, DEVICE, use_triton=True)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, segments.cu_seqlens_device, segments.triton_work, head_dim**-0.5, segments.triton_tiling, out=out)
    expected = torch.cat(
        [dense_attention(q[a:b], k[a:b], v[a:b], head_dim**-0.5, causal=False) for a, b in zip(bounds, bounds[1:])]
    )
    assert_close(out, expected, shapes.rel_tol)
    reference = varlen_attention_reference(q.to(reference_dtype()), k.to(reference_dtype()), v.to(reference_dtype()), segments)
    assert_close(out, reference, shapes.rel_tol)


def test_auto_backend_picks_triton_only_on_cuda(monkeypatch):
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    if HAS_CUDA:
        assert get_attention_backend("auto", torch.device("cuda")).name == "triton"
    if not HAS_CUDA:  # the interpreter runs the kernels on CPU tensors
        assert get_attention_backend("triton", torch.device("cpu")).name == "triton"
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="runs on CUDA"):
        get_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", torch.device("cpu"))
