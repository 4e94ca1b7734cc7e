import torch

from spaceserve.layers.attention.backend import AttentionBackend, AttentionMetadata, build_attention_metadata
from spaceserve.layers.attention.torch_backend import TorchAttentionBackend

_BACKENDS = {TorchAttentionBackend.name: TorchAttentionBackend}


def get_attention_backend(name: str = "torch", device: torch.device | None = None) -> AttentionBackend:
    """`auto` picks the fastest backend that runs on `device`."""
    if name == "auto":
        name = "torch"
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}") from None


__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend", "build_attention_metadata", "get_attention_backend"]
