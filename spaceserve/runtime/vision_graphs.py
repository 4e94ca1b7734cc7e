"""The vision encoder as CUDA graphs: the tower's forward captured once per padded patch-count bucket of a ladder,
so a batch of any mix of images and video frames replays one graph instead of launching ~300 kernels.

Each graph reads fixed device buffers: the pixel rows (one buffer per stream, sized for the largest bucket) and its
bucket's metadata buffer (positions, frame and window segments, the Triton work lists with their counts, the window
order and its inverse: vision_inputs.bucket_spec). Before a replay the host packs the batch's layout, padded to the
bucket (vision_layout.py: padding rows form segments of their own and are dropped after the merger), into a pinned
buffer with vectorised numpy and copies it over once; the Triton kernels run a fixed grid and read the valid work
count from the buffer. A batch larger than the largest bucket runs eagerly.

A graph runs on the SMs of the stream it was captured on, so there is one graph set per stream the encoder runs on
(as runtime/cuda_graphs.py keeps one decode set per LM stream); `for_stream` picks the set of the current stream.
Sets on different streams have their own buffers and pools, so they never share memory that another stream's
replay could be writing. Within a set, batches follow each other in stream order; the only host-side state, the
pinned metadata buffer, is double-buffered and reused only once the copy out of it has completed, and each batch's
embeddings are cloned out of the graph's output before the next replay can overwrite it.

Capture goes through an injectable `GraphCapture`: CUDA graphs on a GPU; `eager_replay` in CPU tests, whose "graph"
re-runs the captured callable over the same fixed buffers, so everything but the CUDA graph itself is exercised.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.models.vision_common import VisionTower, check_vision_grids
from spaceserve.models.vision_inputs import StagingSpec, bucket_spec, pack, view_inputs

BUCKET_GRANULE = 256
"""Ladder buckets are multiples of this many patches (so also of merge**2 and of the padding segments)."""
MIN_BUCKET_PATCHES = 256
STEPS_PER_OCTAVE = 4
"""Buckets grow by 2**(1/4): a batch pads by at most ~19% of its patches."""


def vision_graph_buckets(budget_tokens: int, merge: int, patches: Sequence[int] | None = None) -> tuple[int, ...]:
    """The patch-count buckets to capture: `patches` when given, else a geometric ladder (ratio 2**(1/4), multiples
    of 256) from 256 up to the encoder budget, budget_tokens * merge**2 patches, which is always a bucket."""
    unit = merge * merge
    if patches is not None:
        if not patches or any(p < unit or p % unit for p in patches):
            raise ConfigError(f"vision CUDA-graph buckets must be positive multiples of {unit} patches, got {patches}")
        return tuple(sorted(set(int(p) for p in patches)))
    top = budget_tokens * unit
    ladder = {top}
    size = MIN_BUCKET_PATCHES
    step = 0
    while size < top:
        ladder.add(size)
        step += 1
        size = BUCKET_GRANULE * math.ceil(MIN_BUCKET_PATCHES * 2 ** (step / STEPS_PER_OCTAVE) / BUCKET_GRANULE)
    return tuple(sorted(ladder))


class CapturedForward(Protocol):
    def replay(self) -> torch.Tensor:
        """Run the captured forward over its buffers' current contents; returns its output tensor."""
        ...


GraphCapture = Callable[[Callable[[], torch.Tensor], "torch.cuda.Stream | None", object], CapturedForward]
"""(forward, stream, pool) -> its captured replay. The forward has already run once (warm-up) on the stream."""


class _CudaGraphForward:
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor) -> None:
        self.graph = graph
        self.output = output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def cuda_graph_capture(forward: Callable[[], torch.Tensor], stream: torch.cuda.Stream | None, pool: object) -> CapturedForward:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        output = forward()
    return _CudaGraphForward(graph, output)


class _EagerForward:
    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        self.forward = forward

    def replay(self) -> torch.Tensor:
        return self.forward()


def eager_replay(forward: Callable[[], torch.Tensor], stream: torch.cuda.Stream | None, pool: object) -> CapturedForward:
    """A stand-in for CUDA graphs (CPU tests): replaying re-runs the forward over the same fixed buffers."""
    return _EagerForward(forward)


@dataclass
class _Bucket:
    spec: StagingSpec
    metadata: torch.Tensor  # the device buffer the graph reads
    forward: CapturedForward | None = None


class VisionGraphSet:
    """The graphs of one stream: a pixel buffer for the largest bucket, and per bucket a metadata buffer and the
    captured forward over both."""

    def __init__(
        self,
        tower: VisionTower,
        buckets: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        stream: torch.cuda.Stream | None,
        use_triton: bool,
    ) -> None:
        self.tower = tower
        self.buckets = tuple(sorted(buckets))
        self.device = device
        self.stream = stream
        config = tower.config
        self.unit = config.spatial_merge_size**2
        self.pixels = torch.zeros(self.buckets[-1], config.patch_dim, dtype=dtype, device=device)
        self._buckets: dict[int, _Bucket] = {}
        for size in self.buckets:
            spec = bucket_spec(size, self.unit, tower.max_window_rows, use_triton)
            self._buckets[size] = _Bucket(spec, torch.zeros(spec.size, dtype=torch.int32, device=device))
        largest = max(b.spec.size for b in self._buckets.values())
        pin = device.type == "cuda"
        self._host = [torch.zeros(largest, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._host_copied: list[torch.cuda.Event | None] = [None, None]
        self._next_host = 0

    def bucket_for(self, num_patches: int) -> int | None:
        index = bisect.bisect_left(self.buckets, num_patches)
        return self.buckets[index] if index < len(self.buckets) else None

    @torch.inference_mode()
    def capture(self, capture: GraphCapture, pool: object) -> None:
        """Warm up and capture every bucket, largest first so smaller graphs reuse the pool's blocks. The batch
        captured is all padding (any valid metadata does: the graph's launches do not depend on it)."""
        for size in reversed(self.buckets):
            bucket = self._buckets[size]
            self._stage(self.tower.layout(np.zeros((0, 3), dtype=np.int64), num_rows=size), bucket)
            inputs = view_inputs(bucket.metadata, bucket.spec)
            pixels = self.pixels[:size]

            def forward(pixels=pixels, inputs=inputs) -> torch.Tensor:
                return self.tower.forward_prepared(pixels, inputs)

            forward()  # compiles the Triton kernels, sets up cuBLAS for this stream, outside the capture
            bucket.forward = capture(forward, self.stream, pool)

    @torch.inference_mode()
    def run(self, size: int, pixel_values: Sequence[torch.Tensor], grids: np.ndarray) -> torch.Tensor:
        """Replay bucket `size` for items with these pixel rows and grids (checked by the caller) on the current
        stream, which must be this set's; returns the real embedding rows, [tokens, out_hidden_size], a new tensor."""
        bucket = self._buckets[size]
        layout = self.tower.layout(grids, num_rows=size)
        self._stage(layout, bucket)
        offset = 0
        for rows in pixel_values:
            self.pixels[offset : offset + rows.shape[0]].copy_(rows, non_blocking=True)
            offset += rows.shape[0]
        return bucket.forward.replay()[: layout.num_tokens].clone()

    def _stage(self, layout, bucket: _Bucket) -> None:
        """Pack the layout into the next pinned buffer (once the copy out of it has completed) and copy it into
        the bucket's device buffer, on the current stream."""
        index = self._next_host
        self._next_host = 1 - index
        copied = self._host_copied[index]
        if copied is not None:
            copied.synchronize()
        host = self._host[index][: bucket.spec.size]
        pack(layout, bucket.spec, host.numpy())
        bucket.metadata.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._host_copied[index] = event


class VisionCUDAGraphs:
    """One VisionGraphSet per stream the encoder runs on. `capture_on` measures the device memory each set holds
    (its buffers and its graphs' pool), which the memory plan reserves."""

    def __init__(
        self,
        tower: VisionTower,
        buckets: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        capture: GraphCapture = cuda_graph_capture,
        use_triton: bool | None = None,
    ) -> None:
        if not buckets:
            raise ValueError("no vision CUDA-graph buckets to capture")
        from spaceserve.layers.attention.varlen import default_use_triton

        self.tower = tower
        self.buckets = tuple(sorted(buckets))
        self.device = torch.device(device)
        self.dtype = dtype
        self.capture = capture
        self.use_triton = default_use_triton(self.device) if use_triton is None else use_triton
        # keyed by the raw stream handle: torch.cuda.current_stream() gives a new object for the same stream
        self._sets: dict[int | None, VisionGraphSet] = {}
        self._memory: dict[int | None, int] = {}

    @property
    def max_patches(self) -> int:
        return self.buckets[-1]

    @property
    def total_memory_bytes(self) -> int:
        return sum(self._memory.values())

    def memory_bytes(self, stream: torch.cuda.Stream | None) -> int:
        """What the set captured on `stream` holds on the device (its buffers and its graphs' pool)."""
        return self._memory[_key(stream)]

    def capture_on(self, streams: Sequence[torch.cuda.Stream | None]) -> None:
        """Capture a set on each stream (None: no stream, CPU tests) not captured yet."""
        on_cuda = self.device.type == "cuda"
        for stream in streams:
            key = _key(stream)
            if key in self._sets:
                continue
            if on_cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()  # cached blocks of earlier work would hide what the capture reserves
                before = torch.cuda.memory_reserved(self.device)
            graph_set = VisionGraphSet(self.tower, self.buckets, self.device, self.dtype, stream, self.use_triton)
            pool = torch.cuda.graph_pool_handle() if on_cuda else None
            if stream is not None:
                with torch.cuda.stream(stream):
                    graph_set.capture(self.capture, pool)
                stream.synchronize()
            else:
                graph_set.capture(self.capture, pool)
            self._sets[key] = graph_set
            if on_cuda:
                torch.cuda.empty_cache()  # the warm-ups' blocks; the graphs' pool and the buffers stay
                self._memory[key] = max(torch.cuda.memory_reserved(self.device) - before, 0)
            else:
                self._memory[key] = 0

    def for_stream(self, stream: torch.cuda.Stream | None) -> VisionGraphSet | None:
        return self._sets.get(_key(stream))

    def streams(self) -> tuple[torch.cuda.Stream | None, ...]:
        return tuple(graph_set.stream for graph_set in self._sets.values())


def _key(stream: torch.cuda.Stream | None) -> int | None:
    return None if stream is None else int(stream.cuda_stream)


def check_item_pixels(pixel_values: Sequence[torch.Tensor], grids: np.ndarray, patch_dim: int) -> None:
    """Each item's pixel rows against its grid (the eager tower checks the concatenation the same way)."""
    for rows, (t, h, w) in zip(pixel_values, grids.tolist()):
        if tuple(rows.shape) != (t * h * w, patch_dim):
            raise InvalidInputError(f"pixel_values has shape {tuple(rows.shape)}, grid ({t}, {h}, {w}) implies "
                                    f"{(t * h * w, patch_dim)}")  # fmt: skip


__all__ = [
    "VisionCUDAGraphs",
    "VisionGraphSet",
    "check_item_pixels",
    "check_vision_grids",
    "cuda_graph_capture",
    "eager_replay",
    "vision_graph_buckets",
]
