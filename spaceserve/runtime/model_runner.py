"""Runs one scheduled LM step: packs the sequences' new tokens, splices in image embeddings, runs the language
model over the paged KV cache and samples the next token of every sequence that reached its end."""

from __future__ import annotations

from typing import Mapping

import torch

from spaceserve.core.scheduler_output import ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from spaceserve.layers.attention import AttentionBackend, build_attention_metadata
from spaceserve.layers.sampler import SamplingRow, sample


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        device: torch.device,
    ) -> None:
        self.model = model
        self.language_model = model.language_model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor]) -> ModelRunnerOutput:
        sequences = scheduled.sequences
        if not sequences:
            return ModelRunnerOutput({})
        input_ids = [t for s in sequences for t in s.request.all_token_ids[s.num_computed_tokens : s.end]]
        input_ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions = torch.cat([_positions(s) for s in sequences], dim=1).to(self.device)
        metadata = build_attention_metadata(
            [s.num_scheduled_tokens for s in sequences],
            [s.end for s in sequences],
            [s.block_ids for s in sequences],
            self.block_size,
            self.device,
        )
        embeds = self.language_model.embed(input_ids_t)
        self._splice_image_embeddings(embeds, sequences, encoder_outputs)
        hidden = self.language_model(embeds, positions, self.kv_caches, metadata, self.backend)

        sampling, last_rows, end = [], [], 0
        for seq in sequences:
            end += seq.num_scheduled_tokens
            if seq.samples:
                sampling.append(seq)
                last_rows.append(end - 1)
        if not sampling:
            return ModelRunnerOutput({})
        logits = self.language_model.compute_logits(hidden[torch.tensor(last_rows, device=self.device)])
        tokens = sample(logits, [self._sampling_row(s) for s in sampling])
        return ModelRunnerOutput({s.request.request_id: t for s, t in zip(sampling, tokens)})

    def _splice_image_embeddings(
        self, embeds: torch.Tensor, sequences: tuple[ScheduledSequence, ...], encoder_outputs: Mapping[str, torch.Tensor]
    ) -> None:
        row = 0
        for seq in sequences:
            start, end = seq.num_computed_tokens, seq.end
            for _, feature in seq.request.mm_features_overlapping(start, end):
                span = feature.placeholder
                lo, hi = max(start, span.offset), min(end, span.end)
                rows = encoder_outputs[feature.mm_hash][lo - span.offset : hi - span.offset]
                embeds[row + lo - start : row + hi - start] = rows.to(embeds.dtype)
            row += seq.num_scheduled_tokens

    def _sampling_row(self, seq: ScheduledSequence) -> SamplingRow:
        request = seq.request
        params = request.sampling_params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = self._generators.get(request.request_id)
            if generator is None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed)
                self._generators[request.request_id] = generator
        banned: tuple[int, ...] = ()
        if request.num_output_tokens < params.min_tokens:
            eos = () if params.ignore_eos else request.eos_token_ids
            banned = tuple(eos) + params.stop_token_ids
        return SamplingRow(params, generator, banned)


def _positions(seq: ScheduledSequence) -> torch.Tensor:
    """M-RoPE positions [3, n] of the scheduled tokens: the prompt's come precomputed, generated tokens continue
    from the position delta on all three axes."""
    request = seq.request
    start, end = seq.num_computed_tokens, seq.end
    prompt_len = request.num_prompt_tokens
    parts = []
    if start < prompt_len:
        parts.append(request.mrope_positions[:, start : min(end, prompt_len)])
    if end > prompt_len:
        generated = torch.arange(max(start, prompt_len), end) + request.mrope_position_delta
        parts.append(generated.unsqueeze(0).expand(3, -1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
