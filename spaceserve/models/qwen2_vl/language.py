"""The Qwen2 language model with M-RoPE, over a paged KV cache. Shared by Qwen2-VL and Qwen2.5-VL.

Tensor-parallel when built inside `parallel_state.building_model`: q/k/v and gate/up column-parallel, o_proj and
down_proj row-parallel (one all-reduce after each), the embedding and the head split by vocabulary rows; each rank
holds its heads' KV cache. With one rank the layers compute what nn.Linear / nn.Embedding do.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from spaceserve.layers.activation import SiluAndMul
from spaceserve.layers.attention import AttentionBackend, AttentionMetadata
from spaceserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, load_parameter
from spaceserve.layers.norm import RMSNorm
from spaceserve.layers.rotary import MRotaryEmbedding, apply_rotary_qk
from spaceserve.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding, compute_logits
from spaceserve.models.config import TextConfig


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, bias=True
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, kv_cache, metadata: AttentionMetadata, backend: AttentionBackend):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = apply_rotary_qk(
            q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim), cos, sin
        )
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, metadata, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, (cfg.intermediate_size,) * 2, bias=False)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, residual, cos, sin, kv_cache, metadata, backend):
        """(sublayer output, residual stream): the residual add of each sublayer happens in the next norm, so
        the first layer gets residual=None and the caller's final norm adds the last MLP output."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, metadata, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# checkpoint name -> (our parameter name, the part it is) for the projections we fuse
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Qwen2LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions, inputs_embeds.dtype)
        x, residual = inputs_embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, metadata, backend)
        if residual is None:  # no layers
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the whole vocabulary, on every rank."""
        return compute_logits(hidden, self.embed_tokens if self.lm_head is None else self.lm_head)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Names relative to the language model (`layers.0.self_attn.q_proj.weight`, `embed_tokens.weight`,
        `norm.weight`) plus `lm_head.weight`. Tensors may be safetensors slices: each parameter reads only the
        slice its rank holds."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            target, shard = _fused_target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the language model")
            load_parameter(params[target], tensor, name, shard)
            loaded.add(name)
        return loaded

    def expected_checkpoint_names(self) -> set[str]:
        """Every checkpoint tensor name this model needs, with fused projections listed by their parts."""
        names = set()
        for name, _ in self.named_parameters():
            parts = [original for original, (fused, _) in _FUSED.items() if f".{fused}." in name]
            if parts:
                fused = _FUSED[parts[0]][0]
                names.update(name.replace(f".{fused}.", f".{original}.") for original in parts)
            else:
                names.add(name)
        return names


def _fused_target(name: str) -> tuple[str, str | int | None]:
    for original, (fused, shard) in _FUSED.items():
        marker = f".{original}."
        if marker in name:
            return name.replace(marker, f".{fused}."), shard
    return name, None

