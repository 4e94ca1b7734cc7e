"""How a video is cut into chunks of temporal patches, the unit the decode stage, the encoder and the LM pipeline on.

A chunk is a run of whole temporal patches (never half of a `temporal_patch_size` frame group), so its embeddings
are its own (see core/multimodal.py). The first chunk is one temporal patch, so the encoder and the LM can start as
soon as the first frames are decoded; each next chunk is twice the one before, up to `max_chunk_tokens`, so a long
video is a handful of encoder items rather than one per patch. The chunk plan depends only on the video's grid and
the setting, and a chunk's cache key on the video's content hash and its temporal range, so the same video always
gives the same chunks and the encoder and prefix caches serve them across requests.
"""

from __future__ import annotations

import hashlib

from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange, VideoChunk


def plan_video_chunks(grid_t: int, tokens_per_patch: int, max_chunk_tokens: int) -> tuple[tuple[int, int], ...]:
    """Temporal-patch ranges [t_start, t_end) that cover [0, grid_t) in order. max_chunk_tokens=0: one chunk."""
    if grid_t < 1 or tokens_per_patch < 1 or max_chunk_tokens < 0:
        raise ValueError(f"bad chunking of {grid_t} patches of {tokens_per_patch} tokens by {max_chunk_tokens}")
    if max_chunk_tokens == 0:
        return ((0, grid_t),)
    largest = max(1, max_chunk_tokens // tokens_per_patch)
    ranges, start, size = [], 0, 1
    while start < grid_t:
        end = min(grid_t, start + size)
        ranges.append((start, end))
        start, size = end, min(2 * size, largest)
    return tuple(ranges)


def video_chunk_hash(video_hash: str, t_start: int, t_end: int) -> str:
    """The encoder-cache key of temporal patches [t_start, t_end) of the video with content hash `video_hash`."""
    return hashlib.sha256(f"spaceserve-video-chunk:{video_hash}:{t_start}:{t_end}".encode()).hexdigest()


def video_chunk_features(
    video_hash: str,
    offset: int,
    grid_thw: tuple[int, int, int],
    merge_size: int,
    ranges: tuple[tuple[int, int], ...],
) -> list[MultiModalFeature]:
    """The features of one video whose `<|video_pad|>` run starts at `offset`, one per chunk of `ranges`
    (`plan_video_chunks`), in order, each waiting for its pixel values (the decode stage makes them)."""
    _, grid_h, grid_w = grid_thw
    patches_per_t = grid_h * grid_w
    tokens_per_t = patches_per_t // merge_size**2
    features = []
    for index, (t_start, t_end) in enumerate(ranges):
        num_t = t_end - t_start
        features.append(
            MultiModalFeature(
                mm_hash=video_chunk_hash(video_hash, t_start, t_end),
                modality="video",
                placeholder=PlaceholderRange(offset + t_start * tokens_per_t, num_t * tokens_per_t),
                num_patches=num_t * patches_per_t,
                grid_thw=(num_t, grid_h, grid_w),
                chunk=VideoChunk(video_hash, index, len(ranges), t_start, t_end),
                inputs_pending=True,
            )
        )
    return features
