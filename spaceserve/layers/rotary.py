"""Multimodal rotary embedding (M-RoPE): the rotary frequencies are split into temporal, height and width
sections, each rotated by its own position axis. Text tokens carry the same position on all three axes."""

import torch
from torch import nn

from spaceserve.layers.triton_ops import use_fused_ops


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int]) -> None:
        super().__init__()
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"mrope_section {mrope_section} must cover head_dim/2 = {head_dim // 2}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = list(mrope_section)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, num_tokens] -> cos, sin of shape [num_tokens, head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [3, N, head_dim/2]
        sections = freqs.split(self.mrope_section, dim=-1)
        freqs = torch.cat([section[axis % 3] for axis, section in enumerate(sections)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos/sin: [num_tokens, head_dim]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on q [N, Hq, D] and k [N, Hk, D]; on CUDA one fused launch for both."""
    if use_fused_ops(q) and q.dtype == k.dtype == cos.dtype == sin.dtype:
        from spaceserve.layers.triton_ops.rotary import rotary_qk_triton

        return rotary_qk_triton(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
