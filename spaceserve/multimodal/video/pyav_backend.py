"""CPU decoding with PyAV (FFmpeg's software decoders), one segment of packets at a time.

RGB24 here is what PyAV's ``VideoFrame.to_ndarray(format="rgb24")`` produces: libswscale converts the decoded
YUV frame with the colour matrix and range the frame carries (FFmpeg's defaults, BT.601 limited range, when the
stream says nothing) and PyAV's default (bilinear) chroma upsampling. Every CPU path (sequential, GOP-parallel,
any thread count) uses exactly this conversion, so they agree bit for bit; NVDEC's own conversion may differ from
it by a few levels.

Only requested frames are converted: every packet from the segment's keyframe on is decoded, but a frame that is
not requested is dropped as a YUV frame without conversion or copy. A session demuxes the file itself (demuxing is
cheap, and the packets it decodes are the container's own) and skips the packets before its segment's keyframe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import av
import torch

from spaceserve.multimodal.video.errors import InvalidVideoError
from spaceserve.multimodal.video.gop import DecodeSegment, PacketIndex
from spaceserve.multimodal.video.source import ffmpeg_message, open_container

THREAD_TYPES = ("AUTO", "FRAME", "SLICE", "NONE")


@dataclass(frozen=True)
class PyAVOptions:
    """FFmpeg threading inside one decoder session. threads=0 lets FFmpeg choose (one per core)."""

    threads: int = 1
    thread_type: str = "AUTO"

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.thread_type.upper() not in THREAD_TYPES:
            raise ValueError(f"thread_type must be one of {THREAD_TYPES}, got {self.thread_type!r}")


def decode_segment(
    source: str | bytes,
    index: PacketIndex,
    segment: DecodeSegment,
    out: torch.Tensor,
    out_position: dict[int, int],
    options: PyAVOptions,
    on_frame: Callable[[int], None] | None = None,
) -> None:
    """Decode one segment and write each requested frame, as RGB24, into out[out_position[frame]]; `on_frame` is
    called with that position once the frame is there."""
    wanted = set(segment.frame_indices)
    frame_of_pts = index.frame_of_pts()
    with open_container(source) as container:
        stream = next(s for s in container.streams.video if s.index == index.stream_index)
        codec_context = stream.codec_context
        codec_context.thread_count = options.threads
        codec_context.thread_type = options.thread_type.upper()
        try:
            for packet in _packets_from(container, stream, index, segment.start_packet):
                for frame in codec_context.decode(packet):
                    _keep(frame, frame_of_pts, wanted, index, out, out_position, on_frame)
                if not wanted:
                    return
            for frame in codec_context.decode(None):
                _keep(frame, frame_of_pts, wanted, index, out, out_position, on_frame)
        except av.error.FFmpegError as exc:
            raise InvalidVideoError(f"video is corrupt: decoding failed: {ffmpeg_message(exc)}") from None
    if wanted:
        missing = sorted(wanted)
        raise InvalidVideoError(
            f"{len(missing)} frame(s) could not be decoded (first: {missing[0]}); the video is truncated or corrupt"
        )


def _packets_from(container, stream, index: PacketIndex, start: int):
    """The stream's non-empty packets from decode position `start` on. Demuxing (no decoding) skips the ones
    before: cheaper and safer than a container seek, whose landing point depends on the demuxer."""
    position = 0
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if position == start and packet.pts != index.packets[start].pts:
            raise InvalidVideoError("video demuxes differently from one read to the next; cannot decode it in parts")
        if position >= start:
            yield packet
        position += 1


def _keep(
    frame: av.VideoFrame,
    frame_of_pts: dict[int, int],
    wanted: set[int],
    index: PacketIndex,
    out: torch.Tensor,
    out_position: dict[int, int],
    on_frame: Callable[[int], None] | None,
) -> None:
    frame_index = frame_of_pts.get(frame.pts)
    if frame_index not in wanted:
        return
    if (frame.width, frame.height) != (index.width, index.height):
        raise InvalidVideoError(
            f"frame {frame_index} is {frame.width}x{frame.height} but the stream is {index.width}x{index.height}; "
            "videos that change resolution are not supported"
        )
    position = out_position[frame_index]
    out[position].copy_(torch.from_numpy(frame.to_ndarray(format="rgb24")))
    wanted.discard(frame_index)
    if on_frame is not None:
        on_frame(position)
