"""Issue 11's measurement: is the host off the critical path? `spaceserve bench` sweeps (text-only and image-mix,
time and space, in-process backend: the front in the benchmark's process, the engine core in its own), the device's
ceilings and the decode-step benchmark at the batch the text-only run actually ran, all in one device call.

    python3 scripts/host_overhead_bench.py Qwen/Qwen2-VL-2B-Instruct --rates 4,10,16,24 --out-dir $OUT/host-2b
    python3 scripts/host_overhead_bench.py --summarize DIR          # rebuild summary.md from DIR/*.jsonl

`--variants` adds A/B runs of the text-only workload with the host-side mechanisms turned off (the same requests):
`serial` (--no-async-scheduling), `one-process` (--no-multiprocess), `before` (both, and eager vision).

Targets, checked in summary.md (per row, from the engine counters every row carries):
- lm_gpu_gap_s <= 10% of lm_gpu_s (GPU idle between LM steps while requests run, against GPU busy with them);
- encoder host launch <= 2 ms per batch (space: encoder_launch_s / encoder_batches; time: encoder_inline_s /
  encoder_inline_batches);
- text-only mean TPOT at 16 req/s within 1.2x of the decode-step benchmark at that run's mean batch and context.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spaceserve.bench.sweep import add_results_arguments, prepare_results, result_rows, run_logged  # noqa: E402

VARIANT_FLAGS = {
    "serial": ["--no-async-scheduling"],
    "one-process": ["--no-multiprocess"],
    "before": ["--no-async-scheduling", "--no-multiprocess", "--disable-vision-cuda-graphs"],
}
TPOT_RATE = 16.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--summarize", metavar="DIR")
    parser.add_argument("--rates", default="4,10,16,24")
    parser.add_argument("--modes", default="time,space")
    parser.add_argument("--workloads", default="text-only,image-mix")
    parser.add_argument("--variants", default="", help="comma list of " + ", ".join(VARIANT_FLAGS))
    parser.add_argument("--variant-rates", default="16", help="rates of the A/B variant runs")
    parser.add_argument("--num-prompts", type=int, default=150)
    parser.add_argument("--output-len", default="128")
    add_results_arguments(parser, "host-overhead", 540.0)
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    if not args.model:
        parser.error("give a model (or --summarize DIR)")
    out, deadline = prepare_results(args)
    workloads = args.workloads.split(",")
    runs: list[tuple[str, str, str, list[str]]] = []
    if "text-only" in workloads:
        runs.append(("text-only", "time", args.rates, []))
    if "image-mix" in workloads:
        runs.append(("image-mix", args.modes, args.rates, []))
    for variant in filter(None, args.variants.split(",")):
        runs.append(("text-only", "time", args.variant_rates, VARIANT_FLAGS[variant] + ["--label", variant]))
    code = 0
    for workload, modes, rates, extra in runs:
        left = deadline - time.monotonic()
        if left < 30:
            print(f"skipping {workload} {modes} {extra}: {left:.0f} s left", flush=True)
            code = 1
            continue
        command = [
            sys.executable, "-m", "spaceserve.cli", "bench", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
            "--workload", workload, "--multiplex", modes, "--request-rate", rates, "--num-prompts", str(args.num_prompts),
            "--num-warmups", "8", "--output-len", args.output_len, "--slo", "ttft=2,tpot=0.05",
            "--out", str(out / f"{workload}.jsonl"), "--disable-tqdm", *extra, *shlex.split(args.engine_args),
        ]  # fmt: skip
        code |= run_logged(command, out, left, REPO, f"{workload} {modes}")
    if deadline - time.monotonic() > 60:
        (out / "decode_step.json").write_text(json.dumps(decode_step_at_text_only_batch(args.model, out), indent=1))
    (out / "summary.md").write_text(summarize(out))
    print(summarize(out))
    return code


def decode_step_at_text_only_batch(model: str, out: Path) -> dict[str, Any]:
    """The decode step alone (graph replay, synthetic KV) at the mean batch and context of the text-only run at
    TPOT_RATE, so its TPOT can be compared with the step it cannot beat."""
    import numpy as np
    import torch

    from spaceserve.engine.arg_utils import EngineArgs
    from spaceserve.engine.core import EngineCore
    from spaceserve.profile.synthetic import decode_step, fill_kv_caches_random, run_step_graphed
    from spaceserve.profile.timing import time_calls

    rows = [r for r in result_rows(out) if r["workload"] == "text-only" and not r.get("label")]
    row = next((r for r in rows if float(r["request_rate"]) == TPOT_RATE), None)
    if row is None or not torch.cuda.is_available():
        return {"note": "no text-only row at the TPOT rate, or no CUDA"}
    counters = row["engine_counters"] or {}
    batch = max(1, round(counters.get("lm_rows", 0) / max(counters.get("lm_steps", 1), 1)))
    prompt = row["total_input_tokens"] / max(row["completed"], 1)
    context = int(prompt + row["total_output_tokens"] / max(row["completed"], 1) / 2)
    sizes = tuple(sorted({1, 2, 4, 8, 16, 32, 64, batch}))
    args = EngineArgs(model=model, load_format="dummy", dtype="bfloat16", max_num_seqs=max(sizes),
                      cuda_graph_sizes=sizes, gpu_memory_utilization=0.5)
    core = EngineCore(args.create_engine_config())
    try:
        fill_kv_caches_random(core, seed=3)
        step = decode_step(core, batch, context, np.random.default_rng(0))
        _, graphed = run_step_graphed(core.model_runner, step.scheduled, core.encoder_stage.embeddings)
        stats = time_calls(
            lambda: run_step_graphed(core.model_runner, step.scheduled, core.encoder_stage.embeddings),
            core.device, warmup=5, iters=50,
        )
        return {"batch": batch, "context": context, "graphed": graphed, "step_ms": stats.summary(),
                "mean_tpot_ms_at_rate": row["mean_tpot_ms"], "rate": TPOT_RATE}
    finally:
        core.shutdown()


def _per(counters: dict[str, float], total: str, count: str) -> float | None:
    n = counters.get(count) or 0
    return counters.get(total, 0.0) / n if n else None


def summarize(directory: Path) -> str:
    rows = result_rows(directory)
    lines = [
        f"# Host overhead ({directory.name})", "",
        "| workload | mode | variant | rate | mean batch | LM host ms/step | LM wait ms/step | lm_gpu_s | gap / gpu "
        "| encoder launch ms/batch | mean TPOT ms | p99 TPOT ms | TTFT p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    gap_ok, launch_ok = [], []
    for row in sorted(rows, key=lambda r: (r["workload"], r.get("label") or "", r["multiplex"], float(r["request_rate"]))):
        c = row.get("engine_counters") or {}
        steps = c.get("lm_steps") or 0
        gap = c.get("lm_gpu_gap_s", 0.0) / c["lm_gpu_s"] if c.get("lm_gpu_s") else None
        launch = _per(c, "encoder_launch_s", "encoder_batches") or _per(c, "encoder_inline_s", "encoder_inline_batches")
        if gap is not None and not row.get("label"):
            gap_ok.append(gap <= 0.10)
        if launch is not None and not row.get("label"):
            launch_ok.append(launch <= 0.002)
        fmt = lambda v, scale=1.0, d=2: "-" if v is None else f"{v * scale:.{d}f}"  # noqa: E731
        lines.append(
            f"| {row['workload']} | {row['multiplex']} | {row.get('label') or 'default'} | {row['request_rate']} | "
            f"{fmt(c.get('lm_rows', 0) / steps if steps else None, d=1)} | {fmt(c.get('lm_host_s', 0) / steps if steps else None, 1e3)} | "
            f"{fmt(c.get('lm_wait_s', 0) / steps if steps else None, 1e3)} | {fmt(c.get('lm_gpu_s'), d=1)} | {fmt(gap, 100, 1)}% | "
            f"{fmt(launch, 1e3)} | {fmt(row['mean_tpot_ms'])} | {fmt(row['p99_tpot_ms'])} | {fmt(row['p50_ttft_ms'], d=0)} |"
        )  # fmt: skip
    lines += ["", "Targets:"]
    lines.append(f"- lm_gpu_gap_s <= 10% of lm_gpu_s: {sum(gap_ok)}/{len(gap_ok)} rows")
    lines.append(f"- encoder host launch <= 2 ms per batch: {sum(launch_ok)}/{len(launch_ok)} rows")
    decode_path = directory / "decode_step.json"
    if decode_path.exists():
        decode = json.loads(decode_path.read_text())
        if "step_ms" in decode:
            ratio = decode["mean_tpot_ms_at_rate"] / decode["step_ms"]["median_ms"]
            lines.append(
                f"- text-only mean TPOT at {decode['rate']:g} req/s / decode step at batch {decode['batch']}, context "
                f"{decode['context']}: {decode['mean_tpot_ms_at_rate']:.2f} / {decode['step_ms']['median_ms']:.2f} ms = "
                f"{ratio:.2f}x (target <= 1.2x)"
            )
    ceilings = directory / "ceilings.json"
    if ceilings.exists():
        lines += ["", f"Ceilings: `{ceilings.read_text().strip()[:400]}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
