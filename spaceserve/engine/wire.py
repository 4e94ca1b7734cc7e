"""Requests across the process boundary: a Request (core/request.py) as the EngineCoreRequest message the front
sends, and back into a Request in the engine core. Only plain data crosses: ids, sampling parameters, image spans,
arrays (pixels, raw RGB, M-RoPE positions, video frames) and the plans of videos still to decode."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from spaceserve.core.engine_messages import EngineCoreRequest, WireFeature, WirePacketIndex, WireVideoJob
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange, RawImage, VideoChunk
from spaceserve.core.request import Request
from spaceserve.multimodal.video.processor import VideoPlan
from spaceserve.multimodal.video.stage import VideoWork


def request_to_wire(request: Request) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling_params=request.sampling_params,
        eos_token_ids=tuple(request.eos_token_ids),
        arrival_time=request.arrival_time,
        mm_features=[_feature_to_wire(feature) for feature in request.mm_features],
        mrope_positions=request.mrope_positions,
        mrope_position_delta=request.mrope_position_delta,
        video_jobs=[_video_to_wire(index, work) for index, work in request.pending_mm_work],
    )


def request_from_wire(message: EngineCoreRequest) -> Request:
    request = Request(
        message.request_id,
        message.prompt_token_ids,
        message.sampling_params,
        eos_token_ids=tuple(message.eos_token_ids),
        mm_features=[_feature_from_wire(feature) for feature in message.mm_features],
        mrope_positions=message.mrope_positions,
        mrope_position_delta=message.mrope_position_delta,
        arrival_time=message.arrival_time,
    )
    request.pending_mm_work = [(job.feature_index, _video_from_wire(job)) for job in message.video_jobs]
    return request


def _feature_to_wire(feature: MultiModalFeature) -> WireFeature:
    pixels, raw = feature.pixel_values, None
    if isinstance(pixels, RawImage):
        pixels, raw = pixels.rgb, (pixels.height, pixels.width)
    span = feature.placeholder
    chunk = feature.chunk
    return WireFeature(
        feature.mm_hash, feature.modality, span.offset, span.length, feature.num_patches, tuple(feature.grid_thw),
        pixels, raw,
        None if chunk is None else (chunk.video_hash, chunk.index, chunk.num_chunks, chunk.t_start, chunk.t_end),
        feature.inputs_pending,
    )  # fmt: skip


def _feature_from_wire(wire: WireFeature) -> MultiModalFeature:
    pixels = wire.pixel_values
    if wire.raw_image is not None:
        pixels = RawImage(pixels, *wire.raw_image)
    return MultiModalFeature(
        mm_hash=wire.mm_hash,
        modality=wire.modality,
        placeholder=PlaceholderRange(wire.offset, wire.length),
        num_patches=wire.num_patches,
        grid_thw=tuple(wire.grid_thw),
        pixel_values=pixels,
        chunk=None if wire.chunk is None else VideoChunk(*wire.chunk),
        inputs_pending=wire.inputs_pending,
    )


def _video_to_wire(index: int, work: VideoWork) -> WireVideoJob:
    from spaceserve.multimodal.video.decode import IndexedVideo

    plan = work.plan
    source, packet_index = work.source, None
    if isinstance(source, IndexedVideo):
        source, packet_index = np.frombuffer(source.source, dtype=np.uint8), _index_to_wire(source.index)
    return WireVideoJob(
        feature_index=index,
        source=source,
        frame_indices=work.frame_indices,
        plan=(plan.num_frames, plan.resized_height, plan.resized_width, tuple(plan.grid_thw), plan.merge_size),
        mm_hash=work.mm_hash,
        chunks=[tuple(chunk) for chunk in work.chunks],
        packet_index=packet_index,
    )


def _video_from_wire(job: WireVideoJob) -> VideoWork:
    from spaceserve.multimodal.video.decode import IndexedVideo

    num_frames, height, width, grid, merge = job.plan
    plan = VideoPlan(num_frames, height, width, tuple(grid), merge)
    frame_indices = tuple(job.frame_indices) if job.frame_indices is not None else None
    source = job.source
    if job.packet_index is not None:
        source = IndexedVideo(np.asarray(source).tobytes(), _index_from_wire(job.packet_index))
    chunks = tuple((int(start), int(end)) for start, end in job.chunks)
    return VideoWork(source, frame_indices, plan, job.mm_hash, chunks)


def _index_to_wire(index) -> WirePacketIndex:
    packets = index.packets
    return WirePacketIndex(
        stream_index=index.stream_index,
        codec=index.codec,
        pix_fmt=index.pix_fmt,
        profile=index.profile,
        width=index.width,
        height=index.height,
        fps=index.fps,
        time_base=(index.time_base.numerator, index.time_base.denominator),
        pts=np.array([p.pts for p in packets], dtype=np.int64),
        dts=np.array([0 if p.dts is None else p.dts for p in packets], dtype=np.int64),
        has_dts=np.array([p.dts is not None for p in packets], dtype=np.bool_),
        is_keyframe=np.array([p.is_keyframe for p in packets], dtype=np.bool_),
        pts_by_frame=np.array(index.pts_by_frame, dtype=np.int64),
        keyframe_packets=np.array(index.keyframe_packets, dtype=np.int64),
        keyframe_frames=np.array(index.keyframe_frames, dtype=np.int64),
        open_gop=index.open_gop,
    )


def _index_from_wire(wire: WirePacketIndex):
    from spaceserve.multimodal.video.gop import PacketIndex, PacketInfo

    packets = tuple(
        PacketInfo(int(pts), int(dts) if has_dts else None, bool(key))
        for pts, dts, has_dts, key in zip(wire.pts.tolist(), wire.dts.tolist(), wire.has_dts.tolist(),
                                          wire.is_keyframe.tolist())
    )  # fmt: skip
    return PacketIndex(
        stream_index=wire.stream_index,
        codec=wire.codec,
        pix_fmt=wire.pix_fmt,
        profile=wire.profile,
        width=wire.width,
        height=wire.height,
        fps=wire.fps,
        time_base=Fraction(*wire.time_base),
        packets=packets,
        pts_by_frame=tuple(wire.pts_by_frame.tolist()),
        keyframe_packets=tuple(wire.keyframe_packets.tolist()),
        keyframe_frames=tuple(wire.keyframe_frames.tolist()),
        open_gop=wire.open_gop,
    )
