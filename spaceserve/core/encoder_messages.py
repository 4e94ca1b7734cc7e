"""The contract between the engine core and its encoder process (runtime/encoder_process.py, encoder_proc.py):
compact msgspec structs over two ZMQ sockets, framed by engine/serial.py (pixels travel as separate frames).

Embeddings never travel in these messages: the encoder process writes them into the ring shared at start-up
(runtime/embedding_ring.py) and only says which slot, how many rows, and whether it failed.
"""

from __future__ import annotations

from typing import Any

import msgspec

ENCODER_UNAVAILABLE_PREFIX = "encoder unavailable: "
"""Starts the error of a request failed because the encoder process died (a server answers it with a 503)."""


class EncodeItem(msgspec.Struct, array_like=True, omit_defaults=True):
    """One image or video of a batch, as MultiModalFeature (core/multimodal.py) without its place in a prompt."""

    mm_hash: str
    modality: str
    num_tokens: int
    num_patches: int
    grid_thw: tuple[int, int, int]
    pixel_values: Any
    """float32 patches, or a RawImage's uint8 [H, W, 3] pixels (see raw_image); on the host."""
    raw_image: tuple[int, int] | None = None
    """Set when pixel_values is an unprocessed image: the (height, width) to resize it to."""


# ---- to the encoder process ------------------------------------------------------------------------------------

class EncodeBatch(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    batch_id: int
    slot: int
    """The ring slot the rows go to; the core gives a slot again only once it has copied the last batch's out."""
    items: list[EncodeItem]
    split_sms: int | None = None
    """space: run on the encoder side of the green-context split that gives the encoder this many SMs (the same
    split the core made, so the LM runs on the other side)."""
    full_device: bool = False
    """space: run on the whole device (dispatched while the LM had nothing to run)."""


class ShutdownEncoder(msgspec.Struct, tag=True, array_like=True):
    pass


EncoderInput = EncodeBatch | ShutdownEncoder


# ---- from the encoder process ----------------------------------------------------------------------------------

class EncoderReady(msgspec.Struct, tag=True, array_like=True):
    """Sent once the tower is built, its graphs captured and the ring mapped: what the core reports about it."""

    info: dict[str, Any]


class BatchEncoded(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """A batch's rows are in its slot (the encoder process sends this once it has seen the batch's work complete on
    the device; the slot's event says the same to the core), or the batch failed."""

    batch_id: int
    num_rows: int = 0
    launch_s: float = 0.0
    """Host time the encoder process spent launching it (preprocessing, graph replay or eager launches)."""
    error: str | None = None


class EncoderFailed(msgspec.Struct, tag=True, array_like=True):
    """The encoder process failed to start, or its loop broke; it exits."""

    error: str
    error_type: str = "RuntimeError"


EncoderOutput = EncoderReady | BatchEncoded | EncoderFailed
