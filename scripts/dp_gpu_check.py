"""GPU check of data parallelism on one GPU: two mp replicas (gpu_memory_utilization 0.45 each) against one engine
with the same share, in one run.

1. One engine (its core in a process, 0.45 of the GPU): the check prompts one at a time (batch 1, so bf16 rounding
   cannot depend on batch composition), then a concurrent load.
2. Two replicas on the same GPU behind one AsyncLLM: their memory plans (each must get about the same KV cache),
   the same prompts one at a time (tokens must equal the single engine's exactly), the same concurrent load
   (throughput against one engine; tokens compared for information: bf16 batches differ), a repeated image (must
   go to the replica that encoded it and skip the encoder there), and a killed replica (its unstarted requests
   answered by the other, /health-state degraded).
3. The device's ceilings (copy bandwidth, bf16 matmul), measured after the engines are gone.

    python scripts/dp_gpu_check.py --out DIR [--model Qwen/Qwen2-VL-2B-Instruct]

DIR/summary.json and DIR/summary.md; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaceserve import SamplingParams  # noqa: E402
from spaceserve.engine.arg_utils import EngineArgs  # noqa: E402
from spaceserve.engine.async_llm import AsyncLLM  # noqa: E402

PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def _prompts(seed: int, count: int, sizes=(448, 672, 896)) -> list[Any]:
    rng = np.random.default_rng(seed)
    prompts = []
    for index in range(count):
        words = " ".join(f"w{rng.integers(0, 5000)}" for _ in range(int(rng.integers(8, 40))))
        if index % 3 == 0:
            prompts.append(words)
        else:
            side = int(sizes[index % len(sizes)])
            image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            prompts.append({"prompt": f"{PAD} {words}", "multi_modal_data": {"image": image}})
    return prompts


async def _final(engine: AsyncLLM, prompt, params, request_id: str):
    last = None
    async for output in engine.generate(prompt, params, request_id):
        last = output
    return last


def _sequential(engine: AsyncLLM, prompts, params, tag: str) -> list[list[int]]:
    async def run():
        return [list((await _final(engine, p, params, f"{tag}-seq-{i}")).outputs[0].token_ids)
                for i, p in enumerate(prompts)]

    return asyncio.run(run())


def _load(engine: AsyncLLM, prompts, params, tag: str) -> dict[str, Any]:
    async def run():
        start = time.monotonic()
        outputs = await asyncio.gather(*(_final(engine, p, params, f"{tag}-load-{i}") for i, p in enumerate(prompts)))
        return outputs, time.monotonic() - start

    outputs, elapsed = asyncio.run(run())
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    tpots = [
        (o.metrics["finished_time"] - o.metrics["first_token_time"]) / (len(t) - 1)
        for o, t in zip(outputs, tokens) if len(t) > 1 and "first_token_time" in o.metrics
    ]
    ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outputs if "first_token_time" in o.metrics]
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "output_tokens_per_s": sum(len(t) for t in tokens) / elapsed,
        "mean_tpot_ms": 1e3 * float(np.mean(tpots)) if tpots else None,
        "p50_ttft_ms": 1e3 * float(np.median(ttfts)) if ttfts else None,
    }


def _engine(args, **extra) -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(
        model=args.model, load_format=args.load_format, gpu_memory_utilization=0.45, max_model_len=args.max_model_len,
        multiprocess=True, **extra,
    ))


def _affinity(engine: AsyncLLM, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (672, 672, 3), dtype=np.uint8)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def run():
        first = await _final(engine, {"prompt": f"first {PAD}", "multi_modal_data": {"image": image}}, params, "aff-0")
        again = await _final(engine, {"prompt": f"other words {PAD}", "multi_modal_data": {"image": image}}, params,
                             "aff-1")
        return first, again

    first, again = asyncio.run(run())
    decisions = engine._client.recent_decisions
    home, second = decisions["aff-0"][-1], decisions["aff-1"][-1]
    ok = (second.replica == home.replica and second.reason == "image_affinity"
          and "encoder_enqueued_time" in first.metrics and "encoder_enqueued_time" not in again.metrics)
    return {"ok": ok, "first_replica": home.replica, "second_replica": second.replica, "second_reason": second.reason,
            "second_encoded": "encoder_enqueued_time" in again.metrics}


def _failure(engine: AsyncLLM, prompts, expected: list[list[int]], params) -> dict[str, Any]:
    client = engine._client
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def run():
        streams = [await engine.add_request(f"long {k}", long, f"long-{k}") for k in range(2)]
        for stream in streams:
            await stream.__anext__()
        victim = client.replica_of("long-0")
        pid = client.replica_set.placements[victim]["pid"]
        os.kill(pid, signal.SIGSTOP)
        waiting = [await engine.add_request(p, params, f"after-{i}") for i, p in enumerate(prompts)]
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        failed = [o async for o in streams[0]][-1]
        finals = [[o async for o in stream][-1] for stream in waiting]
        await engine.abort("long-1")
        return victim, failed, finals, time.monotonic() - started

    victim, failed, finals, seconds = asyncio.run(run())
    tokens = [list(o.outputs[0].token_ids) for o in finals]
    health = engine.health()
    return {
        "ok": failed.outputs[0].finish_reason == "error" and tokens == expected and health["status"] == "degraded",
        "victim": victim,
        "victims_stream": failed.outputs[0].finish_reason,
        "waiting_answered_like_one_engine": tokens == expected,
        "retried": sum(d[-1].reason == "retry" for rid, d in client.recent_decisions.items() if rid.startswith("after-")),
        "health": health["status"],
        "seconds_to_recover": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--check-prompts", type=int, default=12)
    parser.add_argument("--load-prompts", type=int, default=96)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = _prompts(1, args.check_prompts)
    load = _prompts(2, args.load_prompts)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    load_params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    result: dict[str, Any] = {"model": args.model, "commit": _commit()}

    started = time.monotonic()
    single = _engine(args)
    result["single"] = {"start_s": time.monotonic() - started, "memory_plan": single.info["memory_plan_summary"],
                        "num_kv_blocks": single.info["num_kv_blocks"]}
    single_sequential = _sequential(single, check, params, "single")
    result["single"]["load"] = _load(single, load, load_params, "single")
    single.shutdown()

    started = time.monotonic()
    dp = _engine(args, data_parallel_size=2)
    replicas = dp.info["data_parallel"]["replicas"]
    result["dp"] = {
        "start_s": time.monotonic() - started,
        "memory_plans": [replica["memory_plan_summary"] for replica in replicas],
        "num_kv_blocks": [replica["num_kv_blocks"] for replica in replicas],
        "placements": dp.health()["replicas"],
    }
    dp_sequential = _sequential(dp, check, params, "dp")
    result["dp"]["load"] = _load(dp, load, load_params, "dp")
    result["dp"]["affinity"] = _affinity(dp, 3)
    result["dp"]["failure"] = _failure(dp, check[:4], single_sequential[:4], params)
    result["dp"]["router"] = dp.router_stats()
    dp.shutdown()

    blocks = result["dp"]["num_kv_blocks"]
    single_load, dp_load = result["single"]["load"], result["dp"]["load"]
    matching = sum(a == b for a, b in zip(single_load["tokens"], dp_load["tokens"]))
    checks = {
        "sequential_tokens_equal_one_engine": dp_sequential == single_sequential,
        "replicas_got_similar_kv_caches": min(blocks) >= 0.8 * max(blocks),
        "every_load_request_answered": [len(t) for t in dp_load["tokens"]] == [len(t) for t in single_load["tokens"]],
        "repeated_image_went_to_its_encoder": result["dp"]["affinity"]["ok"],
        "killed_replica_handled": result["dp"]["failure"]["ok"],
    }
    result["checks"] = checks
    result["load_tokens_equal_one_engine"] = f"{matching}/{len(load)}"
    result["throughput_ratio_dp2_over_single"] = dp_load["output_tokens_per_s"] / single_load["output_tokens_per_s"]
    for part in (single_load, dp_load):
        part.pop("tokens")
    result["ceilings"] = _ceilings()
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "summary.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0 if all(checks.values()) else 1


def _ceilings() -> dict[str, Any]:
    import torch

    from spaceserve.profile.hardware import measure_copy_bandwidth, measure_matmul_tflops

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    device = torch.device("cuda")
    return {"device": torch.cuda.get_device_name(device), "copy_bandwidth": measure_copy_bandwidth(device).to_dict(),
            "matmul_bf16": measure_matmul_tflops(device).to_dict()}


def _commit() -> str:
    if os.environ.get("SPACESERVE_COMMIT"):
        return os.environ["SPACESERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _markdown(result: dict[str, Any]) -> str:
    single, dp = result["single"], result["dp"]
    ceilings = result["ceilings"]
    lines = [
        f"# Data parallelism on one GPU: {result['model']} (commit {result['commit']})",
        "",
        f"Device: {ceilings.get('device')}; copy {ceilings.get('copy_bandwidth', {}).get('best', 0) / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceilings.get('matmul_bf16', {}).get('best', 0):.0f} TFLOP/s (measured in this run).",
        "",
        "| check | result |",
        "|---|---|",
        *[f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in result["checks"].items()],
        "",
        "| engine | start s | KV blocks | load: output tok/s | mean TPOT ms | p50 TTFT ms |",
        "|---|---|---|---|---|---|",
        f"| one engine, 0.45 of the GPU | {single['start_s']:.1f} | {single['num_kv_blocks']} | "
        f"{single['load']['output_tokens_per_s']:.0f} | {single['load']['mean_tpot_ms']:.2f} | "
        f"{single['load']['p50_ttft_ms']:.0f} |",
        f"| two replicas, 0.45 each | {dp['start_s']:.1f} | {' + '.join(map(str, dp['num_kv_blocks']))} | "
        f"{dp['load']['output_tokens_per_s']:.0f} | {dp['load']['mean_tpot_ms']:.2f} | {dp['load']['p50_ttft_ms']:.0f} |",
        "",
        f"Throughput ratio (two replicas / one engine): {result['throughput_ratio_dp2_over_single']:.2f}; load requests "
        f"with tokens equal to the single engine's (bf16, different batches): {result['load_tokens_equal_one_engine']}.",
        "",
        "Memory plans:",
        "",
        f"- one engine: {single['memory_plan']}",
        *[f"- replica {i}: {plan}" for i, plan in enumerate(dp["memory_plans"])],
        "",
        f"Affinity: {json.dumps(dp['affinity'])}",
        "",
        f"Failure: {json.dumps(dp['failure'])}",
        "",
        f"Router: {json.dumps(dp['router']['decisions'])}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
