"""Token sampling on the device, with no host synchronisation.

Greedy rows take the argmax. The others are scaled by temperature, filtered by top-k and top-p, and drawn by the
exponential race: argmax(p / q) with q ~ Exp(1) picks token i with probability p_i. A seeded request draws its q
row from its own generator, always a full vocabulary row, so it samples the same tokens in any batch. Banned ids
(EOS and stop ids before min_tokens) are masked to -inf first, for greedy and random rows alike.

Log-probabilities (`sample_with_logprobs`, only in steps where a request asked for them) are vLLM's default "raw"
ones: the log-softmax of the model's logits before any mask, temperature or top-k/top-p, for the sampled token
(with its rank) and the k most likely tokens.
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
    max_num_logprobs: int | None = None
    """The most top log-probabilities a row of this step asked for; None: no row wants log-probabilities."""


@dataclass(frozen=True)
class LogprobsTensors:
    """Per sampled row: column 0 is the sampled token, columns 1..k the k most likely tokens (on the device)."""

    token_ids: torch.Tensor  # [R, 1 + k] int64
    logprobs: torch.Tensor  # [R, 1 + k] float32
    sampled_ranks: torch.Tensor  # [R] int64: 1 + how many tokens are more likely than the sampled one


def sample_with_logprobs(
    logits: torch.Tensor, metadata: SamplingMetadata, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, LogprobsTensors | None]:
    """`sample_on_device`, plus the rows' log-probabilities when any row asked for them (metadata.max_num_logprobs
    set). The model runner calls this once per step."""
    if metadata.max_num_logprobs is None:
        return sample_on_device(logits, metadata, generator), None
    raw = logits.float().log_softmax(dim=-1)  # before the in-place masks of sampling
    tokens = sample_on_device(logits, metadata, generator)
    return tokens, gather_logprobs(raw, tokens, metadata.max_num_logprobs)


def gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num_top: int) -> LogprobsTensors:
    """logprobs [R, vocab], tokens [R] -> the sampled tokens' log-probabilities and ranks and the `num_top` most
    likely tokens per row, all on the device (no sync)."""
    sampled = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (logprobs > sampled).sum(dim=-1) + 1
    token_ids, values = tokens.unsqueeze(1), sampled
    if num_top > 0:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        token_ids = torch.cat([token_ids, top_ids], dim=1)
        values = torch.cat([values, top_values], dim=1)
    return LogprobsTensors(token_ids, values, ranks)


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
        max_num_logprobs=max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None),
    )


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """logits: [len(rows), vocab] float32 -> one token id per row (synchronises: for tests and tools)."""
    metadata = sampling_metadata_from_rows(rows, logits.shape[-1], logits.device)
    return sample_on_device(logits, metadata).tolist()
