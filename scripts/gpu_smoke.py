"""Checks the engine end to end on a CUDA device with a real-size preset and dummy weights.

Not a benchmark: it proves the CUDA path runs (eager torch attention, time multiplexing) and prints what it did.
Usage: python scripts/gpu_smoke.py [--model Qwen/Qwen2-VL-2B-Instruct] [--requests 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch

from spaceserve import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype=args.dtype, max_model_len=4096, gpu_memory_utilization=0.5)
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    sides = [448, 896, 1344]
    prompts = []
    for i in range(args.requests):
        side = sides[i % len(sides)]
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        prompts.append({"prompt": f"<|vision_start|><|image_pad|><|vision_end|>Describe image {i}.",
                        "multi_modal_data": {"image": image}})
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    run_s = time.perf_counter() - start
    again = llm.generate(prompts[:4], params)
    engine = llm.llm_engine
    engine.check_idle_integrity()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("SPACESERVE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "model": args.model,
        "dtype": engine.info["dtype"],
        "requests": args.requests,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "build_s": round(build_s, 2),
        "generate_s": round(run_s, 2),
        "kv_blocks": engine.info["num_kv_blocks"],
        "repeat_identical": [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs[:4]],
        "prefix_cache_hits_tokens": engine.call_utility("engine_counters")["prefix_cache_hit_tokens"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
