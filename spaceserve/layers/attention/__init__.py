import torch

from spaceserve.core.errors import ConfigError
from spaceserve.layers.attention.backend import AttentionBackend, AttentionMetadata, build_attention_metadata
from spaceserve.layers.attention.torch_backend import TorchAttentionBackend

BACKEND_NAMES = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_attention_backend(name: str = "torch", device: torch.device | None = None) -> AttentionBackend:
    """`auto` picks Triton on CUDA when it is installed, else the torch reference. `triton` off CUDA needs
    TRITON_INTERPRET=1 (the tests run the kernels that way on CPU)."""
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown attention backend {name!r}; available: {list(BACKEND_NAMES)}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if name == "auto":
        name = "triton" if on_cuda and triton_available() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if not triton_available():
        raise ConfigError("attention backend 'triton' needs the triton package, which is not installed")
    from spaceserve.layers.attention.triton import interpreting
    from spaceserve.layers.attention.triton_backend import TritonAttentionBackend

    if not on_cuda and not interpreting():
        raise ConfigError(
            f"attention backend 'triton' runs on CUDA devices, got {device}; use 'torch' "
            "(or set TRITON_INTERPRET=1 before starting Python to run the kernels on CPU, slowly)"
        )
    return TritonAttentionBackend()


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchAttentionBackend",
    "build_attention_metadata",
    "get_attention_backend",
    "triton_available",
]
