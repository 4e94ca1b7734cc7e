"""msgpack (msgspec) framing of the messages between the front and the engine core.

A message is a list of frames: the msgpack body, then the bytes of every large array it holds (torch tensors and
numpy arrays), which the body references by index. ZMQ sends the frames without copying them into the body, and
the receiver builds arrays over the received buffers. Small arrays travel inline.
"""

from __future__ import annotations

import warnings
from typing import Any

import msgspec
import numpy as np
import torch

_EXT_INLINE = 1
_EXT_FRAME = 2
INLINE_LIMIT_BYTES = 4096

Frames = list[bytes | memoryview]


class MessageEncoder:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._frames: Frames = []

    def encode(self, message: Any) -> Frames:
        self._frames = frames = [b""]
        frames[0] = self._encoder.encode(message)
        self._frames = []
        return frames

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            if tensor.device.type != "cpu":
                raise TypeError(f"a {tensor.device} tensor cannot cross to another process; move it to the CPU")
            tensor = tensor.contiguous()
            kind, dtype, shape = "torch", str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
            data = memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        elif isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj)
            kind, dtype, shape, data = "numpy", array.dtype.str, array.shape, memoryview(array).cast("B")
        else:
            raise TypeError(f"cannot send an object of type {type(obj).__name__} to the engine core")
        if data.nbytes <= INLINE_LIMIT_BYTES:
            return msgspec.msgpack.Ext(_EXT_INLINE, msgspec.msgpack.encode((kind, dtype, shape, bytes(data))))
        self._frames.append(data)
        return msgspec.msgpack.Ext(_EXT_FRAME, msgspec.msgpack.encode((kind, dtype, shape, len(self._frames) - 1)))


class MessageDecoder:
    def __init__(self, message_type: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(message_type, ext_hook=self._ext_hook)
        self._frames: list[Any] = []

    def decode(self, frames: list[Any]) -> Any:
        """frames: bytes, memoryviews or zmq.Frame objects (their buffers back the arrays decoded from them)."""
        self._frames = frames
        try:
            return self._decoder.decode(_buffer(frames[0]))
        finally:
            self._frames = []

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        kind, dtype, shape, payload = msgspec.msgpack.decode(data)
        if code == _EXT_FRAME:
            payload = _buffer(self._frames[payload])
        elif code != _EXT_INLINE:
            raise ValueError(f"unknown msgpack extension {code}")
        if kind == "numpy":
            return np.frombuffer(payload, dtype=np.dtype(dtype)).reshape(shape)
        torch_dtype = getattr(torch, dtype)
        if not len(payload):
            return torch.empty(shape, dtype=torch_dtype)
        with warnings.catch_warnings():  # a received buffer is read-only; these arrays are only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(payload, dtype=torch.uint8).view(torch_dtype).reshape(shape)


def _buffer(frame: Any) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame
