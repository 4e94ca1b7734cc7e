"""Where does a decode step's time go? Kernel totals from torch.profiler for synthetic decode steps, eager and graphed.

    python3 scripts/profile_decode_step.py --model Qwen/Qwen2-VL-2B-Instruct --batch 1,64 --context 1024 --out DIR

Writes one table per (batch, context, mode) of the top kernels by total CUDA time per step, to stdout and DIR.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.core import EngineCore
from spaceserve.profile.synthetic import decode_step, fill_kv_caches_random, run_step


def kernel_totals(prof, steps: int) -> list[tuple[str, float, int]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:90]]
            entry[0] += event.device_time_total / 1e3 / steps
            entry[1] += 1
    return sorted(((name, ms, count // steps) for name, (ms, count) in totals.items()), key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--context", default="1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    engine_args = EngineArgs(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        max_num_seqs=max(batches),
        cuda_graph_sizes=tuple(sorted(batches)),
        gpu_memory_utilization=0.5,
    )
    engine = EngineCore(engine_args.create_engine_config())
    fill_kv_caches_random(engine, seed=7)
    runner = engine.model_runner
    rng = np.random.default_rng(0)
    results = []
    for context in contexts:
        for batch in batches:
            for mode in ("graphed", "eager"):
                graphs = runner.cuda_graphs
                if mode == "eager":
                    runner.cuda_graphs = None
                step = decode_step(engine, batch, context, rng)
                try:
                    for _ in range(3):
                        run_step(runner, step.scheduled, engine.encoder_stage.embeddings)
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        for _ in range(args.steps):
                            run_step(runner, step.scheduled, engine.encoder_stage.embeddings)
                        torch.cuda.synchronize()
                finally:
                    step.release(engine)
                    runner.cuda_graphs = graphs
                rows = kernel_totals(prof, args.steps)
                total = sum(ms for _, ms, _ in rows)
                print(f"\n## {args.model} batch {batch} context {context} {mode}: {total:.3f} ms of kernels per step")
                for name, ms, count in rows[:25]:
                    print(f"{ms:8.3f} ms  x{count:<4d} {name}")
                results.append(
                    {"model": args.model, "batch": batch, "context": context, "mode": mode, "kernel_ms": total,
                     "top": [{"kernel": n, "ms": ms, "launches": c} for n, ms, c in rows[:40]]}
                )
    (args.out / "decode_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
