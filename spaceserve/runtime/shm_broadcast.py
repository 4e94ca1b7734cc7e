"""One writer (rank 0), several readers (ranks 1..N-1): messages in a ring of shared-memory slots, one semaphore
per reader to wake it. How every step reaches the other tensor-parallel ranks.

Why shared memory and not a gloo broadcast: on the development host (2 busy cores), 4-64 KiB messages took
5.5-11 us per round trip (write, semaphore wake, reader copy, ack) against 180-343 us for a gloo broadcast
(`scripts/tp_check.py` measures both again on the GPU host). A step message is a copy of the runner's packed
staging bytes, so readers need no Python objects, only bytes.

Layout: a control block (the write sequence number, then each reader's last read sequence number) and
`num_slots` slots of [payload length | payload]. The writer waits until every reader has read the message that
last used a slot, writes the payload, bumps the sequence number and releases each reader's semaphore. A reader
blocks on its semaphore (no spinning: an idle engine costs nothing), reads the slot and acknowledges. Every wait
has a deadline and asks a liveness check, so a dead peer fails the wait instead of hanging it.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

_ALIGN = 64
_SLOT_HEADER = 8
_WRITER_POLL_S = 20e-6


class PeerDiedError(RuntimeError):
    """A wait on the other side of the queue ended because that side is gone or timed out."""


@dataclass(frozen=True)
class MessageQueueHandle:
    """What a reader process needs to attach (passed when the process is spawned: semaphores travel only then)."""

    shm_name: str
    num_readers: int
    num_slots: int
    slot_bytes: int
    semaphores: tuple[Any, ...]


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker (it would unlink the block when a reader exits)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


class MessageQueue:
    def __init__(
        self,
        shm: shared_memory.SharedMemory,
        handle: MessageQueueHandle,
        reader: int | None,
        owner: bool,
    ) -> None:
        self._shm = shm
        self.handle = handle
        self.reader = reader
        self._owner = owner
        n = handle.num_readers
        self._control = np.ndarray((1 + n,), dtype=np.int64, buffer=shm.buf)
        self._slots_offset = -(-(8 * (1 + n)) // _ALIGN) * _ALIGN
        self._stride = -(-(handle.slot_bytes + _SLOT_HEADER) // _ALIGN) * _ALIGN
        self._bytes = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        self._next = 0 if reader is None else int(self._control[1 + reader]) + 1

    @classmethod
    def create(cls, num_readers: int, slot_bytes: int, num_slots: int = 8) -> MessageQueue:
        control = -(-(8 * (1 + num_readers)) // _ALIGN) * _ALIGN
        stride = -(-(slot_bytes + _SLOT_HEADER) // _ALIGN) * _ALIGN
        shm = shared_memory.SharedMemory(create=True, size=control + num_slots * stride)
        np.ndarray((1 + num_readers,), dtype=np.int64, buffer=shm.buf)[:] = -1
        context = multiprocessing.get_context("spawn")
        semaphores = tuple(context.Semaphore(0) for _ in range(num_readers))
        handle = MessageQueueHandle(shm.name, num_readers, num_slots, slot_bytes, semaphores)
        return cls(shm, handle, None, owner=True)

    @classmethod
    def attach(cls, handle: MessageQueueHandle, reader: int) -> MessageQueue:
        return cls(_attach(handle.shm_name), handle, reader, owner=False)

    def _slot(self, seq: int) -> int:
        return self._slots_offset + (seq % self.handle.num_slots) * self._stride

    # ---- writer ------------------------------------------------------------------------------------------------

    def write(self, parts: Sequence[np.ndarray | bytes | memoryview], timeout_s: float, alive: Callable[[], None]) -> None:
        """Send the concatenation of `parts` to every reader. `alive()` raises if a reader is known dead; waiting
        longer than `timeout_s` for a free slot raises PeerDiedError."""
        seq = self._next
        oldest = seq - self.handle.num_slots  # the message that last used this slot
        reads = self._control[1:]
        if oldest >= 0 and reads.size and reads.min() < oldest:
            deadline = time.monotonic() + timeout_s
            while reads.min() < oldest:
                alive()
                if time.monotonic() > deadline:
                    raise PeerDiedError(f"a rank has not read a step message for {timeout_s:.0f} s")
                time.sleep(_WRITER_POLL_S)
        start = self._slot(seq) + _SLOT_HEADER
        offset = start
        for part in parts:
            flat = np.frombuffer(part, dtype=np.uint8) if not isinstance(part, np.ndarray) else part.reshape(-1).view(np.uint8)
            end = offset + flat.size
            if end - start > self.handle.slot_bytes:
                raise ValueError(f"a message of more than {self.handle.slot_bytes} bytes does not fit a slot")
            self._bytes[offset:end] = flat
            offset = end
        self._bytes[start - _SLOT_HEADER : start].view(np.int64)[0] = offset - start
        self._control[0] = seq
        self._next = seq + 1
        for semaphore in self.handle.semaphores:
            semaphore.release()

    # ---- reader ------------------------------------------------------------------------------------------------

    def read(self, timeout_s: float) -> np.ndarray | None:
        """The next message's bytes (a view into shared memory, valid until `ack()`), or None after `timeout_s`."""
        if not self.handle.semaphores[self.reader].acquire(timeout=timeout_s):
            return None
        start = self._slot(self._next) + _SLOT_HEADER
        nbytes = int(self._bytes[start - _SLOT_HEADER : start].view(np.int64)[0])
        return self._bytes[start : start + nbytes]

    def ack(self) -> None:
        """The last message read is consumed; its slot may be reused."""
        self._control[1 + self.reader] = self._next
        self._next += 1

    def close(self) -> None:
        self._control = self._bytes = None  # type: ignore[assignment]  # views must go before the block closes
        try:
            self._shm.close()
        except BufferError:
            pass  # a view still held by a caller; the mapping goes with the process
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
