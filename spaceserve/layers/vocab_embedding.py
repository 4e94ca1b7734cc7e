"""Vocabulary-parallel embedding and LM head: rank r holds token rows [r*P, (r+1)*P) with P = ceil(vocab / tp)
(the last rank's rows past the vocabulary are zero padding).

The embedding looks up the ids that fall in its rows, zeroes the others and all-reduces, so every rank ends with
every token's embedding. The head computes its rows' logits and all-gathers them, so every rank holds the whole
[tokens, vocab] logits and samples the same token from them (each rank feeds its own sampled ids to its next step).
With one rank both are exactly `nn.Embedding` and `F.linear`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spaceserve.layers.linear import ShardLayout, check_shape, checkpoint_shape, read_rows, set_shard
from spaceserve.runtime.parallel_state import GroupCoordinator, current_tp_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, group: GroupCoordinator | None = None) -> None:
        super().__init__()
        self.group = group or current_tp_group()
        tp, rank = self.group.world_size, self.group.rank
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // tp)
        self.vocab_start = rank * self.rows_per_rank
        self.num_real_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        nn.init.normal_(self.weight)  # as nn.Embedding starts; a loader or the dummy initialiser fills it
        layout = ShardLayout(
            (num_embeddings, embedding_dim),
            ((self.vocab_start, self.num_real_rows),),
            pad_rows=self.rows_per_rank - self.num_real_rows,
        )
        set_shard(self.weight, layout, self.weight_loader)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded: Any, name: str = "", shard_id: Any = None) -> None:
        if shard_id is not None:
            raise KeyError(f"checkpoint tensor {name!r} names a part of an embedding")
        check_shape(name, (self.num_embeddings, param.shape[1]), checkpoint_shape(loaded))
        rows = self.num_real_rows
        param[:rows].copy_(read_rows(loaded, self.vocab_start, self.vocab_start + rows))
        param[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_real_rows)
        embeds = F.embedding(local.masked_fill(outside, 0), self.weight)
        embeds.masked_fill_(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(embeds)

    def extra_repr(self) -> str:
        return f"vocab rows [{self.vocab_start}, {self.vocab_start + self.num_real_rows}) of {self.num_embeddings}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding (and loaded the same way); `compute_logits` is the forward."""


def compute_logits(hidden: torch.Tensor, head: VocabParallelEmbedding) -> torch.Tensor:
    """hidden [n, hidden] -> float32 logits [n, vocab] on every rank."""
    logits = F.linear(hidden, head.weight)
    if head.group.world_size > 1:
        logits = head.group.all_gather(logits, dim=-1)[:, : head.num_embeddings]
    return logits.float()
