"""The contract between the front process (HTTP, tokenization, media, detokenization) and the engine-core process
(schedulers, runners, encoder): compact msgspec structs, never live objects.

Fields typed `Any` carry arrays (pixel values, raw RGB images, M-RoPE positions, video frames); the serializer in
engine/serial.py sends their bytes as separate message frames, without copying them into the msgpack body.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from spaceserve.core.sampling_params import SamplingParams
from spaceserve.core.scheduler_output import TokenLogprobs


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class WireFeature(msgspec.Struct, array_like=True, omit_defaults=True):
    """One image or video of a request, as MultiModalFeature (core/multimodal.py) without live objects."""

    mm_hash: str
    modality: str
    offset: int
    length: int
    num_patches: int
    grid_thw: tuple[int, int, int]
    pixel_values: Any = None
    """float32 patches, a RawImage's fields (see raw_image), or None while a video is still to be decoded."""
    raw_image: tuple[int, int] | None = None
    """Set when pixel_values is an unprocessed uint8 [H, W, 3] image: the (height, width) to resize it to; the
    engine core preprocesses it on its device."""
    chunk: tuple[str, int, int, int, int] | None = None
    """A video chunk's VideoChunk fields: the video's hash, the chunk's index, the number of chunks, and its
    temporal patches [start, end)."""
    inputs_pending: bool = False
    """A video chunk the engine core's decode stage has yet to make."""


class WirePacketIndex(msgspec.Struct, array_like=True):
    """A probed video's packet index (multimodal/video/gop.py's PacketIndex), so the core decodes without demuxing
    the video again. Per-packet fields are arrays in decode order; dts is 0 where has_dts is false."""

    stream_index: int
    codec: str
    pix_fmt: str | None
    profile: str | None
    width: int
    height: int
    fps: float
    time_base: tuple[int, int]
    pts: Any
    dts: Any
    has_dts: Any
    is_keyframe: Any
    pts_by_frame: Any
    keyframe_packets: Any
    keyframe_frames: Any
    open_gop: bool


class WireVideoJob(msgspec.Struct, array_like=True, omit_defaults=True):
    """A video the engine core's decode stage makes model-ready, chunk by chunk (multimodal/video/stage.py's
    VideoWork)."""

    feature_index: int
    """Index in the request's mm_features of the video's first chunk."""
    source: Any
    """The encoded bytes (a uint8 array, sent as a frame of its own), or given uint8 [T, H, W, 3] frames."""
    frame_indices: tuple[int, ...] | None
    plan: tuple[int, int, int, tuple[int, int, int], int]
    """VideoPlan fields: num_frames, resized_height, resized_width, grid_thw, merge_size."""
    mm_hash: str
    chunks: list[tuple[int, int]]
    packet_index: WirePacketIndex | None = None
    """Set for encoded bytes."""


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float
    mm_features: list[WireFeature] = []
    mrope_positions: Any = None
    """int64 [3, prompt length], or None for text-only prompts (positions are then the token index)."""
    mrope_position_delta: int = 0
    video_jobs: list[WireVideoJob] = []


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request gained in one step: its new token ids, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    timestamps: dict[str, float] | None = None
    """time.monotonic() stamps of the request's life in the core (first scheduled, encoder, first token,
    finished); sent with the output that finishes it. CLOCK_MONOTONIC is system-wide, so the front compares them
    with its own."""
    new_logprobs: list[TokenLogprobs] | None = None
    """One per new token, for a request that asked for log-probabilities."""


class EngineCoreStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """What /metrics shows about the core's state, as of its latest step."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    kv_cache_usage: float = 0.0
    encoder_cache_usage: float = 0.0
    num_encoder_queued_items: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    allocator: list[tuple[str, dict[str, str], float]] = []
    """space: the SM allocator's counters as (Prometheus name, labels, value) samples."""


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    stats: EngineCoreStats | None = None


# ---- messages to the engine core -------------------------------------------------------------------------------

class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT
    """ABORT for a client that left; STOP when the front saw a stop string (the core only frees the request)."""


class UtilityCall(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    method: str
    args: list[Any] = []


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


CoreInput = AddRequest | AbortRequests | UtilityCall | Shutdown


# ---- messages from the engine core -----------------------------------------------------------------------------

class EngineCoreReady(msgspec.Struct, tag=True, array_like=True):
    """Sent once the core has built its model and KV cache: what the front needs to know about it."""

    info: dict[str, Any]


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: EngineCoreOutputs


class UtilityResult(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreDead(msgspec.Struct, tag=True, array_like=True):
    """The core failed (while starting or stepping) and stops; every request in flight is lost."""

    error: str
    error_type: str = "RuntimeError"
    """The exception's class name, so the front can raise the same kind (ConfigError at start-up, say)."""


CoreOutput = EngineCoreReady | StepOutputs | UtilityResult | EngineCoreDead
