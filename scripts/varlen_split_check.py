"""The vision varlen kernel in one head-split mode, as the CUDA graphs launch it (a fixed grid, the work count read on
the device, stale work rows past it), repeated, against per-segment SDPA in float32: every output row must be written
and finite. Prints one JSON line. scripts/vision_graph_check.py runs one process per mode, so a fault stays in it.

    python3 scripts/varlen_split_check.py split [--small]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def split_check(mode: str, small: bool) -> dict:
    """The kernel as a graph launches it (fixed grid, work count on the device, stale rows past it), repeated, against
    per-segment SDPA in float32; every output row must be written and finite."""
    from spaceserve.layers.attention.triton import varlen_attention, varlen_tiling
    from spaceserve.models.vision_inputs import graph_num_programs
    from spaceserve.models.vision_layout import cu_seqlens, work_items

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        import tests.conftest  # noqa: F401  - the interpreter's loop-bound fix the CPU tests use (smoke runs only)
    heads = 2 if device.type == "cpu" else 16
    cases = {
        "one-image-9216": [9216],
        "mixed": [1024] * 8 + [64] * 16 + [300, 1],
        "windows": [64] * 144 + [16, 32, 48, 4],
        "video-frames": [748] * 24,
    }
    if small:
        cases = {"small-mixed": [300, 64, 17, 1, 130], "small-windows": [64] * 9 + [16, 4]}
    dtypes = [torch.bfloat16] + ([torch.float32] if small else [])
    repeats = 3 if small else 10
    if device.type == "cpu":  # the interpreter, for --smoke: only that the check runs
        cases, dtypes, repeats = {"tiny": [40, 17, 1, 20]}, [torch.float32], 1
    results = {}
    generator = torch.Generator(device=device).manual_seed(0)
    for name, lengths in cases.items():
        for dtype in dtypes:
            total = sum(lengths)
            q, k, v = torch.randn(total, 3, heads, 80, generator=generator, device=device).to(dtype).unbind(1)
            tiling = varlen_tiling(max(lengths))
            items = work_items(np.asarray(lengths), tiling.block_m)
            stale = np.full((7, 2), 1 << 20, dtype=np.int32)
            work = torch.from_numpy(np.concatenate([items, stale])).to(device)
            count = torch.tensor([len(items)], dtype=torch.int32, device=device)
            cu = torch.from_numpy(cu_seqlens(np.asarray(lengths))).to(device=device, dtype=torch.int32)
            programs = graph_num_programs(total, tiling.block_m)
            expected, start = [], 0
            for length in lengths:
                segment = [x[start : start + length].float().transpose(0, 1) for x in (q, k, v)]
                expected.append(torch.nn.functional.scaled_dot_product_attention(*segment).transpose(0, 1))
                start += length
            expected = torch.cat(expected).double()
            worst, finite = 0.0, True
            for _ in range(repeats):
                out = torch.full_like(q, float("nan"))
                varlen_attention(q, k, v, cu, work, 80**-0.5, tiling, out=out, work_count=count, num_programs=programs,
                                 head_split=mode)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.synchronize()
                finite &= bool(torch.isfinite(out).all())
                worst = max(worst, ((out.double() - expected).norm() / expected.norm()).item())
            tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
            results[f"{name}-{str(dtype).removeprefix('torch.')}"] = {
                "finite": finite, "relative_error": worst, "ok": finite and worst < tolerance,
            }  # fmt: skip
    return {"mode": mode, "ok": all(r["ok"] for r in results.values()), "cases": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["padded", "split", "split32"])
    parser.add_argument("--small", action="store_true", help="small cases in bfloat16 and float32 (for memcheck)")
    args = parser.parse_args(argv)
    print(json.dumps(split_check(args.mode, args.small)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
