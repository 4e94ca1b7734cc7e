"""The step message is the contract between rank 0 and the other tensor-parallel ranks: from rank 0's packed staging
bytes and header another rank rebuilds exactly rank 0's ModelInputs (over random steps: prefill chunks through
images, decode rows, prefix hits, preemption, seeded rows, overlapped scheduling's placeholder rows). The
shared-memory queue delivers messages in order through its ring and refuses to wait forever for a reader; the data
split of the vision tower shares items out by patches, the same on every rank."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spaceserve.core.scheduler_output import ScheduledSequence, SchedulerOutput
from spaceserve.runtime.input_batch import InputBatch, ModelInputs
from spaceserve.runtime.parallel_encoder import assign_items
from spaceserve.runtime.shm_broadcast import MessageQueue, PeerDiedError
from spaceserve.runtime.step_message import MessageKind, decode_message, encode_message, inputs_from_step, step_message
from tests.runtime.test_input_batch import BLOCK, MAX_LEN, VOCAB, Simulation

CPU = torch.device("cpu")


def _batch() -> InputBatch:
    return InputBatch(max_num_tokens=256, max_num_seqs=8, max_model_len=MAX_LEN, block_size=BLOCK, vocab_size=VOCAB, device=CPU)


def _through_bytes(parts) -> np.ndarray:
    return np.concatenate([np.frombuffer(p, dtype=np.uint8) if isinstance(p, bytes) else p.view(np.uint8) for p in parts])


def _rebuild(rank0: InputBatch, inputs: ModelInputs, rank1: InputBatch, generators: dict) -> ModelInputs:
    parts = step_message(inputs, rank0.staging.last_step.packed_bytes(), stream=2, extras={"released": ["gone"]})
    message = decode_message(_through_bytes(parts))
    assert message.kind is MessageKind.STEP and message["stream"] == 2 and message.extras["released"] == ["gone"]
    for _, request_id, seed in message.extras.get("seeded", ()):
        generators.setdefault(request_id, torch.Generator().manual_seed(seed))
    return inputs_from_step(message, rank1, generators)


def _assert_same(ours: ModelInputs, theirs: ModelInputs) -> None:
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        assert torch.equal(getattr(ours.attn_metadata, name), getattr(theirs.attn_metadata, name)), name
    assert ours.attn_metadata.query_lens_cpu == theirs.attn_metadata.query_lens_cpu
    assert ours.attn_metadata.seq_lens_cpu == theirs.attn_metadata.seq_lens_cpu
    for name in ("temperature", "top_k", "top_p", "banned_flat_ids"):
        assert torch.equal(getattr(ours.sampling, name), getattr(theirs.sampling, name)), name
    assert (ours.sampling.all_greedy, ours.sampling.needs_top_k_top_p) == (
        theirs.sampling.all_greedy, theirs.sampling.needs_top_k_top_p
    )
    assert [row for row, _ in ours.sampling.seeded_generators] == [row for row, _ in theirs.sampling.seeded_generators]
    for (_, mine), (_, copy) in zip(ours.sampling.seeded_generators, theirs.sampling.seeded_generators):
        assert torch.equal(mine.get_state(), copy.get_state())  # the same draws from here on
    assert ours.image_splices == theirs.image_splices
    assert (ours.num_tokens, ours.padded_size) == (theirs.num_tokens, theirs.padded_size)
    assert len(ours.sampled_request_ids) == len(theirs.sampled_request_ids)
    for name in ("placeholder_rows", "placeholder_sources"):
        mine, copy = getattr(ours, name), getattr(theirs, name)
        assert (mine is None) == (copy is None) and (mine is None or torch.equal(mine, copy)), name


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_rank_rebuilds_rank_0s_inputs_from_the_step_message(seed):
    rng = random.Random(seed)
    simulation, rank0, rank1, generators = Simulation(rng), _batch(), _batch(), {}
    seen_images = seen_seeded = 0
    for _ in range(40):
        if len(simulation.requests) < 6 and rng.random() < 0.5:
            simulation.add()
        scheduled = simulation.step(rank0)
        if not scheduled.sequences:
            continue
        inputs = rank0.prepare(scheduled)
        _assert_same(inputs, _rebuild(rank0, inputs, rank1, generators))
        seen_images += bool(inputs.image_splices)
        seen_seeded += bool(inputs.sampling.seeded_generators)
        simulation.advance(scheduled, rank0)
    assert seen_images and seen_seeded


def test_placeholder_rows_and_graph_padding_travel():
    rng = random.Random(5)
    simulation, rank0, rank1 = Simulation(rng), _batch(), _batch()
    for _ in range(3):
        simulation.add()
    requests = list(simulation.requests.values())
    for request in requests:
        request.num_computed_tokens = request.num_tokens  # prefilled; their next input is still on the device
    sequences = []
    for request in requests:
        blocks = list(range(1 + 30 * len(sequences), 1 + 30 * len(sequences) + (request.num_tokens + BLOCK) // BLOCK))
        sequences.append(ScheduledSequence(request, request.num_tokens, 1, tuple(blocks), True))
    previous = {request.request_id: row for row, request in enumerate(reversed(requests))}
    inputs = rank0.prepare(SchedulerOutput(tuple(sequences)), pad_to=4, previous_sampled_rows=previous)
    assert inputs.placeholder_rows is not None and inputs.padded_size == 4
    _assert_same(inputs, _rebuild(rank0, inputs, rank1, {}))


def test_the_queue_delivers_in_order_and_refuses_to_wait_forever():
    queue = MessageQueue.create(num_readers=1, slot_bytes=4096, num_slots=3)
    reader = MessageQueue.attach(queue.handle, 0)
    try:
        rng = np.random.default_rng(0)
        sent = [rng.integers(0, 255, int(rng.integers(1, 4000)), dtype=np.uint8) for _ in range(10)]
        for index, payload in enumerate(sent):  # more messages than slots: each slot is reused after its read
            queue.write([encode_message(MessageKind.RPC, extras={"i": index})[0], payload], 1.0, lambda: None)
            raw = reader.read(1.0)
            assert raw is not None and np.array_equal(raw[128:], payload)
            reader.ack()
        assert reader.read(0.01) is None  # nothing more was sent
        for _ in range(3):
            queue.write([sent[0]], 1.0, lambda: None)  # the reader falls three behind: every slot is taken
        with pytest.raises(PeerDiedError, match="has not read"):
            queue.write([sent[1]], 0.05, lambda: None)

        def dead() -> None:
            raise RuntimeError("rank 1 is dead")

        with pytest.raises(RuntimeError, match="rank 1 is dead"):
            queue.write([sent[1]], 5.0, dead)
        assert reader.read(1.0) is not None
        reader.ack()  # a slot is free again, but a message larger than a slot is refused
        with pytest.raises(ValueError, match="does not fit a slot"):
            queue.write([np.zeros(5000, dtype=np.uint8)], 1.0, lambda: None)
    finally:
        reader.close()
        queue.close()


def test_the_data_split_shares_images_by_patches_alike_on_every_rank():
    patches = [64, 1024, 256, 256, 16, 900, 100]
    owners = assign_items(patches, 3)
    assert owners == assign_items(patches, 3)
    loads = [sum(p for p, owner in zip(patches, owners) if owner == rank) for rank in range(3)]
    assert max(loads) - min(loads) <= max(patches) and sorted(set(owners)) == [0, 1, 2]
    assert assign_items([5], 4) == [0] and assign_items([], 2) == []
