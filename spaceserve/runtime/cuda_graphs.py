"""Decode steps as CUDA graphs: the language model's forward (embed -> layers -> final norm -> logits) captured
once per batch size of a ladder, largest first, into one memory pool, on the stream the runner replays them on.

The graphs read the staging buffer's device fields at the addresses a padded decode step of their size uses
(see input_batch.py) and write logits into one persistent buffer, so a replay needs no copy in or out. A decode
batch of b rows replays the smallest captured size >= b.
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch

from spaceserve.core.scheduler_output import SchedulerOutput
from spaceserve.runtime.input_batch import InputBatch, ModelInputs

# forward(inputs) -> logits [padded rows, vocab] float32
DecodeForward = Callable[[ModelInputs], torch.Tensor]

_WARMUP_RUNS = 2


def cuda_graph_batch_sizes(max_num_seqs: int, sizes: tuple[int, ...] | None = None, limit: int = 512) -> tuple[int, ...]:
    """The ladder to capture: `sizes` when given, else 1, 2, 4 and multiples of 8 up to min(max_num_seqs, limit)."""
    top = min(max_num_seqs, limit)
    if sizes is None:
        ladder = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    else:
        if any(s < 1 for s in sizes):
            raise ValueError(f"cuda_graph_sizes must be positive, got {sizes}")
        ladder = [s for s in sizes if s <= max_num_seqs]
    return tuple(sorted(set(ladder)))


def is_graphable(scheduled: SchedulerOutput) -> bool:
    """A pure decode step: every row one new token that is sampled, and no image rows."""
    for seq in scheduled.sequences:
        if seq.num_scheduled_tokens != 1 or not seq.samples:
            return False
        if seq.request.mm_features and seq.num_computed_tokens < seq.request.num_prompt_tokens:
            return False
    return bool(scheduled.sequences)


class DecodeCUDAGraphs:
    def __init__(
        self,
        forward: DecodeForward,
        input_batch: InputBatch,
        sizes: tuple[int, ...],
        vocab_size: int,
        stream: torch.cuda.Stream,
    ) -> None:
        if not sizes:
            raise ValueError("no CUDA-graph sizes to capture")
        self.forward = forward
        self.input_batch = input_batch
        self.sizes = tuple(sorted(sizes))
        self.stream = stream
        device = input_batch.device
        self.logits = torch.empty(self.sizes[-1], vocab_size, dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_seqs: int) -> int | None:
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every size, largest first so smaller graphs reuse the pool's blocks."""
        with torch.cuda.stream(self.stream):
            for size in reversed(self.sizes):
                inputs = self.input_batch.prepare(SchedulerOutput(()), pad_to=size)
                for _ in range(_WARMUP_RUNS):
                    self.logits[:size].copy_(self.forward(inputs))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    self.logits[:size].copy_(self.forward(inputs))
                self._graphs[size] = graph
        self.stream.synchronize()

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of `size` on the current stream (the runner's); its inputs must already be staged."""
        self._graphs[size].replay()
        return self.logits[:size]
