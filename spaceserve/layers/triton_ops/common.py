"""What the fused elementwise kernels share: rounding and launch options that keep the reference's numerics."""

from __future__ import annotations

import triton
import triton.language as tl

from spaceserve.layers.attention.triton.common import interpreting


def precise_math() -> bool:
    """libdevice exp/rsqrt are CUDA's expf/rsqrtf, which torch's kernels call; Triton's defaults are approximate.
    The interpreter has no libdevice, so it uses tl.exp/tl.math.rsqrt (NumPy's, exact enough for CPU tests)."""
    return not interpreting()


def launch_options() -> dict:
    """The torch references round every product and sum separately; LLVM would otherwise contract a*b + c into
    one FMA. (The interpreter ignores the option.)"""
    return {"enable_fp_fusion": False}


def row_block(width: int) -> int:
    return triton.next_power_of_2(width)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (to nearest, ties to even) and widened back to float32. bfloat16 is rounded with
    integer ops: the same result as the GPU's conversion, and also under the interpreter, whose float32 -> bfloat16
    cast truncates."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)
