"""Checks that SM partitions (spaceserve.runtime.sm_partition) really confine work to their SMs, on one GPU.

For each encoder SM count: a compute-bound bf16 matmul loop and a bandwidth-bound copy loop are timed alone on
the whole GPU (an ordinary stream), on the encoder partition's stream and on the language model's stream; then
the matmul on the encoder stream runs concurrently with the copy on the LM stream. Expected: the matmul slows by
about total/granted SMs on a partition, the copy barely slows on the LM side, and running both together leaves
each near its alone time. One unpartitioned concurrent run (two ordinary streams) is the contrast.

Usage (repo root): PYTHONPATH=$PWD python3 scripts/sm_partition_check.py [--encoder-sms 16 32 64 96] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

from spaceserve.runtime.sm_partition import get_partition_manager, green_context_support

WARMUP = 2
REPEATS = 5


class Timer:
    """Times work enqueued on a stream: CUDA events when they can be recorded on green-context streams,
    else host wall-clock around a synchronised loop (the JSON says which)."""

    def __init__(self, probe_stream: torch.cuda.Stream) -> None:
        self.method = "cuda-events"
        self.event_error = None
        try:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(probe_stream)
            end.record(probe_stream)
            end.synchronize()
            start.elapsed_time(end)
        except RuntimeError as exc:
            self.method, self.event_error = "wall-clock", str(exc)

    def run(self, work_by_stream: list[tuple[torch.cuda.Stream, Callable[[int], None], int]]) -> list[float]:
        """Enqueues each (stream, step, iterations) loop, interleaving the streams step by step; returns each
        loop's milliseconds (median over REPEATS after WARMUP)."""
        samples: list[list[float]] = [[] for _ in work_by_stream]
        for repeat in range(WARMUP + REPEATS):
            torch.cuda.synchronize()
            for index, ms in enumerate(self._run_once(work_by_stream)):
                if repeat >= WARMUP:
                    samples[index].append(ms)
        return [statistics.median(s) for s in samples]

    def _run_once(self, work_by_stream) -> list[float]:
        use_events = self.method == "cuda-events"
        starts = [torch.cuda.Event(enable_timing=True) for _ in work_by_stream] if use_events else []
        ends = [torch.cuda.Event(enable_timing=True) for _ in work_by_stream] if use_events else []
        host_start = time.perf_counter()
        for index, (stream, _, _) in enumerate(work_by_stream):
            if use_events:
                starts[index].record(stream)
        for step in range(max(iterations for _, _, iterations in work_by_stream)):
            for stream, work, iterations in work_by_stream:
                if step < iterations:
                    with torch.cuda.stream(stream):
                        work(step)
        for index, (stream, _, _) in enumerate(work_by_stream):
            if use_events:
                ends[index].record(stream)
        host_ms = []  # the fallback: a later stream's time includes waiting for the earlier ones
        for stream, _, _ in work_by_stream:
            stream.synchronize()
            host_ms.append((time.perf_counter() - host_start) * 1e3)
        if use_events:
            return [start.elapsed_time(end) for start, end in zip(starts, ends)]
        return host_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-sms", type=int, nargs="+", default=[16, 32, 64, 96])
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--matmul-iterations", type=int, default=8)
    parser.add_argument("--copy-mib", type=int, default=512)
    parser.add_argument("--copy-iterations", type=int, default=8)
    default_out = os.path.join(os.environ["OUT"], "sm_partition_check.json") if os.environ.get("OUT") else None
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("sm_partition_check needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    reason = green_context_support(device)
    if reason is not None:
        raise SystemExit(f"no SM partitions on {device}: {reason}")
    import cuda.bindings
    from cuda.bindings import driver

    manager = get_partition_manager(device)
    _, driver_version = driver.cuDriverGetVersion()
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_bindings": cuda.bindings.__version__,
        "driver_cuda_version": f"{driver_version // 1000}.{driver_version % 1000 // 10}",
        "total_sms": manager.total_sms,
        "matmul": {"size": args.matmul_size, "iterations": args.matmul_iterations, "dtype": "bfloat16"},
        "copy": {"mib": args.copy_mib, "iterations": args.copy_iterations},
        "splits": [],
    }

    n = args.matmul_size
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_out = torch.empty(n, n, device=device, dtype=torch.bfloat16)  # outputs preallocated: no allocation
    copy_src = torch.randn(args.copy_mib * 2**20 // 2, device=device, dtype=torch.bfloat16)  # on green streams
    copy_dst = torch.empty_like(copy_src)
    torch.cuda.synchronize()

    def matmul(_: int) -> None:
        torch.matmul(a, b, out=matmul_out)

    def copy(_: int) -> None:
        copy_dst.copy_(copy_src)

    first = manager.partition(args.encoder_sms[0])
    timer = Timer(first.encoder_stream)
    report["timing"] = timer.method
    if timer.event_error:
        report["event_error"] = timer.event_error
    full_stream = torch.cuda.Stream(device)
    other_full_stream = torch.cuda.Stream(device)
    mm_iters, copy_iters = args.matmul_iterations, args.copy_iterations
    (matmul_full,) = timer.run([(full_stream, matmul, mm_iters)])
    (copy_full,) = timer.run([(full_stream, copy, copy_iters)])
    matmul_flops = 2 * n**3 * mm_iters
    copy_bytes = 2 * copy_src.numel() * copy_src.element_size() * copy_iters  # read + write
    report["full_gpu"] = {"matmul_ms": matmul_full, "matmul_tflops": matmul_flops / matmul_full / 1e9,
                          "copy_ms": copy_full, "copy_tb_per_s": copy_bytes / copy_full / 1e9}
    both = timer.run([(full_stream, matmul, mm_iters), (other_full_stream, copy, copy_iters)])
    report["unpartitioned_concurrent"] = {"matmul_ms": both[0], "copy_ms": both[1]}

    header = (f"{'enc':>4} {'lm':>4} | {'mm enc':>8} {'x':>5} {'want':>5} {'mm lm':>8} | {'cp enc':>8} {'cp lm':>8} "
              f"| {'conc mm':>8} {'/alone':>6} {'conc cp':>8} {'/alone':>6}")
    print(f"{report['device']}  torch {torch.__version__}  driver CUDA {report['driver_cuda_version']}  "
          f"{manager.total_sms} SMs  timing: {timer.method}")
    print(f"full GPU: matmul {matmul_full:.2f} ms ({report['full_gpu']['matmul_tflops']:.0f} TFLOP/s), copy "
          f"{copy_full:.2f} ms ({report['full_gpu']['copy_tb_per_s']:.2f} TB/s); both on two plain streams: "
          f"matmul {both[0]:.2f} ms, copy {both[1]:.2f} ms")
    print(header)
    for requested in args.encoder_sms:
        split = manager.partition(requested)
        (matmul_encoder,) = timer.run([(split.encoder_stream, matmul, mm_iters)])
        (matmul_lm,) = timer.run([(split.lm_stream, matmul, mm_iters)])
        (copy_encoder,) = timer.run([(split.encoder_stream, copy, copy_iters)])
        (copy_lm,) = timer.run([(split.lm_stream, copy, copy_iters)])
        # Enough copies on the LM side to last as long as the encoder's matmuls, so the two loops overlap fully.
        balanced_copies = max(1, round(matmul_encoder / (copy_lm / copy_iters)))
        (copy_lm_balanced,) = timer.run([(split.lm_stream, copy, balanced_copies)])
        together = timer.run([(split.encoder_stream, matmul, mm_iters), (split.lm_stream, copy, balanced_copies)])
        row = {
            "requested_encoder_sms": requested, "encoder_sms": split.encoder_sms, "lm_sms": split.lm_sms,
            "matmul_ms": {"encoder": matmul_encoder, "lm": matmul_lm},
            "matmul_slowdown_on_encoder": matmul_encoder / matmul_full,
            "expected_slowdown_on_encoder": split.total_sms / split.encoder_sms,
            "matmul_slowdown_on_lm": matmul_lm / matmul_full,
            "expected_slowdown_on_lm": split.total_sms / split.lm_sms,
            "copy_ms": {"encoder": copy_encoder, "lm": copy_lm},
            "concurrent": {"matmul_on_encoder_ms": together[0], "matmul_alone_ms": matmul_encoder,
                           "copies_on_lm": balanced_copies, "copy_on_lm_ms": together[1],
                           "copy_alone_ms": copy_lm_balanced},
        }
        report["splits"].append(row)
        print(f"{split.encoder_sms:>4} {split.lm_sms:>4} | {matmul_encoder:>8.2f} "
              f"{row['matmul_slowdown_on_encoder']:>5.2f} {row['expected_slowdown_on_encoder']:>5.2f} "
              f"{matmul_lm:>8.2f} | {copy_encoder:>8.2f} {copy_lm:>8.2f} | {together[0]:>8.2f} "
              f"{together[0] / matmul_encoder:>6.2f} {together[1]:>8.2f} {together[1] / copy_lm_balanced:>6.2f}")
    print("ms per loop (median); x = matmul slowdown vs the full GPU, want = total/granted SMs; "
          "/alone = concurrent time over the same loop alone on its partition")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
