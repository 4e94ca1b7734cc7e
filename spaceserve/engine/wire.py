"""Requests across the process boundary: a Request (core/request.py) as the EngineCoreRequest message the front
sends, and back into a Request in the engine core. Only plain data crosses: ids, sampling parameters, image spans,
arrays (pixels, raw RGB, M-RoPE positions, video frames) and the plans of videos still to decode."""

from __future__ import annotations

from spaceserve.core.engine_messages import EngineCoreRequest, WireFeature, WireVideoJob
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange, RawImage
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
    return WireFeature(
        feature.mm_hash, feature.modality, span.offset, span.length, feature.num_patches, tuple(feature.grid_thw),
        pixels, raw,
    )


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
    )


def _video_to_wire(index: int, work: VideoWork) -> WireVideoJob:
    plan = work.plan
    return WireVideoJob(
        feature_index=index,
        source=work.source,
        frame_indices=work.frame_indices,
        plan=(plan.num_frames, plan.resized_height, plan.resized_width, tuple(plan.grid_thw), plan.merge_size),
        source_hw=tuple(work.source_hw),
        settings=[tuple(item) for item in work.settings],
    )


def _video_from_wire(job: WireVideoJob) -> VideoWork:
    num_frames, height, width, grid, merge = job.plan
    plan = VideoPlan(num_frames, height, width, tuple(grid), merge)
    settings = tuple((key, tuple(value) if isinstance(value, list) else value) for key, value in job.settings)
    frame_indices = tuple(job.frame_indices) if job.frame_indices is not None else None
    return VideoWork(job.source, frame_indices, plan, tuple(job.source_hw), settings)
