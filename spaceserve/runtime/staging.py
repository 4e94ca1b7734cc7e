"""A step's small inputs cross to the device in one copy: every field (token ids, positions, slots, block tables,
sampling controls) is packed at an aligned offset of one host buffer and copied into the same offsets of one
persistent device buffer, where typed views read them.

Offsets depend only on the sizes of the fields before, so a step laid out with the same leading sizes puts
its fields at the same device addresses: CUDA graphs capture those addresses once and every later decode step of
that size fills them. Host buffers alternate between steps (pinned on CUDA), so one step can be prepared while
the previous one's copy is still queued.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 64
_NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32}


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


class PackedStep:
    """The fields of one step: numpy views to fill on the host, then `copy()` and typed device views."""

    def __init__(self, buffer: "StagingBuffer", host: torch.Tensor, index: int, fields: list[Field]) -> None:
        self._buffer = buffer
        self._host = host
        self._index = index
        self._offsets: dict[str, tuple[int, Field]] = {}
        offset = 0
        for field in fields:
            self._offsets[field.name] = (offset, field)
            offset += -(-field.nbytes // _ALIGN) * _ALIGN
        if offset > buffer.nbytes:
            raise ValueError(f"a step needs {offset} staging bytes, more than the {buffer.nbytes} reserved")
        self.nbytes = offset
        host_bytes = buffer._host_numpy[index]
        self.host = {
            name: host_bytes[off : off + f.nbytes].view(_NUMPY[f.dtype]).reshape(f.shape)
            for name, (off, f) in self._offsets.items()
        }

    def copy(self) -> dict[str, torch.Tensor]:
        """Enqueue the one host->device copy on the current stream; returns the device views."""
        return self._buffer.copy(self._index, self.nbytes, self._offsets)

    def packed_bytes(self) -> np.ndarray:
        """The filled host bytes (what `copy` sends): another rank rebuilds the step from them (step_message.py)."""
        return self._buffer._host_numpy[self._index][: self.nbytes]

    def load(self, packed: np.ndarray) -> None:
        """Fill the host buffer with another rank's `packed_bytes` of the same fields."""
        if packed.size != self.nbytes:
            raise ValueError(f"a packed step of {packed.size} bytes for fields laid out in {self.nbytes}")
        self._buffer._host_numpy[self._index][: self.nbytes] = packed


class StagingBuffer:
    def __init__(self, nbytes: int, device: torch.device, num_host_buffers: int = 2) -> None:
        self.nbytes = -(-nbytes // _ALIGN) * _ALIGN
        self.device = device
        pin = device.type == "cuda"
        self._hosts = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(num_host_buffers)]
        self._copied = [torch.cuda.Event() if pin else None for _ in range(num_host_buffers)]
        self._device = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self._host_numpy = [host.numpy() for host in self._hosts]
        self._device_numpy = self._device.numpy() if device.type == "cpu" else None
        self._next = 0
        self.last_step: PackedStep | None = None
        """The step begun last (tensor parallel: rank 0 sends its packed bytes to the other ranks)."""

    def begin(self, fields: list[Field]) -> PackedStep:
        index = self._next
        self._next = (index + 1) % len(self._hosts)
        event = self._copied[index]
        if event is not None:
            event.synchronize()  # the copy that last read this host buffer has run (returns at once when serial)
        self.last_step = PackedStep(self, self._hosts[index], index, fields)
        return self.last_step

    def copy(self, index: int, nbytes: int, offsets: dict[str, tuple[int, Field]]) -> dict[str, torch.Tensor]:
        if self._device_numpy is None:
            self._device[:nbytes].copy_(self._hosts[index][:nbytes], non_blocking=True)
        else:  # a plain memcpy: torch's threaded CPU copy is far slower for these small buffers on a busy host
            self._device_numpy[:nbytes] = self._host_numpy[index][:nbytes]
        event = self._copied[index]
        if event is not None:
            event.record()
        return {
            name: self._device[off : off + f.nbytes].view(f.dtype).view(f.shape) for name, (off, f) in offsets.items()
        }
