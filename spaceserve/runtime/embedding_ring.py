"""The buffer the encoder process hands embeddings back through: `num_slots` slots of `slot_rows` embedding rows,
allocated once by the engine core and shared once, at start-up, with the encoder process.

The core allocates it, so it owns the memory: rows already in it stay valid whatever happens to the encoder
process. One batch in flight holds one slot. The encoder process writes a batch's rows into its slot on the stream
the batch ran on and marks it written; the core, once told the batch's work completed, copies the rows out on a
stream of its own, behind the mark on the device (a device-to-device copy of a few MB, microseconds against the tens of
milliseconds of the tower; keeping the rows in the ring instead would tie the ring's size and lifetime to the
encoder cache) and gives the slot to the next batch. Nothing is shared per batch: no IPC handle is opened after
start-up, and no embedding row crosses the host.

- CUDA: a device tensor shared by CUDA IPC (torch.multiprocessing.reductions.reduce_tensor; the handle is opened
  once in the encoder process), and one interprocess CUDA event per slot, created here, opened there, recorded
  there after the rows are written and waited on here on the device (a host query of it is not reliable across
  processes: see copy_out).
- CPU: a file-backed shared tensor (torch.from_file, MAP_SHARED) in /dev/shm, removed as soon as both processes
  have mapped it; no events, since the encoder process writes the rows before it reports the batch.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RingHandle:
    """What the encoder process needs to map the ring (pickled once into its start-up file)."""

    num_slots: int
    slot_rows: int
    width: int
    dtype: str
    device: str
    cuda_ipc: tuple[Any, tuple[Any, ...]] | None = None
    """CUDA: reduce_tensor's (rebuild function, arguments)."""
    event_handles: tuple[bytes, ...] = ()
    path: str | None = None
    """CPU: the shared file."""


def shared_memory_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class EmbeddingRing:
    def __init__(self, buffer: torch.Tensor, events: list[Any], path: str | None, owner: bool) -> None:
        self.buffer = buffer
        """[num_slots, slot_rows, width]"""
        self.events = events
        self._path = path
        self._owner = owner

    @property
    def num_slots(self) -> int:
        return self.buffer.shape[0]

    @property
    def slot_rows(self) -> int:
        return self.buffer.shape[1]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @classmethod
    def allocate(cls, num_slots: int, slot_rows: int, width: int, dtype: torch.dtype, device: torch.device,
                 directory: str | None = None) -> EmbeddingRing:
        if num_slots < 1 or slot_rows < 1 or width < 1:
            raise ValueError(f"a ring needs slots, rows and width >= 1, got {num_slots}, {slot_rows}, {width}")
        shape = (num_slots, slot_rows, width)
        if device.type == "cuda":
            buffer = torch.empty(shape, dtype=dtype, device=device)
            events = [torch.cuda.Event(interprocess=True) for _ in range(num_slots)]
            return cls(buffer, events, None, owner=True)
        path = os.path.join(directory or shared_memory_directory(), f"spaceserve-ring-{os.getpid()}-{uuid.uuid4().hex}")
        flat = torch.from_file(path, shared=True, size=num_slots * slot_rows * width, dtype=dtype)
        return cls(flat.view(shape), [], path, owner=True)

    def handle(self) -> RingHandle:
        num_slots, slot_rows, width = self.buffer.shape
        common = dict(num_slots=num_slots, slot_rows=slot_rows, width=width,
                      dtype=str(self.buffer.dtype).removeprefix("torch."), device=str(self.buffer.device))
        if self.buffer.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            return RingHandle(**common, cuda_ipc=reduce_tensor(self.buffer),
                              event_handles=tuple(event.ipc_handle() for event in self.events))
        if self._path is None:
            raise RuntimeError("the ring's shared file is gone: hand out its handle before unlinking it")
        return RingHandle(**common, path=self._path)

    @classmethod
    def attach(cls, handle: RingHandle) -> EmbeddingRing:
        """Map the ring another process allocated (the encoder process, once, at start-up)."""
        shape = (handle.num_slots, handle.slot_rows, handle.width)
        dtype = getattr(torch, handle.dtype)
        if handle.cuda_ipc is not None:
            rebuild, args = handle.cuda_ipc
            device = torch.device(handle.device)
            buffer = rebuild(*args)
            events = [torch.cuda.Event.from_ipc_handle(device, event) for event in handle.event_handles]
            return cls(buffer.view(shape), events, None, owner=False)
        if handle.path is None:
            raise ValueError("a ring handle needs a CUDA IPC handle or a shared file")
        flat = torch.from_file(handle.path, shared=True, size=handle.num_slots * handle.slot_rows * handle.width,
                               dtype=dtype)
        return cls(flat.view(shape), [], None, owner=False)

    def unlink(self) -> None:
        """Remove the CPU ring's file (its mappings stay valid). Idempotent; nothing to do on CUDA."""
        if self._owner and self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    # ---- the encoder process's side -------------------------------------------------------------------------

    def write(self, slot: int, rows: list[torch.Tensor], stream: torch.cuda.Stream | None) -> int:
        """Write a batch's rows, items in order, into `slot` on the current stream and mark it written after them
        (CUDA: record the slot's event on `stream`). Returns the number of rows."""
        num_rows = sum(r.shape[0] for r in rows)
        if num_rows > self.slot_rows:
            raise ValueError(f"a batch of {num_rows} embedding rows does not fit a ring slot of {self.slot_rows}")
        torch.cat(rows, out=self.buffer[slot, :num_rows])
        if self.events:
            self.events[slot].record(stream)
        return num_rows

    # ---- the engine core's side -----------------------------------------------------------------------------

    def copy_out(self, slot: int, num_rows: int, stream: torch.cuda.Stream | None,
                 readers: tuple[torch.cuda.Stream, ...] = ()) -> torch.Tensor:
        """The slot's first `num_rows` rows copied into a tensor of their own, complete on return: on CUDA the copy
        runs on `stream` and is waited for (microseconds), so any stream may read the result and the slot may be
        written again at once. `readers`: the streams that will read the result; the caching allocator reuses its
        memory only after their work queued at the time it is freed."""
        source = self.buffer[slot, :num_rows]
        if stream is None:
            return source.clone()
        if self.events:
            # readiness is this device-side wait, never a host query of the event: on the H200 (driver 580, with and
            # without MPS) a query in this process answered "done" right after the writer recorded the event behind
            # a ~1 s kernel, while a wait like this one ordered the copy after the rows (test_embedding_ring)
            stream.wait_event(self.events[slot])
        with torch.cuda.stream(stream):
            rows = source.clone()
            stream.synchronize()
        for reader in readers:
            rows.record_stream(reader)
        return rows
