"""Token sampling on the device, with no host synchronisation.

Greedy rows take the argmax. The others are scaled by temperature, filtered by top-k and top-p, and drawn by the
exponential race: argmax(p / q) with q ~ Exp(1) picks token i with probability p_i. A seeded request draws its q
row from its own generator, always a full vocabulary row, so it samples the same tokens in any batch. Banned ids
(EOS and stop ids before min_tokens) are masked to -inf first, for greedy and random rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spaceserve.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingMetadata:
    """One step's sampling controls as device tensors, one row per sampled sequence."""

    temperature: torch.Tensor  # [R] float32; 0 marks a greedy row
    top_k: torch.Tensor  # [R] int64; the vocabulary size when off
    top_p: torch.Tensor  # [R] float32; 1.0 when off
    banned_flat_ids: torch.Tensor  # [K] int64: row * vocab + token id, masked to -inf
    all_greedy: bool
    needs_top_k_top_p: bool
    seeded_generators: tuple[tuple[int, torch.Generator], ...] = ()
    """(row, generator) of each seeded random row; the other random rows use the device's default generator."""


def sample_on_device(
    logits: torch.Tensor, metadata: SamplingMetadata, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [R, vocab] float32 (masked in place) -> token ids [R] int64 on the same device. Unseeded random rows
    draw from `generator` (default: the device's), seeded rows from their own."""
    if metadata.banned_flat_ids.numel():
        logits.view(-1).index_fill_(0, metadata.banned_flat_ids, float("-inf"))
    greedy_tokens = logits.argmax(dim=-1)
    if metadata.all_greedy:
        return greedy_tokens
    greedy_rows = metadata.temperature == 0
    temperature = torch.where(greedy_rows, 1.0, metadata.temperature).unsqueeze(1)
    scaled = logits / temperature
    if metadata.needs_top_k_top_p:
        scaled = _mask_top_k_top_p(scaled, metadata.top_k, metadata.top_p)
    probs = scaled.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    for row, generator in metadata.seeded_generators:
        race[row].exponential_(generator=generator)
    random_tokens = probs.div_(race).argmax(dim=-1)
    return torch.where(greedy_rows, greedy_tokens, random_tokens)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))  # top token stays
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: tuple[int, ...] = ()
    """Token ids that may not be sampled now (EOS and stop ids before min_tokens)."""


def sampling_metadata_from_rows(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> SamplingMetadata:
    """The metadata for explicit rows (tests, tools); the model runner fills the same tensors from its buffers."""
    banned = [i * vocab_size + t for i, row in enumerate(rows) for t in row.banned_token_ids]
    return SamplingMetadata(
        temperature=torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=device),
        top_k=torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab_size for r in rows], device=device),
        top_p=torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=device),
        banned_flat_ids=torch.tensor(banned, dtype=torch.int64, device=device),
        all_greedy=all(r.params.greedy for r in rows),
        needs_top_k_top_p=any(not r.params.greedy and (r.params.top_k > 0 or r.params.top_p < 1) for r in rows),
        seeded_generators=tuple((i, r.generator) for i, r in enumerate(rows) if r.generator is not None),
    )


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [len(rows), vocab] float32 -> one token id per row (synchronises: for tests and tools)."""
    metadata = sampling_metadata_from_rows(rows, logits.shape[-1], logits.device)
    return sample_on_device(logits, metadata).tolist()
