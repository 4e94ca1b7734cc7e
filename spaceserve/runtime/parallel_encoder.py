"""The vision tower across tensor-parallel ranks, so that every rank ends an encoder batch holding every item's
embeddings.

Rank 0's engine calls `DriverEncoderRunner.execute(batch)` exactly where it calls `EncoderRunner.execute` (inside
the step in `time`, from the encoder worker thread in the concurrent modes). It sends the batch's description (an
ENCODE message: hashes, grids, token counts, the encoder stream to use), broadcasts the pixels on the encoder
group, and then every rank runs `TensorParallelEncoder.encode`:

- weights: the whole batch through its shard of the tower; the row-parallel all-reduces inside leave the whole
  embeddings on every rank.
- data: the items are shared out by patches, longest first, each to the least loaded rank (the same rule on
  every rank, so no assignment travels); a rank encodes its share with its whole copy of the tower and one
  all-gather, padded to the largest share, gives every rank every item.

Ranks other than 0 keep the embeddings in `ReplicatedEmbeddings` (by mm_hash, with the batch's generation number
and its CUDA event); their LM steps splice from it, waiting on the event on the LM stream. Rank 0 keeps its own in
the encoder stage's EmbeddingStore as always, and tells the others in the step messages what it dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.parallel_state import GroupCoordinator

ItemMeta = tuple[str, int, int, int, int]
"""(mm_hash, t, h, w, num_tokens) of one item of an encoder batch."""


def assign_items(num_patches: Sequence[int], world_size: int) -> list[int]:
    """The rank that encodes each item: longest first, each to the least loaded rank (lowest rank on ties)."""
    loads = [(0, rank) for rank in range(world_size)]
    owners = [0] * len(num_patches)
    for index in sorted(range(len(num_patches)), key=lambda i: (-num_patches[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + num_patches[index], rank))
    return owners


def encoder_streams(layout: ExecutionLayout) -> list[torch.cuda.Stream | None]:
    """The streams an encoder batch may run on, in an order every rank's layout shares (an index travels)."""
    return [layout.encoder_stream, layout.encoder_full_stream, *(p.encoder_stream for p in layout.partitions)]


class TensorParallelEncoder:
    """What every rank runs for one encoder batch (rank 0 from `DriverEncoderRunner`, the others from worker.py)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, group: GroupCoordinator, mode: str) -> None:
        self.model = model
        self.device = device
        self.group = group
        self.mode = mode
        vision = model.config.vision
        self.patch_dim = vision.patch_dim
        self.out_dim = vision.out_hidden_size

    @torch.inference_mode()
    def encode(self, items: Sequence[ItemMeta], pixels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`pixels`: the batch's patches on rank 0 (broadcast from there), None elsewhere (received)."""
        num_patches = [t * h * w for _, t, h, w, _ in items]
        if pixels is None:
            pixels = torch.empty(sum(num_patches), self.patch_dim, dtype=self.model.visual_dtype, device=self.device)
        self.group.broadcast(pixels, src=0)
        tokens = [item[4] for item in items]
        if self.mode == "weights" or self.group.world_size == 1:
            rows = self._run([item[1:4] for item in items], pixels).split(tokens)
            return {item[0]: row for item, row in zip(items, rows)}
        return self._encode_share(items, pixels, num_patches, tokens)

    def _run(self, grids: Sequence[tuple[int, int, int]], pixels: torch.Tensor) -> torch.Tensor:
        grid_thw = torch.tensor(grids, dtype=torch.long)  # on the host: the towers read it there
        return self.model.encode_images(pixels, grid_thw)

    def _encode_share(self, items, pixels, num_patches, tokens) -> dict[str, torch.Tensor]:
        world, rank = self.group.world_size, self.group.rank
        owners = assign_items(num_patches, world)
        starts = [0]
        for count in num_patches:
            starts.append(starts[-1] + count)
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        share_tokens = [sum(tokens[i] for i, owner in enumerate(owners) if owner == r) for r in range(world)]
        padded = max(share_tokens)
        local = torch.zeros(padded, self.out_dim, dtype=self.model.visual_dtype, device=self.device)
        if mine:
            share = torch.cat([pixels[starts[i] : starts[i + 1]] for i in mine])
            embeddings = self._run([items[i][1:4] for i in mine], share)
            local[: embeddings.shape[0]] = embeddings.to(local.dtype)
        gathered = self.group.all_gather(local, dim=0).view(world, padded, self.out_dim)
        outputs, offsets = {}, [0] * world
        for i, owner in enumerate(owners):
            outputs[items[i][0]] = gathered[owner, offsets[owner] : offsets[owner] + tokens[i]]
            offsets[owner] += tokens[i]
        return outputs


class DriverEncoderRunner(EncoderRunner):
    """Rank 0's side, with EncoderRunner's interface (and its preprocessing of raw images on the device):
    `execute(batch) -> {mm_hash: rows}`. `announce(items, stream)` sends the batch's ENCODE message to the other
    ranks (the executor owns the queue)."""

    def __init__(
        self,
        encoder: TensorParallelEncoder,
        layout: ExecutionLayout,
        announce: Callable[[list[ItemMeta], int], None],
        image_config: ImageProcessorConfig,
    ) -> None:
        super().__init__(encoder.model, encoder.device, image_config)
        self.encoder = encoder
        self._streams = encoder_streams(layout)
        self._announce = announce

    @torch.inference_mode()
    def execute(self, batch: EncoderBatch) -> dict[str, torch.Tensor]:
        items = [(item.mm_hash, *item.grid_thw, item.num_tokens) for item in batch.items]
        dtype = self.model.visual_dtype
        pixels = torch.cat(
            [self._patches(item.pixel_values).to(self.device, dtype=dtype, non_blocking=True) for item in batch.items]
        )
        self._announce(items, self._stream_index())
        return self.encoder.encode(items, pixels)

    def _stream_index(self) -> int:
        if self.device.type != "cuda":
            return -1
        current = torch.cuda.current_stream(self.device)
        for index, stream in enumerate(self._streams):
            if stream is not None and stream == current:
                return index
        return -1


@dataclass
class _Stored:
    generation: int
    rows: torch.Tensor
    ready: torch.cuda.Event | None


class ReplicatedEmbeddings:
    """A non-zero rank's copy of the embeddings rank 0's encoder stage holds, by mm_hash. A hash encoded again replaces
    the old rows; a drop names the generation it drops, so a drop that arrives after a re-encode leaves the new
    rows alone."""

    def __init__(self) -> None:
        self._entries: dict[str, _Stored] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, embeddings: dict[str, torch.Tensor], generation: int, ready: torch.cuda.Event | None) -> None:
        for mm_hash, rows in embeddings.items():
            self._entries[mm_hash] = _Stored(generation, rows, ready)

    def drop(self, mm_hash: str, generation: int) -> None:
        entry = self._entries.get(mm_hash)
        if entry is not None and entry.generation == generation:
            del self._entries[mm_hash]

    def rows_for(self, mm_hash: str, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """The rows, safe to read on `stream`: it waits for the batch that made them, and the allocator will not
        reuse their memory before `stream`'s work on them is done."""
        entry = self._entries.get(mm_hash)
        if entry is None:
            raise RuntimeError(f"rank holds no embeddings for image {mm_hash!r}: its encoder batch never arrived")
        if stream is not None and entry.ready is not None:
            stream.wait_event(entry.ready)
            entry.rows.record_stream(stream)
        return entry.rows
