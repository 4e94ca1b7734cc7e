"""Fused Triton kernels for the per-layer elementwise work of a decode step: RMSNorm with the residual add, M-RoPE
on q and k, SiLU-and-mul. Each rounds where its torch reference (next to the layer: norm.py, rotary.py,
activation.py) rounds, so outputs match the reference up to float32 summation order.

The layers call `use_fused_ops(x)`: True for CUDA tensors when Triton is installed, unless SPACESERVE_FUSED_OPS=0
or `set_fused_ops_enabled(False)` forces the torch path (tests and benchmarks compare the two). The choice is made
per call, so decode CUDA graphs capture whichever path was on when they were captured."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_enabled = os.environ.get("SPACESERVE_FUSED_OPS", "1") != "0"


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_ops_enabled() -> bool:
    return _enabled


def set_fused_ops_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


@contextmanager
def fused_ops(enabled: bool) -> Iterator[None]:
    """Run a block with the fused kernels switched on or off, restoring the previous setting after."""
    previous = _enabled
    set_fused_ops_enabled(enabled)
    try:
        yield
    finally:
        set_fused_ops_enabled(previous)


def use_fused_ops(x: torch.Tensor) -> bool:
    return _enabled and x.is_cuda and _triton_installed()


__all__ = ["fused_ops", "fused_ops_enabled", "set_fused_ops_enabled", "use_fused_ops"]
