"""Checks and measures tensor parallelism on this host's GPUs in one run (a few minutes).

    python3 scripts/tp_check.py --out DIR [--model Qwen/Qwen2-VL-7B-Instruct] [--tp-sizes 2,4,8]
                                [--batches 1,16,64] [--context 1024]

1. Ceilings on GPU 0: device copy bandwidth and the bf16 matmul rate (profile/hardware.py).
2. The step message: a decode step's packed bytes from one process to another through the shared-memory queue
   (runtime/shm_broadcast.py) against a gloo broadcast of the same bytes, round trip per message.
3. One GPU: tp=1 through the multi-process executor (a process group of one, every step written to the queue,
   parallel layers) against the direct path, on the same synthetic decode steps with the same CUDA graphs: wall
   time and host time per step. Target: at most 3% slower. Greedy tokens of a short generate must be identical.
4. With several GPUs visible, each tp of --tp-sizes that divides the model and fits: decode step time against the
   bandwidth floor per rank (weights / tp plus that rank's KV heads, at the measured copy bandwidth), the share
   of the step the collectives take (its all-reduces and logits all-gather alone, as one CUDA graph), whether the
   greedy tokens equal tp=1's (bf16 sums in another order may flip a token of a random model: reported, not
   asserted), and an encoder batch with the vision tower split by weights and by data.

Writes DIR/tp_check.json and DIR/tp_check.md; exits non-zero when a check fails (tokens of the two tp=1 paths, the
3% target).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaceserve import LLM, SamplingParams  # noqa: E402
from spaceserve.profile.floors import uniform_decode_traffic  # noqa: E402
from spaceserve.profile.hardware import measure_copy_bandwidth, measure_matmul_tflops  # noqa: E402
from spaceserve.profile.synthetic import decode_step, encoder_batch, host_time_per_step, run_step  # noqa: E402
from spaceserve.runtime.kv_cache import kv_heads_per_rank  # noqa: E402
from spaceserve.runtime.shm_broadcast import MessageQueue  # noqa: E402

TARGET_OVERHEAD = 0.03
KV_BYTES = 8 << 30
PROMPTS = ["Describe the weather in four sentences.", "List ten animals that live in the sea:"]


# ---- 2. the step message -------------------------------------------------------------------------------------


def _channel_reader(handle, port: int, sizes: list[int], iters: int, ack) -> None:
    import torch.distributed as dist

    queue = MessageQueue.attach(handle, 0)
    for _ in sizes:
        for _ in range(iters):
            raw = queue.read(10.0)
            local = raw.copy()
            queue.ack()
            ack.release()
            del local
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    for size in sizes:
        buffer = torch.empty(size, dtype=torch.uint8)
        for _ in range(iters):
            dist.broadcast(buffer, 0)
            dist.barrier()
    dist.destroy_process_group()
    queue.close()


def measure_step_channels(sizes: list[int], iters: int = 500) -> list[dict]:
    """Round trip per message (write, the reader wakes, copies out and acknowledges) for each payload size."""
    import torch.distributed as dist

    context = multiprocessing.get_context("spawn")
    queue = MessageQueue.create(1, max(sizes))
    ack = context.Semaphore(0)
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    reader = context.Process(target=_channel_reader, args=(queue.handle, store.port, sizes, iters, ack))
    reader.start()
    rows = []
    for size in sizes:
        payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        samples = []
        for _ in range(iters):
            began = time.perf_counter()
            queue.write([payload], 10.0, lambda: None)
            ack.acquire()
            samples.append((time.perf_counter() - began) * 1e6)
        rows.append({"bytes": size, "shm_round_trip_us": statistics.median(samples)})
    dist.init_process_group("gloo", store=store, rank=0, world_size=2)
    for row, size in zip(rows, sizes):
        buffer = torch.zeros(size, dtype=torch.uint8)
        samples = []
        for _ in range(iters):
            began = time.perf_counter()
            dist.broadcast(buffer, 0)
            dist.barrier()  # the round trip: the reader has the bytes
            samples.append((time.perf_counter() - began) * 1e6)
        row["gloo_broadcast_barrier_us"] = statistics.median(samples)
    dist.destroy_process_group()
    reader.join(30)
    queue.close()
    return rows


# ---- engines -----------------------------------------------------------------------------------------------------


def make_engine(args, **overrides) -> LLM:
    settings = dict(
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=args.context + 64,
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=4096,
        cuda_graph_sizes=tuple(sorted(args.batches)),
        kv_cache_memory_bytes=KV_BYTES,
        seed=1,
        multiprocess=False,  # the engine core in this process: its runner is timed directly
    )
    settings.update(overrides)
    return LLM(args.model, **settings)


def release(llm: LLM) -> None:
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def greedy_tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


def decode_times(llm: LLM, batches: list[int], context: int, iters: int) -> dict[int, dict]:
    """Per batch: wall ms per decode step (launch + collect, the engine's sync included) and host ms per step."""
    engine = llm.llm_engine.core
    runner = engine.model_runner
    device = engine.device
    rng = np.random.default_rng(0)
    results = {}
    for batch in batches:
        step = decode_step(engine, batch, context, rng)
        try:
            for _ in range(5):
                run_step(runner, step.scheduled, {})
            torch.cuda.synchronize(device)
            samples = []
            for _ in range(iters):
                began = time.perf_counter()
                run_step(runner, step.scheduled, {})
                samples.append((time.perf_counter() - began) * 1e3)
            host = host_time_per_step(runner, step.scheduled, {}, device, max(10, iters // 4))
        finally:
            step.release(engine)
        results[batch] = {
            "wall_ms": statistics.median(samples),
            "wall_min_ms": min(samples),
            "host_ms": statistics.median(host.samples_ms),
            "graphed": runner.cuda_graphs is not None,
        }
    return results


def floor_ms(text, batch: int, context: int, tp: int, bandwidth: float) -> float:
    traffic = uniform_decode_traffic(text, batch, context, dtype_bytes=2)
    kv_share = kv_heads_per_rank(text, tp) / text.num_key_value_heads
    return (traffic.weight_bytes / tp + traffic.kv_read_bytes * kv_share) / bandwidth * 1e3


def encoder_ms(llm: LLM, iters: int = 5) -> float:
    engine = llm.llm_engine.core
    batch = encoder_batch(engine, [(1, 64, 64)] * 4 + [(1, 96, 96)] * 2, np.random.default_rng(3))
    for _ in range(2):
        engine.encoder_stage.runner.execute(batch)
    torch.cuda.synchronize(engine.device)
    samples = []
    for _ in range(iters):
        began = time.perf_counter()
        engine.encoder_stage.runner.execute(batch)
        torch.cuda.synchronize(engine.device)
        samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def tp_sizes_here(args, text, vision) -> list[int]:
    visible = torch.cuda.device_count()
    sizes = [int(s) for s in args.tp_sizes.split(",")] if args.tp_sizes else [2, 4, 8]
    return [
        tp
        for tp in sizes
        if tp <= visible and text.num_attention_heads % tp == 0 and text.intermediate_size % tp == 0
        and (text.num_key_value_heads % tp == 0 or tp % text.num_key_value_heads == 0)
    ]


# ---- the run -----------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="Qwen/Qwen2-VL-7B-Instruct")
    parser.add_argument("--tp-sizes", default=None, help="tensor-parallel sizes to run (default: 2,4,8 that fit)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    report: dict = {"model": args.model, "gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0)}
    lines = [f"# Tensor parallelism on {report['device']} x{report['gpus']}: {args.model} (dummy weights, bf16)", ""]
    failed = []

    bandwidth = measure_copy_bandwidth(device)
    matmul = measure_matmul_tflops(device)
    report["ceilings"] = {"copy_bandwidth": bandwidth.to_dict(), "matmul_tflops": matmul.to_dict()}
    lines += [f"Ceilings: copy {bandwidth.best / 1e12:.2f} TB/s, bf16 matmul {matmul.best:.0f} TFLOP/s", ""]

    channels = measure_step_channels([4096, 65536])
    report["step_channel"] = channels
    lines += ["## Step message between two processes (round trip per message)", "",
              "| bytes | shared memory + semaphore | gloo broadcast + barrier |", "|---|---|---|"]
    lines += [f"| {r['bytes']} | {r['shm_round_trip_us']:.1f} us | {r['gloo_broadcast_barrier_us']:.1f} us |"
              for r in channels]
    lines.append("")

    # 3. one GPU: the multi-process path at tp=1 against the direct path
    direct = make_engine(args, distributed_executor_backend="uni")
    text = direct.llm_engine.config.model_config.text
    vision = direct.llm_engine.config.model_config.vision  # the front's config: the same EngineConfig
    direct_tokens = greedy_tokens(direct)
    direct_times = decode_times(direct, args.batches, args.context, args.iters)
    release(direct)
    del direct
    multi = make_engine(args, distributed_executor_backend="mp")
    multi_tokens = greedy_tokens(multi)
    multi_times = decode_times(multi, args.batches, args.context, args.iters)
    release(multi)
    del multi
    same = direct_tokens == multi_tokens
    if not same:
        failed.append("tp=1 multi-process tokens differ from the direct path")
    report["tp1"] = {"tokens_identical": same, "direct": direct_times, "multiprocess": multi_times}
    lines += ["## tp=1: multi-process executor against the direct path", "",
              f"Greedy tokens identical: {same}", "",
              "| batch | direct ms | mp ms | slower by | host direct | host mp | floor (tp=1) |", "|---|---|---|---|---|---|---|"]
    for batch in args.batches:
        d, m = direct_times[batch], multi_times[batch]
        overhead = m["wall_ms"] / d["wall_ms"] - 1
        if overhead > TARGET_OVERHEAD:
            failed.append(f"tp=1 multi-process decode at batch {batch} is {overhead:.1%} slower (target 3%)")
        lines.append(
            f"| {batch} | {d['wall_ms']:.3f} | {m['wall_ms']:.3f} | {overhead:+.1%} | {d['host_ms']:.3f} | "
            f"{m['host_ms']:.3f} | {floor_ms(text, batch, args.context, 1, bandwidth.best):.3f} |"
        )
    lines.append("")

    # 4. several GPUs
    sizes = tp_sizes_here(args, text, vision)
    report["tp"] = {}
    if sizes:
        lines += ["## Decode step across ranks", "",
                  "| tp | batch | step ms | floor per rank ms | of floor | collectives ms | collectives share |",
                  "|---|---|---|---|---|---|---|"]
    for tp in sizes:
        # the vision tower split by weights where its heads and MLP divide, else by data
        splits = vision.num_heads % tp == 0 and vision.intermediate_size % tp == 0
        main_mode = "weights" if splits else "data"
        llm = make_engine(args, tensor_parallel_size=tp, mm_encoder_tp_mode=main_mode)
        tokens = greedy_tokens(llm)
        times = decode_times(llm, args.batches, args.context, args.iters)
        executor = llm.llm_engine.core.executor
        comm = {b: executor.collective_rpc("time_decode_collectives", b, 50)[0] for b in args.batches}
        entry = {"tokens_identical_to_tp1": tokens == direct_tokens, "decode": times, "collectives": comm}
        mode_ms = {main_mode: encoder_ms(llm)}
        release(llm)
        del llm
        if splits:  # the same batch with each rank encoding whole images
            data = make_engine(args, tensor_parallel_size=tp, mm_encoder_tp_mode="data", enforce_eager=True)
            mode_ms["data"] = encoder_ms(data)
            release(data)
            del data
        entry["encoder_batch_ms"] = mode_ms
        report["tp"][tp] = entry
        for batch in args.batches:
            step, floor = times[batch]["wall_ms"], floor_ms(text, batch, args.context, tp, bandwidth.best)
            share = comm[batch]["median_ms"] / step
            lines.append(f"| {tp} | {batch} | {step:.3f} | {floor:.3f} | {floor / step:.0%} | "
                         f"{comm[batch]['median_ms']:.3f} | {share:.0%} |")
    for tp in sizes:
        entry = report["tp"][tp]
        lines.append(f"- tp={tp}: greedy tokens equal tp=1: {entry['tokens_identical_to_tp1']}; encoder batch "
                     + ", ".join(f"{mode} {ms:.1f} ms" for mode, ms in entry["encoder_batch_ms"].items()))
    if not sizes:
        lines.append("One GPU visible (or no size divides the model): no tp > 1 runs.")
    lines += ["", "Failed checks: " + ("; ".join(failed) if failed else "none")]
    report["failed"] = failed

    (args.out / "tp_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "tp_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
