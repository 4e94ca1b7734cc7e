"""The card's own ceilings, measured in the same run as the numbers compared with them: device-to-device copy
bandwidth (bytes read + bytes written) and the dense matmul rate."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from spaceserve.profile.timing import time_calls


@dataclass(frozen=True)
class Ceiling:
    name: str
    best: float
    """The fastest timed repetition: what the card can do."""
    median: float
    unit: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def measure_copy_bandwidth(
    device: torch.device, nbytes: int = 1 << 30, *, warmup: int = 3, iters: int = 20
) -> Ceiling:
    """Bytes/s of a large copy_ between two buffers, counting the bytes read and the bytes written."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    elements = nbytes // 4
    source = torch.randint(-(2**31), 2**31 - 1, (elements,), dtype=torch.int32, device=device, generator=generator)
    target = torch.empty_like(source)
    stats = time_calls(lambda: target.copy_(source), device, warmup=warmup, iters=iters)
    if not torch.equal(source, target):
        raise RuntimeError("the timed copy did not reproduce its source")
    moved = 2 * elements * 4
    return Ceiling(
        name="copy_bandwidth",
        best=moved / (stats.min_ms * 1e-3),
        median=moved / (stats.median_ms * 1e-3),
        unit="bytes/s",
        method=f"copy_ of {elements * 4} random bytes, read + written, {iters} timed after {warmup} warm-up",
    )


def measure_matmul_tflops(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    n: int = 8192,
    *,
    warmup: int = 3,
    iters: int = 20,
    num_input_sets: int = 3,
) -> Ceiling:
    """TFLOP/s of an n x n x n matmul (2 n^3 FLOPs) on random inputs, rotating among input sets so no repetition
    finds its operands in cache."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [
        (
            torch.randn(n, n, dtype=dtype, device=device, generator=generator),
            torch.randn(n, n, dtype=dtype, device=device, generator=generator),
        )
        for _ in range(num_input_sets)
    ]
    output = torch.empty(n, n, dtype=dtype, device=device)
    calls = itertools.count()

    def one_matmul() -> None:
        a, b = inputs[next(calls) % num_input_sets]
        torch.mm(a, b, out=output)

    stats = time_calls(one_matmul, device, warmup=warmup, iters=iters)
    flops = 2 * n**3
    return Ceiling(
        name="matmul_tflops",
        best=flops / (stats.min_ms * 1e-3) / 1e12,
        median=flops / (stats.median_ms * 1e-3) / 1e12,
        unit="TFLOP/s",
        method=f"torch.mm {n}x{n}x{n} {str(dtype).removeprefix('torch.')}, {num_input_sets} random input sets, "
        f"{iters} timed after {warmup} warm-up",
    )


def measure_ceilings() -> dict[str, Any]:
    """The device's ceilings for a results file: its name and SMs, torch, copy bandwidth and bf16 matmul rate (a
    note instead on a machine without CUDA)."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "note": "no CUDA device: ceilings not measured"}
    device = torch.device("cuda")
    return {
        "device": torch.cuda.get_device_name(device),
        "sms": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__,
        "copy_bandwidth": measure_copy_bandwidth(device).to_dict(),
        "matmul_bf16": measure_matmul_tflops(device).to_dict(),
    }
