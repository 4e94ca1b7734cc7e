"""The packet index of a video stream (demuxing only, no decoding) and the split of requested frames along GOPs.

Frame numbering everywhere is presentation order, 0-based: frame i is the packet with the i-th smallest pts.

A GOP here is a range of presentation indices: GOP j starts at keyframe K_j's presentation index and ends where
K_{j+1}'s begins (GOP 0 starts at 0, so frames shown before the first keyframe belong to it). In an open-GOP
stream (x264 --open-gop, HEVC CRA) the last frames of GOP j are "leading pictures" of K_{j+1}: decoded after
K_{j+1}, shown before it. Decoding packets in decode order from K_j therefore yields every frame of GOP j once the
leading pictures of K_{j+1} are out; decoding from K_j also yields K_j's own leading pictures, which belong to
GOP j-1 and may reference frames that were never decoded, so they are dropped.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction

import av

from spaceserve.multimodal.video.errors import InvalidVideoError
from spaceserve.multimodal.video.source import describe_source, ffmpeg_message, open_container


@dataclass(frozen=True)
class PacketInfo:
    """One non-empty packet of the video stream, in decode order (its data stays in the file)."""

    pts: int
    dts: int | None
    is_keyframe: bool


@dataclass(frozen=True)
class PacketIndex:
    """Everything about one video stream that demuxing tells, with its packets' timestamps in decode order."""

    stream_index: int
    codec: str
    pix_fmt: str | None
    profile: str | None
    width: int
    height: int
    fps: float
    time_base: Fraction
    packets: tuple[PacketInfo, ...]
    pts_by_frame: tuple[int, ...]
    keyframe_packets: tuple[int, ...]
    keyframe_frames: tuple[int, ...]
    open_gop: bool

    @property
    def num_frames(self) -> int:
        return len(self.pts_by_frame)

    def frame_of_pts(self) -> dict[int, int]:
        return {pts: frame for frame, pts in enumerate(self.pts_by_frame)}


def index_packets(source: str | bytes) -> PacketIndex:
    """Demux the best video stream once. Raises InvalidVideoError naming what is wrong with the input."""
    with open_container(source) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise InvalidVideoError(
                f"no video stream in {describe_source(source)} (it holds {', '.join(kinds)})"
            )
        format_name = container.format.name
        if format_name == "image2" or format_name.endswith("_pipe"):
            raise InvalidVideoError(f"{describe_source(source)} is a still image ({format_name}), not a video")
        stream = container.streams.video[0]
        codec_context = stream.codec_context
        if codec_context is None or codec_context.codec is None:
            raise InvalidVideoError(f"video codec of {describe_source(source)} is unknown; nothing here can decode it")
        codec = codec_context.name
        try:
            av.codec.Codec(codec, "r")
        except (av.error.FFmpegError, ValueError):
            raise InvalidVideoError(f"video codec {codec!r} has no decoder here") from None
        width, height = codec_context.width, codec_context.height
        if width <= 0 or height <= 0:
            raise InvalidVideoError(f"video stream has no frame size ({width}x{height}); truncated or corrupt?")
        time_base = stream.time_base
        if time_base is None or time_base <= 0:
            raise InvalidVideoError("video stream has no time base; timestamps cannot be interpreted")
        packets = _demux(container, stream)
        if stream.frames > len(packets):
            raise InvalidVideoError(
                f"video is truncated: the container lists {stream.frames} frames but only {len(packets)} can be read"
            )
        stream_index = stream.index
        pix_fmt = codec_context.pix_fmt
        profile = codec_context.profile
        rate = stream.average_rate  # not guessed_rate: a guess from the codec's tick rate can be off by 2x
    if not packets:
        raise InvalidVideoError(f"video stream has no frames ({describe_source(source)})")
    pts_by_frame = tuple(sorted(p.pts for p in packets))
    if len(set(pts_by_frame)) != len(pts_by_frame):
        raise InvalidVideoError("video stream has frames with duplicate timestamps; frame order is ambiguous")
    fps = _frame_rate(rate, pts_by_frame, time_base)
    frame_of_pts = {pts: frame for frame, pts in enumerate(pts_by_frame)}
    keyframe_packets = [0] + [i for i, p in enumerate(packets) if p.is_keyframe and i > 0]
    keyframe_frames = [frame_of_pts[packets[i].pts] for i in keyframe_packets]
    keyframe_frames[0] = 0
    if any(b <= a for a, b in zip(keyframe_frames, keyframe_frames[1:])):
        # Keyframes not shown in decode order: no GOP split is safe, decode it as one GOP.
        keyframe_packets, keyframe_frames = [0], [0]
    return PacketIndex(
        stream_index=stream_index,
        codec=codec,
        pix_fmt=pix_fmt,
        profile=profile,
        width=width,
        height=height,
        fps=fps,
        time_base=Fraction(time_base),
        packets=tuple(packets),
        pts_by_frame=pts_by_frame,
        keyframe_packets=tuple(keyframe_packets),
        keyframe_frames=tuple(keyframe_frames),
        open_gop=_has_leading_pictures(packets, keyframe_packets),
    )


def _demux(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> list[PacketInfo]:
    packets = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.pts is None:
                raise InvalidVideoError(
                    "video packets carry no timestamps (a raw elementary stream?); put it in a container such as MP4"
                )
            packets.append(PacketInfo(packet.pts, packet.dts, packet.is_keyframe))
    except av.error.FFmpegError as exc:
        raise InvalidVideoError(f"video is truncated or corrupt: demuxing failed: {ffmpeg_message(exc)}") from None
    return packets


def _frame_rate(rate: Fraction | None, pts_by_frame: tuple[int, ...], time_base: Fraction) -> float:
    if rate is not None and rate > 0 and math.isfinite(float(rate)):
        return float(rate)
    span = (pts_by_frame[-1] - pts_by_frame[0]) * time_base
    if len(pts_by_frame) > 1 and span > 0:
        return float((len(pts_by_frame) - 1) / span)
    raise InvalidVideoError("video frame rate is zero or unknown (no rate in the stream, timestamps do not tell)")


def _has_leading_pictures(packets: list[PacketInfo], keyframe_packets: list[int]) -> bool:
    """True when some frame decoded after a keyframe is shown before it (open GOP)."""
    bounds = list(keyframe_packets[1:]) + [len(packets)]
    for start, stop in zip(keyframe_packets[1:], bounds[1:]):
        key_pts = packets[start].pts
        if any(packets[i].pts < key_pts for i in range(start + 1, stop)):
            return True
    return False


@dataclass(frozen=True)
class DecodeSegment:
    """Decode packets in decode order from `start_packet` (a keyframe) and keep `frame_indices`."""

    start_packet: int
    frame_indices: tuple[int, ...]


@dataclass(frozen=True)
class DecodeChunk:
    """The work of one decoder session: one or more segments, in presentation order."""

    segments: tuple[DecodeSegment, ...]

    @property
    def frame_indices(self) -> tuple[int, ...]:
        return tuple(i for segment in self.segments for i in segment.frame_indices)


def gop_of_frame(keyframe_frames: tuple[int, ...], frame: int) -> int:
    return bisect.bisect_right(keyframe_frames, frame) - 1


def plan_chunks(
    index: PacketIndex, frame_indices: tuple[int, ...], *, max_chunks: int, min_frames_per_chunk: int = 1
) -> tuple[DecodeChunk, ...]:
    """Split sorted unique frame indices into at most `max_chunks` chunks along GOP boundaries.

    Every chunk covers whole GOPs (never half of one), chunks are contiguous in presentation order and
    balanced by the number of frames each has to decode; no chunk decodes fewer than about
    `min_frames_per_chunk` frames unless there is only one. Inside a chunk, a run of GOPs with no requested
    frame is skipped (a new segment starts at the next keyframe). In an open-GOP stream a segment starts one
    GOP early so that nothing it keeps depends on frames it did not decode.
    """
    if not frame_indices:
        return ()
    keyframe_frames = index.keyframe_frames
    bounds = keyframe_frames + (index.num_frames,)
    by_gop: dict[int, list[int]] = {}
    for frame in frame_indices:
        by_gop.setdefault(gop_of_frame(keyframe_frames, frame), []).append(frame)
    gops = sorted(by_gop)
    costs = [by_gop[g][-1] - bounds[g] + 1 for g in gops]
    for position, gop in enumerate(gops):
        starts_run = position == 0 or gops[position - 1] != gop - 1
        if starts_run and index.open_gop and gop > 0:
            costs[position] += bounds[gop] - bounds[gop - 1]
    total = sum(costs)
    k = max(1, min(max_chunks, len(gops), total // max(1, min_frames_per_chunk)))
    cuts = _balanced_cuts(costs, k)
    chunks = []
    for lo, hi in zip((0,) + cuts, cuts + (len(gops),)):
        chunks.append(DecodeChunk(_segments(index, gops[lo:hi], by_gop)))
    return tuple(chunks)


def _balanced_cuts(costs: list[int], k: int) -> tuple[int, ...]:
    """k-1 cut positions splitting `costs` into k non-empty contiguous parts of about equal sum."""
    total = sum(costs)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    cuts: list[int] = []
    for part in range(1, k):
        target = total * part / k
        position = bisect.bisect_left(prefix, target)
        if position > 1 and target - prefix[position - 1] < prefix[position] - target:
            position -= 1
        lowest = (cuts[-1] if cuts else 0) + 1
        highest = len(costs) - (k - part)
        cuts.append(min(max(position, lowest), highest))
    return tuple(cuts)


def _segments(index: PacketIndex, gops: list[int], by_gop: dict[int, list[int]]) -> tuple[DecodeSegment, ...]:
    segments = []
    run: list[int] = []
    for gop in gops:
        if run and gop != run[-1] + 1:
            segments.append(_segment(index, run, by_gop))
            run = []
        run.append(gop)
    segments.append(_segment(index, run, by_gop))
    return tuple(segments)


def _segment(index: PacketIndex, run: list[int], by_gop: dict[int, list[int]]) -> DecodeSegment:
    first = run[0]
    start_gop = first - 1 if index.open_gop and first > 0 else first
    frames = tuple(frame for gop in run for frame in by_gop[gop])
    return DecodeSegment(start_packet=index.keyframe_packets[start_gop], frame_indices=frames)
