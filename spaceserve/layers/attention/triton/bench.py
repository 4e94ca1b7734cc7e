"""Time the attention kernels at Qwen2-VL sizes against the card's measured ceilings (one device call):

    python -m spaceserve.layers.attention.triton.bench

decode: KV bytes read over measured copy bandwidth; prefill (one 8192-token chunk, causal) and vision varlen
(head_dim 80): useful FLOPs over the measured bf16 matmul rate. Also reports first-call (compile) time.
"""

from __future__ import annotations

import time

import torch
import triton.testing

from spaceserve.layers.attention import build_attention_metadata
from spaceserve.layers.attention.triton import (
    DECODE_CONFIG,
    attention_tiling,
    build_work_list,
    paged_decode,
    paged_prefill,
    varlen_attention,
    varlen_tiling,
)

DEVICE = torch.device("cuda")
BLOCK = 16


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def matmul_rate() -> float:
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / (median_ms(lambda: a @ b) * 1e-3)


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def paged_inputs(heads, kv_heads, lengths, max_model_len):
    blocks = [-(-(c + n) // BLOCK) for c, n in lengths]
    num_blocks = sum(blocks) + 1
    cache = torch.randn(2, num_blocks, BLOCK, kv_heads, 128, device=DEVICE, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks).tolist()
    tables = [[perm.pop() for _ in range(b)] for b in blocks]
    md = build_attention_metadata([n for _, n in lengths], [c + n for c, n in lengths], tables, BLOCK, DEVICE)
    width = -(-max_model_len // BLOCK)  # as the graphed runner pads it
    padded = torch.zeros(len(lengths), width, dtype=torch.int32, device=DEVICE)
    padded[:, : md.block_tables.shape[1]] = md.block_tables
    query = torch.randn(sum(n for _, n in lengths), heads, 128, device=DEVICE, dtype=torch.bfloat16)
    return cache, md, padded, query


def bench_decode(bandwidth: float) -> None:
    print("decode (attention only)   model  batch  ctx   us      floor_us  ratio  compile_s")
    for model, heads, kv_heads in (("2B", 12, 2), ("7B", 28, 4)):
        for batch in (1, 16, 64, 256):
            for ctx in (1024, 4096):
                cache, md, tables, query = paged_inputs(heads, kv_heads, [(ctx - 1, 1)] * batch, 32768)
                out = torch.empty_like(query)

                def run():
                    paged_decode(out, query, cache, tables, md.seq_lens, md.query_start_loc, 128**-0.5, DECODE_CONFIG)

                compile_s = first_call_s(run)
                ms = median_ms(run)
                floor = batch * ctx * kv_heads * 128 * 2 * 2 / bandwidth * 1e3
                print(f"{'':26}{model:>5}  {batch:5d}  {ctx:4d}  {ms * 1e3:7.1f}  {floor * 1e3:8.1f}  {ms / floor:5.2f}  {compile_s:.1f}")


def bench_prefill(rate: float) -> None:
    print("prefill 7B (28/4 heads)   chunk  prefix  TFLOP/s  of_matmul  compile_s")
    for prefix, chunk in ((0, 8192), (8192, 8192), (0, 2048)):
        cache, md, _, query = paged_inputs(28, 4, [(prefix, chunk)], prefix + chunk)
        out = torch.empty_like(query)
        tiling = attention_tiling(128)
        work = build_work_list(md.query_lens_cpu, tiling.block_m, 2, DEVICE)

        def run():
            paged_prefill(out, query, cache, md.block_tables, md.seq_lens, md.query_start_loc, work, 128**-0.5, tiling)

        compile_s = first_call_s(run)
        ms = median_ms(run)
        flops = 4 * 28 * 128 * chunk * (prefix + (chunk + 1) / 2)
        print(f"{'':26}{chunk:5d}  {prefix:6d}  {flops / ms / 1e9:7.0f}  {flops / ms * 1e3 / rate:9.2f}  {compile_s:.1f}")


def bench_vision(rate: float) -> None:
    print("vision varlen (16 heads, d=80)   segments          TFLOP/s  of_matmul  compile_s")
    for label, lengths in (("1 x 9216", [9216]), ("8 x 1024", [1024] * 8), ("144 windows of 64", [64] * 144)):
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        qkv = torch.randn(bounds[-1], 3, 16, 80, device=DEVICE, dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)
        tiling = varlen_tiling(max(lengths))
        work = build_work_list(lengths, tiling.block_m, 1, DEVICE)
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)

        def run():
            varlen_attention(q, k, v, cu, work, 80**-0.5, tiling)

        compile_s = first_call_s(run)
        ms = median_ms(run)
        flops = sum(4 * 16 * 80 * n * n for n in lengths)
        print(f"{'':33}{label:>17}  {flops / ms / 1e9:7.0f}  {flops / ms * 1e3 / rate:9.2f}  {compile_s:.1f}")


def main() -> None:
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    bench_decode(bandwidth)
    bench_prefill(rate)
    bench_vision(rate)


if __name__ == "__main__":
    main()
