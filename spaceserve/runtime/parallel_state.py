"""Who this process is among the tensor-parallel ranks, and the collectives the parallel layers call.

One process per rank (runtime/executor.py starts ranks 1..N-1; rank 0 lives in the engine's process). Every
rank joins rank 0's TCPStore and builds three groups over the same ranks:

- `tp`: the language model's collectives (the all-reduce after each row-parallel layer and the vocabulary-parallel
  embedding, the all-gather of the logits). NCCL on CUDA, gloo on the CPU.
- `encoder`: the vision tower's (pixel broadcast, embedding all-gather, the weights mode's all-reduces). A
  communicator of its own: in the concurrent modes the encoder runs on a thread of its own, and collectives issued
  by two threads on one communicator would interleave in a different order on each rank.
- `cpu`: gloo, for small host-side agreements (the KV block count at start-up, RPCs in tests and tools).

Layers take their group when they are built, from `building_model(...)`, so a model built outside it (or two
engines in one process) is never affected by another's ranks; outside it every layer gets the single-rank group,
whose collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13


class GroupCoordinator:
    """One group of ranks: this process's rank in it, its size, and the collectives over it. With one rank every
    collective returns its input; a group without process groups (a test building one rank's shard) has a rank and
    size for loading weights but refuses collectives."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device_group: dist.ProcessGroup | None = None,
        cpu_group: dist.ProcessGroup | None = None,
        name: str = "tp",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device_group = device_group
        self.cpu_group = cpu_group
        self.name = name

    @classmethod
    def single(cls, name: str = "tp") -> GroupCoordinator:
        return cls(0, 1, name=name)

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}: rank {self.rank} of {self.world_size})"

    def _device(self) -> dist.ProcessGroup:
        if self.device_group is None:
            raise RuntimeError(f"{self!r} has no process group to run collectives on")
        return self.device_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (CUDA-graph safe)."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self._device())
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order (CUDA-graph safe)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        gathered = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(gathered, x, group=self._device())
        dim = dim % x.dim()
        if dim == 0:
            return gathered
        gathered = gathered.view(self.world_size, *x.shape)
        return gathered.movedim(0, dim).reshape(*x.shape[:dim], -1, *x.shape[dim + 1 :])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(x, src=src, group=self._device())
        return x

    # ---- host-side (gloo) -------------------------------------------------------------------------------------

    def _cpu(self) -> dist.ProcessGroup:
        if self.cpu_group is None:
            raise RuntimeError(f"{self!r} has no CPU process group")
        return self.cpu_group

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self._cpu())
        return int(tensor.item())

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Rank 0 gets every rank's picklable `obj` in rank order; the others get None."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, gathered, dst=0, group=self._cpu())
        return gathered


@dataclass(frozen=True)
class ModelParallel:
    """The groups a model is built for: the language model's and the vision tower's (the tp group in the weights
    mode, a single rank in the data mode)."""

    tp: GroupCoordinator
    vision: GroupCoordinator

    @classmethod
    def single(cls) -> ModelParallel:
        return cls(GroupCoordinator.single(), GroupCoordinator.single("vision"))


_BUILDING: contextvars.ContextVar[GroupCoordinator | None] = contextvars.ContextVar("spaceserve_tp", default=None)
_VISION: contextvars.ContextVar[GroupCoordinator | None] = contextvars.ContextVar("spaceserve_vision", default=None)


@contextlib.contextmanager
def building_model(parallel: ModelParallel) -> Iterator[None]:
    """Layers constructed inside take `parallel.tp` as their group; a vision tower built inside
    `building_vision_tower()` takes `parallel.vision`."""
    tp_token, vision_token = _BUILDING.set(parallel.tp), _VISION.set(parallel.vision)
    try:
        yield
    finally:
        _BUILDING.reset(tp_token)
        _VISION.reset(vision_token)


@contextlib.contextmanager
def building_vision_tower() -> Iterator[None]:
    token = _BUILDING.set(_VISION.get() or GroupCoordinator.single("vision"))
    try:
        yield
    finally:
        _BUILDING.reset(token)


def current_tp_group() -> GroupCoordinator:
    """The group a layer built now belongs to (a single rank outside `building_model`)."""
    return _BUILDING.get() or GroupCoordinator.single()


# ---- process groups -------------------------------------------------------------------------------------------


@dataclass
class DistributedState:
    rank: int
    world_size: int
    device: torch.device
    tp: GroupCoordinator
    encoder: GroupCoordinator
    store: dist.TCPStore

    def model_parallel(self, mm_encoder_tp_mode: str) -> ModelParallel:
        vision = self.encoder if mm_encoder_tp_mode == "weights" else GroupCoordinator.single("vision")
        return ModelParallel(self.tp, vision)


def create_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store on a free loopback port (`store.port` tells the other ranks where)."""
    return dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )


def init_distributed(
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    store: dist.TCPStore | None = None,
    store_port: int | None = None,
    timeout_s: float = 600.0,
) -> DistributedState:
    """Join the ranks (rank 0 passes its `store`, the others the port) and build the tp, encoder and cpu groups."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group; shut the other engine down first "
            "(one tensor-parallel engine per process)"
        )
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        if store_port is None:
            raise ValueError("a rank other than 0 needs the store's port")
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
        # a watchdog timeout aborts the communicators (unblocking kernels stuck on a dead peer) instead of killing
        # the process: the engine's process must live to report the failure
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    encoder_group = dist.new_group(backend=backend, timeout=timeout)
    tp = GroupCoordinator(rank, world_size, dist.group.WORLD, cpu_group, "tp")
    encoder = GroupCoordinator(rank, world_size, encoder_group, cpu_group, "encoder")
    return DistributedState(rank, world_size, device, tp, encoder, store)


def abort_distributed(state: DistributedState) -> None:
    """Abort the device communicators from another thread (a peer died): NCCL kernels waiting on it return and
    later collectives raise, instead of hanging."""
    for group in (state.encoder.device_group, state.tp.device_group):
        abort = getattr(group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # noqa: BLE001 - best effort while failing
                pass


@torch.inference_mode()
def time_decode_collectives(group: GroupCoordinator, text: Any, rows: int, iters: int = 50) -> dict[str, float]:
    """The collectives of one decode step of `rows` sequences, alone: the embedding's and two per layer's
    all-reduces of [rows, hidden] and the logits' all-gather, captured as one CUDA graph on CUDA (as the decode
    graph runs them) and replayed `iters` times. Every rank must call it together. Milliseconds per step."""

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.zeros(rows, text.hidden_size, dtype=dtype, device=device)
    logits = torch.zeros(rows, -(-text.vocab_size // group.world_size), dtype=dtype, device=device)

    def step() -> None:
        for _ in range(2 * text.num_hidden_layers + 1):
            group.all_reduce(hidden)
        group.all_gather(logits, dim=-1)

    samples = []
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                step()
            graph.replay()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                graph.replay()
                end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            began = time.perf_counter()
            step()
            samples.append((time.perf_counter() - began) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "collectives": 2 * text.num_hidden_layers + 2}


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
