"""Sweep the Triton attention kernels' launch configurations at Qwen2-VL sizes in one device call:

    python scripts/tune_attention.py [--out DIR] [--budget-s 330] [--sections decode,prefill,varlen]

For every kernel and shape it times a grid of configurations (triton.testing.do_bench, median, L2 flushed between
runs), checks each configuration's output against the default configuration's (and the default's against a torch
reference), so a broken configuration cannot win, and reports the best configuration per shape with its speedup
over the default and its ratio to the floor (decode: KV bytes over the measured copy bandwidth; prefill: FLOPs over
the measured bf16 matmul rate; vision: the larger of FLOPs over the rate and q/k/v/out bytes over the bandwidth).
It also names the one configuration per kernel that is best over all its shapes (geometric mean of time over each
shape's best): that is the default to set in spaceserve/layers/attention/triton/common.py.

Configurations are tried default first; a section stops trying new ones when its share of --budget-s is spent
(compiles included), and says how many it skipped. Writes tune_attention.json and tune_attention.md to --out
(default: $OUT when set, else benchmarks/results/attention-tune).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from spaceserve.layers.attention.triton import (
    DECODE_CONFIG,
    PREFILL_TILING,
    VARLEN_SHORT_TILING,
    VARLEN_TILING,
    AttentionTiling,
    DecodeConfig,
    build_work_list,
    paged_decode,
    paged_prefill,
    varlen_attention,
)
from spaceserve.layers.attention.triton.bench import copy_bandwidth, matmul_rate, paged_inputs

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
DECODE_MODELS = (("2B", 12, 2), ("7B", 28, 4))
DECODE_BATCHES, DECODE_CONTEXTS = (1, 16, 64, 256), (1024, 4096)
PREFILL_CASES = ((0, 8192), (8192, 8192), (0, 2048))  # (cached prefix, chunk)
VARLEN_CASES = (("1 x 9216", [9216]), ("8 x 1024", [1024] * 8))
VARLEN_SHORT_CASES = (("144 windows of 64", [64] * 144),)
HEAD_DIM = 128
VISION_HEADS, VISION_HEAD_DIM = 16, 80
REL_TOL = 1e-2  # bf16 outputs of two correct kernels differ by a few 1e-3


@dataclass
class Shape:
    """One problem: run(config) returns a callable that fills out; reference() is the torch answer."""

    section: str
    label: str
    floor_ms: float
    work: str  # what the floor counts
    run: Callable[[object], Callable[[], None]]
    out: torch.Tensor
    reference: Callable[[], torch.Tensor]
    results: list[dict] = field(default_factory=list)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return math.inf
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# --- decode -------------------------------------------------------------------------------------------------------


def decode_shapes(bandwidth: float) -> list[Shape]:
    shapes = []
    for model, heads, kv_heads in DECODE_MODELS:
        for batch in DECODE_BATCHES:
            for ctx in DECODE_CONTEXTS:
                cache, md, tables, query = paged_inputs(heads, kv_heads, [(ctx - 1, 1)] * batch, 32768)
                cache, query = cache.to(DTYPE), query.to(DTYPE)
                out = torch.empty_like(query)
                kv_bytes = batch * ctx * kv_heads * HEAD_DIM * 2 * cache.element_size()

                def run(config, cache=cache, md=md, tables=tables, query=query, out=out):
                    return lambda: paged_decode(out, query, cache, tables, md.seq_lens, md.query_start_loc, HEAD_DIM**-0.5, config)

                def reference(cache=cache, md=md, query=query, ctx=ctx):
                    parts = []
                    for first in range(0, md.block_tables.shape[0], 16):
                        blocks = md.block_tables[first : first + 16].long()
                        k, v = (cache[i][blocks].flatten(1, 2)[:, :ctx].transpose(1, 2).float() for i in (0, 1))
                        q = query[first : first + 16, :, None].float()  # [b, H, 1, D]
                        o = F.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5, enable_gqa=True)
                        parts.append(o[:, :, 0])
                    return torch.cat(parts)

                shapes.append(
                    Shape("decode", f"{model} b{batch} ctx{ctx}", kv_bytes / bandwidth * 1e3, "KV bytes / copy bandwidth", run, out, reference)
                )
    return shapes


def decode_configs() -> list[DecodeConfig]:
    grid = [
        DecodeConfig(split_tokens=split, block_n=block_n, num_warps=warps)
        for split, block_n, warps in itertools.product((64, 128, 256, 512), (16, 32, 64), (2, 4, 8))
        if block_n <= split and not (warps == 8 and block_n == 16)
    ]
    return _default_first(DECODE_CONFIG, grid)


# --- prefill ------------------------------------------------------------------------------------------------------


def prefill_shapes(rate: float) -> list[Shape]:
    heads, kv_heads = 28, 4
    shapes = []
    for prefix, chunk in PREFILL_CASES:
        cache, md, _, query = paged_inputs(heads, kv_heads, [(prefix, chunk)], prefix + chunk)
        cache, query = cache.to(DTYPE), query.to(DTYPE)
        out = torch.empty_like(query)
        flops = 4 * heads * HEAD_DIM * chunk * (prefix + (chunk + 1) / 2)
        works: dict[int, torch.Tensor] = {}

        def run(tiling, cache=cache, md=md, query=query, out=out, works=works):
            if tiling.block_m not in works:
                works[tiling.block_m] = build_work_list(md.query_lens_cpu, tiling.block_m, 2, DEVICE)
            work = works[tiling.block_m]
            return lambda: paged_prefill(out, query, cache, md.block_tables, md.seq_lens, md.query_start_loc, work, HEAD_DIM**-0.5, tiling)

        def reference(cache=cache, md=md, query=query, prefix=prefix, chunk=chunk):
            blocks = md.block_tables[0].long()
            # the kernel reads this chunk's K/V from the cache too: paged_inputs filled every slot
            k, v = (cache[i][blocks].flatten(0, 1)[: prefix + chunk].transpose(0, 1) for i in (0, 1))
            k, v = (x.repeat_interleave(heads // kv_heads, 0) for x in (k, v))
            mask = torch.arange(prefix + chunk, device=DEVICE)[None, :] <= torch.arange(prefix, prefix + chunk, device=DEVICE)[:, None]
            o = F.scaled_dot_product_attention(query.transpose(0, 1), k, v, attn_mask=mask, scale=HEAD_DIM**-0.5)
            return o.transpose(0, 1)

        shapes.append(Shape("prefill", f"7B chunk{chunk} prefix{prefix}", flops / rate * 1e3, "FLOPs / matmul rate", run, out, reference))
    return shapes


def tiling_grid(block_ms=(64, 128), block_ns=(32, 64, 128), warps=(4, 8), stages=(2, 3, 4)) -> list[AttentionTiling]:
    grid = [AttentionTiling(m, n, w, s) for m, n, w, s in itertools.product(block_ms, block_ns, warps, stages)]
    return sorted(grid, key=tiling_priority)


def _default_first(default, grid: list) -> list:
    return [default, *(c for c in grid if c != default)]


def tiling_priority(tiling: AttentionTiling) -> tuple:
    """Order in which a budget-cut sweep tries tiles: warps matched to the tile (Hopper: 8 warps for 128 rows, 4 for
    64), 3 then 2 then other stage counts, 64 then 128 keys per step."""
    matched = (tiling.block_m, tiling.num_warps) in ((128, 8), (64, 4), (32, 2))
    return (not matched, {3: 0, 2: 1}.get(tiling.num_stages, 2), {64: 0, 128: 1}.get(tiling.block_n, 2))


# --- vision varlen ------------------------------------------------------------------------------------------------


def varlen_shapes(bandwidth: float, rate: float, short: bool) -> list[Shape]:
    cases = VARLEN_SHORT_CASES if short else VARLEN_CASES
    shapes = []
    for label, lengths in cases:
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        total = bounds[-1]
        qkv = torch.randn(total, 3, VISION_HEADS, VISION_HEAD_DIM, device=DEVICE, dtype=DTYPE)
        q, k, v = qkv.unbind(1)  # strided views, as the towers pass them
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
        out = torch.empty_like(q)
        flops = sum(4 * VISION_HEADS * VISION_HEAD_DIM * n * n for n in lengths)
        bytes_moved = 4 * total * VISION_HEADS * VISION_HEAD_DIM * q.element_size()
        floor_ms = max(flops / rate, bytes_moved / bandwidth) * 1e3
        works: dict[int, torch.Tensor] = {}

        def run(tiling, q=q, k=k, v=v, cu=cu, out=out, works=works, lengths=lengths):
            if tiling.block_m not in works:
                works[tiling.block_m] = build_work_list(lengths, tiling.block_m, 1, DEVICE)
            work = works[tiling.block_m]
            return lambda: varlen_attention(q, k, v, cu, work, VISION_HEAD_DIM**-0.5, tiling, out=out)

        def reference(q=q, k=k, v=v, n=lengths[0], segments=len(lengths)):
            q4, k4, v4 = (x.reshape(segments, n, VISION_HEADS, VISION_HEAD_DIM).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, scale=VISION_HEAD_DIM**-0.5)
            return o.transpose(1, 2).reshape(q.shape)

        work_label = "max(FLOPs / rate, q/k/v/out bytes / bandwidth)"
        shapes.append(Shape("varlen-short" if short else "varlen", label, floor_ms, work_label, run, out, reference))
    return shapes


# --- the sweep ----------------------------------------------------------------------------------------------------


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, rep_ms: int) -> float:
    if DEVICE.type != "cuda":  # --smoke under the interpreter: one host-timed call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 5), rep=rep_ms, return_mode="median")


def sweep(shapes: list[Shape], configs: list, budget_s: float, rep_ms: int) -> dict:
    """Time every config on every shape (default first) until the budget is spent."""
    started = time.monotonic()
    default_out: dict[str, torch.Tensor] = {}
    references: dict[str, torch.Tensor] = {}
    tried = 0
    for index, config in enumerate(configs):
        if index > 0 and time.monotonic() - started > budget_s:
            break
        tried += 1
        for shape in shapes:
            record = {"config": asdict(config)}
            shape.results.append(record)
            try:
                fn = shape.run(config)
                shape.out.fill_(float("nan"))
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                record["first_call_s"] = round(time.perf_counter() - t0, 2)
            except Exception as error:  # out of shared memory or registers: this config cannot run
                record["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
                continue
            out = shape.out.clone()
            if shape.label in default_out:
                record["error_vs_default"] = relative_error(out, default_out[shape.label])
                ok = record["error_vs_default"] < REL_TOL
            else:  # the default, or any config when the default itself was wrong or failed
                if shape.label not in references:
                    references[shape.label] = shape.reference()
                record["error_vs_reference"] = relative_error(out, references[shape.label])
                ok = record["error_vs_reference"] < REL_TOL
                if ok and index == 0:
                    default_out[shape.label] = out
            if not ok:
                record["status"] = "wrong output"
                continue
            record["ms"] = median_ms(fn, rep_ms)
            record["ratio_to_floor"] = record["ms"] / shape.floor_ms
            record["status"] = "ok"
    # the default once more: the spread between two timings of one version is the noise
    repeat = {}
    for shape in shapes:
        first = shape.results[0]
        if first.get("status") == "ok":
            again = median_ms(shape.run(configs[0]), rep_ms)
            repeat[shape.label] = round(abs(again - first["ms"]) / first["ms"], 4)
    return {
        "tried": tried,
        "skipped_for_budget": len(configs) - tried,
        "seconds": round(time.monotonic() - started, 1),
        "default_repeat_spread": repeat,
    }


def summarize(section: str, shapes: list[Shape], info: dict) -> dict:
    per_shape = []
    for shape in shapes:
        default = shape.results[0]
        ok = [r for r in shape.results if r.get("status") == "ok"]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        per_shape.append(
            {
                "shape": shape.label,
                "floor_ms": shape.floor_ms,
                "floor": shape.work,
                "default": default,
                "best": best,
                "speedup_over_default": default["ms"] / best["ms"] if best and default.get("status") == "ok" else None,
                "failed": sum(r.get("status", "").startswith("failed") for r in shape.results),
                "wrong": sum(r.get("status") == "wrong output" for r in shape.results),
            }
        )
    # one config for all shapes: the smallest geometric mean of (time / that shape's best time)
    by_config: dict[str, list[float]] = {}
    for shape in shapes:
        ok = [r for r in shape.results if r.get("status") == "ok"]
        if not ok:
            continue
        best_ms = min(r["ms"] for r in ok)
        for r in ok:
            by_config.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r["ms"] / best_ms)
    complete = {c: v for c, v in by_config.items() if len(v) == len(shapes)}
    overall = None
    if complete:
        key = min(complete, key=lambda c: sum(map(math.log, complete[c])))
        default_key = json.dumps(shapes[0].results[0]["config"], sort_keys=True)
        geo = math.exp(sum(map(math.log, complete[key])) / len(shapes))
        default_geo = math.exp(sum(map(math.log, complete[default_key])) / len(shapes)) if default_key in complete else None
        overall = {
            "config": json.loads(key),
            "geomean_time_over_best": geo,
            "default_geomean_time_over_best": default_geo,
            "speedup_over_default": default_geo / geo if default_geo else None,
        }
    return {"section": section, **info, "shapes": per_shape, "best_overall": overall}


def describe(config: dict | None) -> str:
    if config is None:
        return "-"
    short = {"split_tokens": "split", "block_n": "n", "block_m": "m", "num_warps": "w", "num_stages": "s", "max_splits": "max", "programs_per_sm": "pps"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in config.items())


def markdown(report: dict) -> str:
    lines = [
        f"# Attention launch-config sweep: {report['device']}",
        "",
        f"commit {report['commit']}; copy {report['copy_bandwidth_tb_s']:.2f} TB/s, bf16 matmul {report['matmul_tflop_s']:.0f} TFLOP/s",
        "",
        "| kernel | shape | floor us | default us | x floor | best us | x floor | speedup | best config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for section in report["sections"]:
        for s in section["shapes"]:
            d, b = s["default"], s["best"]
            d_us = f"{d['ms'] * 1e3:.1f}" if d.get("status") == "ok" else d.get("status", "-")
            d_ratio = f"{d['ratio_to_floor']:.2f}" if d.get("status") == "ok" else "-"
            b_us = f"{b['ms'] * 1e3:.1f}" if b else "-"
            b_ratio = f"{b['ratio_to_floor']:.2f}" if b else "-"
            speed = f"{s['speedup_over_default']:.2f}x" if s["speedup_over_default"] else "-"
            lines.append(
                f"| {section['section']} | {s['shape']} | {s['floor_ms'] * 1e3:.1f} | {d_us} | {d_ratio} | {b_us} | {b_ratio} | {speed} | {describe(b['config'] if b else None)} |"
            )
    lines += ["", "| kernel | configs tried | skipped (budget) | seconds | default timed twice: spread | best over all shapes | geomean x best | speedup over default |", "|---|---|---|---|---|---|---|---|"]
    for section in report["sections"]:
        o = section["best_overall"] or {}
        spread = max(section["default_repeat_spread"].values(), default=float("nan"))
        speed = f"{o['speedup_over_default']:.2f}x" if o.get("speedup_over_default") else "-"
        geo = f"{o['geomean_time_over_best']:.3f}" if o else "-"
        lines.append(
            f"| {section['section']} | {section['tried']} | {section['skipped_for_budget']} | {section['seconds']} | {spread:.1%} | {describe(o.get('config'))} | {geo} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/attention-tune")
    parser.add_argument("--budget-s", type=float, default=330.0, help="all sections together, compiles included")
    parser.add_argument("--sections", default="decode,prefill,varlen")
    parser.add_argument("--rep-ms", type=int, default=30, help="do_bench repetition time per timing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and grids on CPU (TRITON_INTERPRET=1): checks the script")
    args = parser.parse_args()
    sections = args.sections.split(",")
    started = time.monotonic()
    if args.smoke:
        _use_smoke_sizes()
        bandwidth, rate = 1e11, 1e12
    else:
        bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"{device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    # share of the budget per section (decode has the most shapes; prefill the slowest runs)
    shares = {"decode": 0.34, "prefill": 0.3, "varlen": 0.22, "varlen-short": 0.14}
    plan = []
    limit = 3 if args.smoke else None
    if "decode" in sections:
        plan.append(("decode", lambda: decode_shapes(bandwidth), decode_configs()))
    if "prefill" in sections:
        prefill_grid = _default_first(PREFILL_TILING, tiling_grid())
        plan.append(("prefill", lambda: prefill_shapes(rate), prefill_grid))
    if "varlen" in sections:
        plan.append(("varlen", lambda: varlen_shapes(bandwidth, rate, short=False), _default_first(VARLEN_TILING, tiling_grid())))
        short_grid = tiling_grid(block_ms=(32, 64, 128), block_ns=(32, 64), warps=(2, 4), stages=(1, 2, 3))
        plan.append(("varlen-short", lambda: varlen_shapes(bandwidth, rate, short=True), _default_first(VARLEN_SHORT_TILING, short_grid)))
    total_share = sum(shares[name] for name, _, _ in plan)
    budget_left = args.budget_s - (time.monotonic() - started)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    report = {
        "device": device_name(),
        "commit": commit or "unknown",
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "matmul_tflop_s": rate / 1e12,
        "sections": [],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, make_shapes, configs in plan:
        shapes, configs = make_shapes(), configs[:limit]
        budget = budget_left * shares[name] / total_share
        section_start = time.monotonic()
        info = sweep(shapes, configs, budget, args.rep_ms)
        report["sections"].append(summarize(name, shapes, info) | {"all_results": {s.label: s.results for s in shapes}})
        print(f"{name}: {info['tried']} configs in {time.monotonic() - section_start:.0f}s, {info['skipped_for_budget']} skipped", flush=True)
        # written after every section, so a run cut short still leaves what it measured
        (out_dir / "tune_attention.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / "tune_attention.md").write_text(markdown(report))
        del shapes
        torch.cuda.empty_cache()
    print(markdown(report))
    print(f"total {time.monotonic() - started:.0f}s; wrote {out_dir}/tune_attention.json and .md")


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (Triton interpreter, smoke run: timings mean nothing)"


def _use_smoke_sizes() -> None:
    global DEVICE, DTYPE, DECODE_MODELS, DECODE_BATCHES, DECODE_CONTEXTS, PREFILL_CASES, VARLEN_CASES, VARLEN_SHORT_CASES
    from spaceserve.layers.attention.triton import bench, interpreting

    if not interpreting():
        raise SystemExit("--smoke runs the kernels on CPU: set TRITON_INTERPRET=1")
    import tests.conftest  # noqa: F401  (its fix for Triton 3.6's interpreter under NumPy >= 2.3)
    DEVICE = bench.DEVICE = torch.device("cpu")
    DTYPE = torch.float32  # the interpreter has no bfloat16 dots
    DECODE_MODELS, DECODE_BATCHES, DECODE_CONTEXTS = (("2B", 12, 2),), (1, 3), (40, 300)
    PREFILL_CASES = ((0, 40), (24, 20))
    VARLEN_CASES = (("2 x 40", [40, 40]),)
    VARLEN_SHORT_CASES = (("3 windows of 64", [64] * 3),)


if __name__ == "__main__":
    main()
