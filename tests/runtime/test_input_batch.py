"""Vectorised input preparation equals a straightforward per-sequence reference, over random sequences of steps:
prefill chunks through images, decode rows, prefix hits, growing block lists, preemption with new blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spaceserve.core import MultiModalFeature, PlaceholderRange, Request, SamplingParams
from spaceserve.core.scheduler_output import ScheduledSequence, SchedulerOutput
from spaceserve.layers.attention import build_attention_metadata
from spaceserve.runtime.input_batch import InputBatch

BLOCK = 4
VOCAB = 97
MAX_LEN = 96


def reference_positions(seq: ScheduledSequence) -> torch.Tensor:
    request = seq.request
    columns = []
    for index in range(seq.num_computed_tokens, seq.end):
        if index < request.num_prompt_tokens:
            columns.append(request.mrope_positions[:, index])
        else:
            columns.append(torch.full((3,), index + request.mrope_position_delta, dtype=torch.int64))
    return torch.stack(columns, dim=1)


def reference_embeddings(scheduled, encoder_outputs, hidden):
    """The old runner's splice: a row per token, image rows overwritten from their encoder output."""
    total = scheduled.num_batched_tokens
    embeds = torch.zeros(total, hidden)
    row = 0
    for seq in scheduled.sequences:
        start, end = seq.num_computed_tokens, seq.end
        for _, feature in seq.request.mm_features_overlapping(start, end):
            span = feature.placeholder
            lo, hi = max(start, span.offset), min(end, span.end)
            embeds[row + lo - start : row + hi - start] = encoder_outputs[feature.mm_hash][lo - span.offset : hi - span.offset]
        row += seq.num_scheduled_tokens
    return embeds


def make_request(rng: random.Random, index: int, shared_prefix: list[int] | None = None) -> Request:
    length = rng.randint(5, 40)
    ids = [rng.randrange(VOCAB) for _ in range(length)]
    if shared_prefix:
        ids = shared_prefix + ids
    features = []
    if rng.random() < 0.6 and len(ids) > 10:
        offset = rng.randint(1, len(ids) - 8)
        span = PlaceholderRange(offset, rng.randint(2, min(12, len(ids) - offset)))
        features.append(MultiModalFeature(f"img-{index}", "image", span, span.length * 4, (1, 2, 2 * span.length)))
    positions = torch.randint(0, 1000, (3, len(ids)), generator=torch.Generator().manual_seed(index))
    params = SamplingParams(
        temperature=rng.choice([0.0, 0.7, 1.0]),
        top_k=rng.choice([-1, 5]),
        top_p=rng.choice([1.0, 0.8]),
        seed=rng.choice([None, 7]),
        min_tokens=rng.choice([0, 3]),
        stop_token_ids=tuple(rng.sample(range(VOCAB), 2)),
        max_tokens=None,
    )
    return Request(
        f"r{index}",
        ids,
        params,
        eos_token_ids=(VOCAB - 1,),
        mm_features=features,
        mrope_positions=positions,
        mrope_position_delta=rng.randint(-20, 20),
    )


class Simulation:
    """Just enough of a scheduler: requests advance by random chunks, blocks come from a shuffled pool."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.free_blocks = list(range(1, 400))
        rng.shuffle(self.free_blocks)
        self.blocks: dict[str, list[int]] = {}
        self.requests: dict[str, Request] = {}
        self.count = 0

    def add(self) -> None:
        prefix = None
        donors = [r for r in self.requests.values() if r.num_computed_tokens >= 2 * BLOCK]
        if donors and self.rng.random() < 0.3:
            donor = self.rng.choice(donors)
            num = BLOCK * self.rng.randint(1, donor.num_computed_tokens // BLOCK)
            prefix = donor.all_token_ids[:num]
        request = make_request(self.rng, self.count, prefix)
        self.count += 1
        self.blocks[request.request_id] = []
        if prefix:  # a prefix hit: the donor's blocks, already computed
            request.num_computed_tokens = len(prefix)
            self.blocks[request.request_id] = list(self.blocks[donor.request_id][: len(prefix) // BLOCK])
        self.requests[request.request_id] = request

    def step(self, batch: InputBatch) -> SchedulerOutput:
        preempted = []
        if len(self.requests) > 2 and self.rng.random() < 0.15:
            victim = self.rng.choice(list(self.requests.values()))
            victim.num_computed_tokens = 0
            self.blocks[victim.request_id] = []
            preempted.append(victim.request_id)
        sequences = []
        for request in self.rng.sample(list(self.requests.values()), k=min(len(self.requests), 6)):
            if request.request_id in preempted:
                continue
            start = request.num_computed_tokens
            if start == request.num_tokens:
                request.append_output_token(self.rng.randrange(VOCAB))
            remaining = request.num_tokens - start
            count = remaining if remaining == 1 else self.rng.randint(1, remaining)
            blocks = self.blocks[request.request_id]
            while len(blocks) * BLOCK < start + count:
                blocks.append(self.free_blocks.pop())
            sequences.append(ScheduledSequence(request, start, count, tuple(blocks), start + count == request.num_tokens))
        return SchedulerOutput(tuple(sequences), tuple(preempted))

    def advance(self, scheduled: SchedulerOutput, batch: InputBatch) -> None:
        for seq in scheduled.sequences:
            seq.request.num_computed_tokens = seq.end
            if seq.request.num_tokens > 70:
                del self.requests[seq.request.request_id]
                batch.release(seq.request.request_id)


def check_step(batch: InputBatch, scheduled: SchedulerOutput, rng: random.Random) -> None:
    inputs = batch.prepare(scheduled)
    seqs = scheduled.sequences
    expected_ids = [t for s in seqs for t in s.request.all_token_ids[s.num_computed_tokens : s.end]]
    assert inputs.input_ids.tolist() == expected_ids
    assert torch.equal(inputs.positions, torch.cat([reference_positions(s) for s in seqs], dim=1))

    reference = build_attention_metadata(
        [s.num_scheduled_tokens for s in seqs], [s.end for s in seqs], [s.block_ids for s in seqs], BLOCK, torch.device("cpu")
    )
    metadata = inputs.attn_metadata
    assert torch.equal(metadata.query_start_loc, reference.query_start_loc)
    assert torch.equal(metadata.seq_lens, reference.seq_lens)
    assert torch.equal(metadata.slot_mapping, reference.slot_mapping)
    width = reference.block_tables.shape[1]
    assert torch.equal(metadata.block_tables[:, :width], reference.block_tables)
    assert not metadata.block_tables[:, width:].any()
    assert metadata.query_lens_cpu == reference.query_lens_cpu and metadata.seq_lens_cpu == reference.seq_lens_cpu

    sampled = [i for i, s in enumerate(seqs) if s.samples]
    ends = np.cumsum([s.num_scheduled_tokens for s in seqs])
    assert inputs.logits_indices.tolist() == [int(ends[i]) - 1 for i in sampled]
    assert inputs.sampled_request_ids == tuple(seqs[i].request.request_id for i in sampled)
    params = [seqs[i].request.sampling_params for i in sampled]
    assert inputs.sampling.temperature.tolist() == pytest.approx([p.temperature for p in params])
    assert inputs.sampling.top_k.tolist() == [p.top_k if p.top_k > 0 else VOCAB for p in params]
    banned = sorted(
        row * VOCAB + t
        for row, i in enumerate(sampled)
        if seqs[i].request.num_output_tokens < seqs[i].request.sampling_params.min_tokens
        for t in (*seqs[i].request.eos_token_ids, *seqs[i].request.sampling_params.stop_token_ids)
    )
    assert sorted(inputs.sampling.banned_flat_ids.tolist()) == banned

    hidden = 3
    outputs = {
        f.mm_hash: torch.randn(f.placeholder.length, hidden) for s in seqs for f in s.request.mm_features
    }
    embeds = torch.zeros(inputs.num_tokens, hidden)
    for splice in inputs.image_splices:
        embeds[splice.row : splice.row + splice.length] = outputs[splice.mm_hash][splice.source_row : splice.source_row + splice.length]
    assert torch.equal(embeds, reference_embeddings(scheduled, outputs, hidden))


@pytest.mark.parametrize("seed", range(4))
def test_prepared_inputs_match_the_reference_over_random_steps(seed):
    rng = random.Random(seed)
    batch = InputBatch(
        max_num_tokens=512, max_num_seqs=16, max_model_len=MAX_LEN, block_size=BLOCK, vocab_size=VOCAB,
        device=torch.device("cpu"),
    )
    sim = Simulation(rng)
    images_seen = 0
    for _ in range(60):
        while len(sim.requests) < 8:
            sim.add()
        scheduled = sim.step(batch)
        images_seen += sum(1 for s in scheduled.sequences if s.request.mm_features_overlapping(s.num_computed_tokens, s.end))
        check_step(batch, scheduled, rng)
        sim.advance(scheduled, batch)
    assert images_seen > 0


def test_decode_steps_pad_to_the_graph_size():
    rng = random.Random(5)
    batch = InputBatch(
        max_num_tokens=64, max_num_seqs=16, max_model_len=MAX_LEN, block_size=BLOCK, vocab_size=VOCAB,
        device=torch.device("cpu"),
    )
    sequences = []
    for i in range(5):
        request = make_request(rng, i)
        request.num_computed_tokens = request.num_prompt_tokens
        request.append_output_token(rng.randrange(VOCAB))
        blocks = tuple(rng.sample(range(1, 300), -(-request.num_tokens // BLOCK)))
        sequences.append(ScheduledSequence(request, request.num_tokens - 1, 1, blocks, True))
    scheduled = SchedulerOutput(tuple(sequences))
    eager = batch.prepare(scheduled)
    eager_positions = eager.positions.clone()  # device views of the staging buffer: the next step overwrites them
    eager_ids, eager_slots = eager.input_ids.clone(), eager.attn_metadata.slot_mapping.clone()
    eager_seq_lens, eager_tables = eager.attn_metadata.seq_lens.clone(), eager.attn_metadata.block_tables.clone()
    graphed = batch.prepare(scheduled, pad_to=8)
    assert graphed.padded_size == 8 and graphed.input_ids.shape == (8,)
    assert torch.equal(graphed.input_ids[:5], eager_ids) and not graphed.input_ids[5:].any()
    assert torch.equal(graphed.positions[:, :5], eager_positions) and not graphed.positions[:, 5:].any()
    assert torch.equal(graphed.attn_metadata.slot_mapping[:5], eager_slots)
    assert graphed.attn_metadata.slot_mapping[5:].tolist() == [-1] * 3
    assert graphed.attn_metadata.query_start_loc.tolist() == list(range(9))
    assert graphed.attn_metadata.seq_lens[5:].tolist() == [0] * 3
    assert torch.equal(graphed.attn_metadata.seq_lens[:5], eager_seq_lens)
    assert torch.equal(graphed.attn_metadata.block_tables[:5], eager_tables)
    assert not graphed.attn_metadata.block_tables[5:].any()
    assert graphed.attn_metadata.query_lens_cpu == (1,) * 8
    with pytest.raises(ValueError, match="pads to a graph"):
        batch.prepare(scheduled, pad_to=4)


def test_too_few_blocks_is_a_clear_error():
    batch = InputBatch(
        max_num_tokens=64, max_num_seqs=4, max_model_len=MAX_LEN, block_size=BLOCK, vocab_size=VOCAB,
        device=torch.device("cpu"),
    )
    request = make_request(random.Random(0), 0)
    with pytest.raises(ValueError, match="too few KV blocks"):
        batch.prepare(SchedulerOutput((ScheduledSequence(request, 0, request.num_tokens, (1,), True),)))
