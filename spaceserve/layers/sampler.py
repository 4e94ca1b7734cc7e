"""Token sampling for one step: greedy rows take the argmax; the others are filtered by temperature, top-k and
top-p and drawn with their own generator, so a seeded request samples the same tokens in any batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spaceserve.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: tuple[int, ...] = ()
    """Token ids that may not be sampled now (EOS and stop ids before min_tokens)."""


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [len(rows), vocab] float32 -> one token id per row."""
    for i, row in enumerate(rows):
        if row.banned_token_ids:
            logits[i, list(row.banned_token_ids)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        drawn = _sample_random(logits[index], [rows[i] for i in random_rows])
        tokens[index] = drawn
    return tokens.tolist()


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device).unsqueeze(1)
    logits = logits / temperature
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device).unsqueeze(1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the top token always stays
    probs = sorted_logits.softmax(dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(rows)]
    return sorted_ids.gather(1, torch.stack(picks)).squeeze(1)
