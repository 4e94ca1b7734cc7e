"""Vectorised input preparation: one scheduled step -> the model's device inputs, filled with numpy into a packed
host buffer and sent in one copy (see staging.py).

Each running request keeps a row of a persistent block table, extended as its block list grows, so a decode step
touches O(batch) Python values, not O(context). Generated tokens at sequence index i have M-RoPE position
i + mrope_position_delta on all three axes; prompt tokens take the request's precomputed positions.

Decode steps that replay a CUDA graph of size G are padded to G rows: token 0, position 0, slot -1 (not
written), seq_len 0, block row 0, query_start_loc continuing by one per row.

With overlapped scheduling a decode row's input token may still be on the device (sampled by the step launched
just before, not collected yet): such a row is staged as 0 and listed in `placeholder_rows`, with the index of its
token in that step's sampled ids in `placeholder_sources`; the runner copies them over on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spaceserve.core.request import Request
from spaceserve.core.scheduler_output import ScheduledSequence, SchedulerOutput
from spaceserve.layers.attention import AttentionMetadata
from spaceserve.layers.sampler import SamplingMetadata
from spaceserve.runtime.staging import Field, StagingBuffer

DEFAULT_MAX_BANNED_IDS_PER_ROW = 64


@dataclass(frozen=True)
class ImageSplice:
    """Rows [row, row + length) of this step's embeddings come from an image's rows [source_row, ...)."""

    row: int
    length: int
    mm_hash: str
    source_row: int


@dataclass(frozen=True)
class ModelInputs:
    """Device tensors are views of the staging buffer: valid until the next step's inputs are copied in (on the
    device that is stream-ordered after this step's work)."""

    input_ids: torch.Tensor  # [padded tokens] int64
    positions: torch.Tensor  # [3, padded tokens] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [R] int64: the hidden row each sampled sequence reads
    sampling: SamplingMetadata
    sampled_request_ids: tuple[str, ...]
    image_splices: tuple[ImageSplice, ...]
    num_tokens: int
    padded_size: int | None
    """The CUDA-graph size this step is padded to, None when it runs eagerly."""
    placeholder_rows: torch.Tensor | None = None
    """[P] int64 rows of input_ids whose token is sampled_ids[placeholder_sources] of the previous step."""
    placeholder_sources: torch.Tensor | None = None


@dataclass
class _CachedRequest:
    row: int
    num_blocks: int
    first_block: int
    last_block: int
    prompt_len: int
    prompt_positions: np.ndarray | None


class InputBatch:
    def __init__(
        self,
        *,
        max_num_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        device: torch.device,
        max_banned_ids_per_row: int = DEFAULT_MAX_BANNED_IDS_PER_ROW,
    ) -> None:
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.max_banned_ids = max_num_seqs * max_banned_ids_per_row
        self.block_table = np.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._requests: dict[str, _CachedRequest] = {}
        self._generators: dict[str, torch.Generator] = {}
        largest = self._fields(max_num_tokens, max_num_seqs, max_num_seqs, self.max_banned_ids, max_num_seqs)
        self.staging = StagingBuffer(sum(-(-f.nbytes // 64) * 64 for f in largest), device)

    # ---- request state -----------------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """The request is gone: free its block-table row and its sampling generator."""
        self.forget_blocks(request_id)
        self._generators.pop(request_id, None)

    def share_generators(self, other: InputBatch) -> None:
        """Use `other`'s per-request sampling generators (a second runner over the same requests)."""
        self._generators = other._generators

    def forget_blocks(self, request_id: str) -> None:
        """The request lost its KV blocks (preempted); the row is rebuilt when it is scheduled again."""
        cached = self._requests.pop(request_id, None)
        if cached is not None:
            self._free_rows.append(cached.row)

    def _cached(self, seq: ScheduledSequence, in_step: set[str] | None) -> _CachedRequest:
        request = seq.request
        ids = seq.block_ids
        cached = self._requests.get(request.request_id)
        if cached is None:
            if not self._free_rows:
                self._drop_stale(in_step)
            row = self._free_rows.pop()
            prompt = request.mrope_positions
            positions = None if prompt is None else np.asarray(prompt.numpy() if torch.is_tensor(prompt) else prompt)
            cached = _CachedRequest(row, 0, -1, -1, request.num_prompt_tokens, positions)
            self._requests[request.request_id] = cached
        num = len(ids)
        if num == 0:
            return cached
        known = cached.num_blocks
        if known and num >= known and ids[0] == cached.first_block and ids[known - 1] == cached.last_block:
            if num > known:
                self.block_table[cached.row, known:num] = ids[known:]
        else:
            if num > self.max_blocks_per_seq:
                raise ValueError(
                    f"request {request.request_id!r} holds {num} KV blocks, more than max_model_len allows "
                    f"({self.max_blocks_per_seq})"
                )
            self.block_table[cached.row, :num] = ids
            self.block_table[cached.row, num:] = 0
        cached.num_blocks, cached.first_block, cached.last_block = num, ids[0], ids[-1]
        return cached

    def _drop_stale(self, in_step: set[str] | None) -> None:
        """No free row: requests that finished or lost their blocks without being released give theirs back."""
        keep = in_step or set()
        for request_id in [r for r in self._requests if r not in keep]:
            self.forget_blocks(request_id)
        if not self._free_rows:
            raise RuntimeError(f"more than max_num_seqs={self.max_num_seqs} sequences in one step")

    def _generator(self, request: Request) -> torch.Generator | None:
        params = request.sampling_params
        if params.seed is None or params.greedy:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            self._generators[request.request_id] = generator
        return generator

    # ---- one step ----------------------------------------------------------------------------------------

    def _fields(
        self, num_tokens: int, num_seqs: int, num_sampled: int, num_banned: int, num_placeholders: int = 0
    ) -> list[Field]:
        # the graph-read fields come first: their offsets depend only on (num_tokens, num_seqs)
        return [
            Field("input_ids", torch.int64, (num_tokens,)),
            Field("positions", torch.int64, (3, num_tokens)),
            Field("slot_mapping", torch.int64, (num_tokens,)),
            Field("query_start_loc", torch.int32, (num_seqs + 1,)),
            Field("seq_lens", torch.int32, (num_seqs,)),
            Field("block_tables", torch.int32, (num_seqs, self.max_blocks_per_seq)),
            Field("logits_indices", torch.int64, (num_sampled,)),
            Field("temperature", torch.float32, (num_sampled,)),
            Field("top_k", torch.int64, (num_sampled,)),
            Field("top_p", torch.float32, (num_sampled,)),
            Field("banned_flat_ids", torch.int64, (num_banned,)),
            Field("placeholder_rows", torch.int64, (num_placeholders,)),
            Field("placeholder_sources", torch.int64, (num_placeholders,)),
        ]

    def prepare(
        self,
        scheduled: SchedulerOutput,
        pad_to: int | None = None,
        previous_sampled_rows: Mapping[str, int] | None = None,
    ) -> ModelInputs:
        """Fill and send this step's inputs. `pad_to` pads a step of single-token rows to a CUDA-graph size.
        `previous_sampled_rows`: request id -> row of the previous step's sampled ids, for rows whose input token
        has not reached the host yet."""
        for request_id in scheduled.preempted_request_ids:
            self.forget_blocks(request_id)
        seqs = scheduled.sequences
        num_seqs = len(seqs)
        if num_seqs > self.max_num_seqs:
            raise ValueError(f"{num_seqs} sequences in one step, more than max_num_seqs={self.max_num_seqs}")
        in_step = None if len(self._free_rows) >= num_seqs else {s.request.request_id for s in seqs}

        token_ids: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        rows: list[int] = []
        deltas: list[int] = []
        prompt_spans: list[tuple[int, int, int, _CachedRequest]] = []
        image_seqs: list[int] = []
        sampled: list[int] = []
        placeholder_rows: list[int] = []
        placeholder_sources: list[int] = []
        for i, seq in enumerate(seqs):
            request = seq.request
            start, count = seq.num_computed_tokens, seq.num_scheduled_tokens
            end = start + count
            if end > len(seq.block_ids) * self.block_size:
                raise ValueError(f"request {request.request_id!r} runs to token {end} but holds too few KV blocks")
            cached = self._cached(seq, in_step)
            if count == 1 and start >= request.num_tokens:
                placeholder_rows.append(len(token_ids))
                placeholder_sources.append(self._placeholder_source(request.request_id, previous_sampled_rows))
                token_ids.append(0)
            elif count == 1:
                token_ids.append(request.all_token_ids[start])
            else:
                if end > request.num_tokens:
                    raise ValueError(f"request {request.request_id!r}: a chunk of {count} tokens runs past its known tokens")
                token_ids.extend(request.all_token_ids[start:end])
            starts.append(start)
            counts.append(count)
            rows.append(cached.row)
            deltas.append(request.mrope_position_delta)
            if start < cached.prompt_len:
                prompt_spans.append((i, start, min(end, cached.prompt_len), cached))
                if request.mm_features:
                    image_seqs.append(i)
            if seq.samples:
                sampled.append(i)

        num_tokens = len(token_ids)
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"{num_tokens} tokens in one step, more than max_num_batched_tokens={self.max_num_tokens}")
        if pad_to is not None and (num_tokens != num_seqs or pad_to < num_seqs or len(sampled) != num_seqs):
            raise ValueError(f"only a step of {num_seqs} sampled single-token rows pads to a graph of {pad_to}")
        padded_tokens = padded_seqs = num_tokens if pad_to is None else pad_to
        if pad_to is None:
            padded_seqs = num_seqs
        banned = self._banned_ids(seqs, sampled)
        num_placeholders = len(placeholder_rows)
        step = self.staging.begin(
            self._fields(padded_tokens, padded_seqs, len(sampled), len(banned), num_placeholders)
        )
        host = step.host

        counts_np = np.asarray(counts, dtype=np.int64)
        starts_np = np.asarray(starts, dtype=np.int64)
        query_start = host["query_start_loc"]
        query_start[0] = 0
        np.cumsum(counts_np, out=query_start[1 : num_seqs + 1])
        query_start[num_seqs + 1 :] = np.arange(num_tokens + 1, num_tokens + 1 + padded_seqs - num_seqs)
        if num_tokens == num_seqs:
            seq_of_token = np.arange(num_seqs)
            token_index = starts_np
        else:
            seq_of_token = np.repeat(np.arange(num_seqs), counts_np)
            token_index = np.arange(num_tokens) - query_start[seq_of_token] + starts_np[seq_of_token]

        host["input_ids"][:num_tokens] = token_ids
        host["input_ids"][num_tokens:] = 0
        positions = host["positions"]
        positions[:, :num_tokens] = token_index + np.asarray(deltas, dtype=np.int64)[seq_of_token]
        positions[:, num_tokens:] = 0
        for i, lo, hi, cached in prompt_spans:
            if cached.prompt_positions is not None:
                row = int(query_start[i])
                positions[:, row : row + hi - lo] = cached.prompt_positions[:, lo:hi]

        block_tables = host["block_tables"]
        np.take(self.block_table, np.asarray(rows, dtype=np.int64), axis=0, out=block_tables[:num_seqs])
        block_tables[num_seqs:] = 0
        slots = host["slot_mapping"]
        blocks = block_tables[seq_of_token, token_index // self.block_size]
        slots[:num_tokens] = blocks.astype(np.int64) * self.block_size + token_index % self.block_size
        slots[num_tokens:] = -1
        seq_lens = host["seq_lens"]
        seq_lens[:num_seqs] = starts_np + counts_np
        seq_lens[num_seqs:] = 0

        sampled_np = np.asarray(sampled, dtype=np.int64)
        host["logits_indices"][:] = query_start[sampled_np + 1] - 1
        all_greedy, needs_top_k_top_p, generators = self._fill_sampling(host, seqs, sampled)
        host["banned_flat_ids"][:] = banned
        host["placeholder_rows"][:] = placeholder_rows
        host["placeholder_sources"][:] = placeholder_sources

        device = step.copy()
        pad = padded_seqs - num_seqs
        metadata = AttentionMetadata(
            query_start_loc=device["query_start_loc"],
            seq_lens=device["seq_lens"],
            block_tables=device["block_tables"],
            slot_mapping=device["slot_mapping"],
            query_lens_cpu=tuple(counts) + (1,) * pad,
            seq_lens_cpu=tuple(s + c for s, c in zip(starts, counts)) + (0,) * pad,
        )
        sampling = SamplingMetadata(
            temperature=device["temperature"],
            top_k=device["top_k"],
            top_p=device["top_p"],
            banned_flat_ids=device["banned_flat_ids"],
            all_greedy=all_greedy,
            needs_top_k_top_p=needs_top_k_top_p,
            seeded_generators=generators,
            max_num_logprobs=max(
                (n for i in sampled if (n := seqs[i].request.sampling_params.logprobs) is not None), default=None
            ),
        )
        return ModelInputs(
            input_ids=device["input_ids"],
            positions=device["positions"],
            attn_metadata=metadata,
            logits_indices=device["logits_indices"],
            sampling=sampling,
            sampled_request_ids=tuple(seqs[i].request.request_id for i in sampled),
            image_splices=self._image_splices(seqs, image_seqs, query_start),
            num_tokens=num_tokens,
            padded_size=pad_to,
            placeholder_rows=device["placeholder_rows"] if num_placeholders else None,
            placeholder_sources=device["placeholder_sources"] if num_placeholders else None,
        )

    @staticmethod
    def _placeholder_source(request_id: str, previous_sampled_rows: Mapping[str, int] | None) -> int:
        row = None if previous_sampled_rows is None else previous_sampled_rows.get(request_id)
        if row is None:
            raise RuntimeError(
                f"request {request_id!r} decodes a token the previous step did not sample (overlapped scheduling "
                "out of step with the runner)"
            )
        return row

    def _banned_ids(self, seqs: tuple[ScheduledSequence, ...], sampled: list[int]) -> list[int]:
        banned: list[int] = []
        for row, i in enumerate(sampled):
            request = seqs[i].request
            params = request.sampling_params
            # outputs before the token this row samples (in-flight tokens included)
            if seqs[i].end - request.num_prompt_tokens < params.min_tokens:
                eos = () if params.ignore_eos else request.eos_token_ids
                offset = row * self.vocab_size
                banned.extend(offset + t for t in (*eos, *params.stop_token_ids) if 0 <= t < self.vocab_size)
        if len(banned) > self.max_banned_ids:
            raise ValueError(f"{len(banned)} banned token ids in one step, more than the {self.max_banned_ids} reserved")
        return banned

    def _fill_sampling(
        self, host: dict[str, np.ndarray], seqs: tuple[ScheduledSequence, ...], sampled: list[int]
    ) -> tuple[bool, bool, tuple[tuple[int, torch.Generator], ...]]:
        temperature, top_k, top_p = host["temperature"], host["top_k"], host["top_p"]
        all_greedy, needs_top_k_top_p = True, False
        generators: list[tuple[int, torch.Generator]] = []
        for row, i in enumerate(sampled):
            request = seqs[i].request
            params = request.sampling_params
            temperature[row] = params.temperature
            top_k[row] = params.top_k if params.top_k > 0 else self.vocab_size
            top_p[row] = params.top_p
            if not params.greedy:
                all_greedy = False
                needs_top_k_top_p |= params.top_k > 0 or params.top_p < 1.0
                generator = self._generator(request)
                if generator is not None:
                    generators.append((row, generator))
        return all_greedy, needs_top_k_top_p, tuple(generators)

    @staticmethod
    def _image_splices(
        seqs: tuple[ScheduledSequence, ...], image_seqs: list[int], query_start: np.ndarray
    ) -> tuple[ImageSplice, ...]:
        splices = []
        for i in image_seqs:
            seq = seqs[i]
            start, end = seq.num_computed_tokens, seq.end
            base = int(query_start[i])
            for _, feature in seq.request.mm_features_overlapping(start, end):
                span = feature.placeholder
                lo, hi = max(start, span.offset), min(end, span.end)
                splices.append(ImageSplice(base + lo - start, hi - lo, feature.mm_hash, lo - span.offset))
        return tuple(splices)
