"""M-RoPE position ids (temporal, height, width) for one Qwen2-VL / Qwen2.5-VL prompt.

Text tokens advance all three axes together. The ``t*h*w/merge**2`` placeholder tokens of an image or video
share one start position and spread over a (t, h/merge, w/merge) grid; the next text token starts one past the
largest position the item used, so a generated token at sequence index i sits at i + delta on every axis.

Temporal ids follow Qwen's reference (the code the checkpoints were trained with, also vLLM's): Qwen2-VL uses the
frame-group index; Qwen2.5-VL uses floor(index * second_per_grid_t * tokens_per_second) for videos and 0 for
images. transformers 5.17 deviates for videos only: it truncates second_per_grid_t to an int before scaling and
starts the following text at max(h, w)/merge past the item, ignoring the temporal extent. For images (t = 1)
and short videos with whole-second grids all agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import QWEN2_5_VL, ModelConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class _VisionItem:
    start: int  # index of the item's first placeholder token
    grid: Grid
    # (seconds per temporal grid step, tokens per second); None: plain frame-group index (Qwen2-VL).
    temporal_scale: tuple[float, int] | None


def mrope_positions(
    input_ids: Sequence[int],
    image_grid_thw: Sequence[Grid],
    video_grid_thw: Sequence[Grid],
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: int | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """(positions [3, L] int64, delta) for an expanded prompt.

    ``tokens_per_second`` set selects the Qwen2.5-VL temporal rule; ``second_per_grid_ts`` gives each video's
    seconds per temporal grid step (default 1.0). Grids are listed in prompt order, per modality.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.int64)
    image_scales: list[tuple[float, int] | None] = [None] * len(image_grid_thw)
    video_scales: list[tuple[float, int] | None] = [None] * len(video_grid_thw)
    if tokens_per_second is not None:
        seconds = [1.0] * len(video_grid_thw) if second_per_grid_ts is None else [float(s) for s in second_per_grid_ts]
        if len(seconds) != len(video_grid_thw):
            raise InvalidInputError(f"{len(seconds)} second_per_grid_ts for {len(video_grid_thw)} videos")
        image_scales = [(0.0, tokens_per_second)] * len(image_grid_thw)
        video_scales = [(s, tokens_per_second) for s in seconds]
    placeholders = {"vision_start_token_id": vision_start_token_id, "merge": spatial_merge_size}
    items = _locate_items(ids, image_grid_thw, image_scales, image_token_id, "image", **placeholders)
    items += _locate_items(ids, video_grid_thw, video_scales, video_token_id, "video", **placeholders)
    items.sort(key=lambda item: item.start)

    chunks: list[torch.Tensor] = []
    next_position = 0
    cursor = 0
    for item in items:
        chunks.append(_text_positions(item.start - cursor, next_position))
        next_position += item.start - cursor
        grid_positions = _grid_positions(item, spatial_merge_size) + next_position
        chunks.append(grid_positions)
        next_position = int(grid_positions.max()) + 1
        cursor = item.start + grid_positions.shape[1]
    chunks.append(_text_positions(len(ids) - cursor, next_position))
    next_position += len(ids) - cursor
    return torch.cat(chunks, dim=1), next_position - len(ids)


def mrope_positions_for_config(
    input_ids: Sequence[int],
    image_grid_thw: Sequence[Grid],
    video_grid_thw: Sequence[Grid],
    config: ModelConfig,
    second_per_grid_ts: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """``mrope_positions`` with the token ids and temporal rule taken from a model's config."""
    return mrope_positions(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
        tokens_per_second=config.vision.tokens_per_second if config.architecture == QWEN2_5_VL else None,
        second_per_grid_ts=second_per_grid_ts,
    )


def _text_positions(length: int, first: int) -> torch.Tensor:
    return torch.arange(first, first + length, dtype=torch.int64).expand(3, -1)


def _grid_positions(item: _VisionItem, merge: int) -> torch.Tensor:
    t, h, w = item.grid[0], item.grid[1] // merge, item.grid[2] // merge
    steps = torch.arange(t, dtype=torch.int64)
    if item.temporal_scale is not None:
        # Same float32 product order and truncation as the reference: the scaled step can be fractional.
        seconds, tokens_per_second = item.temporal_scale
        steps = (steps * torch.tensor(seconds, dtype=torch.float32) * tokens_per_second).long()
    temporal = steps.view(t, 1, 1).expand(t, h, w)
    rows = torch.arange(h, dtype=torch.int64).view(1, h, 1).expand(t, h, w)
    cols = torch.arange(w, dtype=torch.int64).view(1, 1, w).expand(t, h, w)
    return torch.stack([temporal, rows, cols]).reshape(3, -1)


def _locate_items(
    ids: torch.Tensor,
    grids: Sequence[Grid],
    temporal_scales: Sequence[tuple[float, int] | None],
    token_id: int,
    kind: str,
    *,
    vision_start_token_id: int,
    merge: int,
) -> list[_VisionItem]:
    """Match grids, in order, to runs of placeholder tokens; each run must directly follow <|vision_start|>."""
    token_positions = (ids == token_id).nonzero().flatten().tolist()
    items: list[_VisionItem] = []
    consumed = 0
    for index, (grid, temporal_scale) in enumerate(zip(grids, temporal_scales)):
        t, h, w = (int(x) for x in grid)
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise InvalidInputError(f"{kind} {index} grid {(t, h, w)}: h and w must be positive multiples of {merge}")
        count = t * h * w // (merge * merge)
        run = token_positions[consumed : consumed + count]
        if len(run) < count or run[-1] - run[0] != count - 1:
            raise InvalidInputError(
                f"{kind} {index} grid {(t, h, w)} needs {count} consecutive placeholder tokens in the prompt"
            )
        if run[0] == 0 or int(ids[run[0] - 1]) != vision_start_token_id:
            raise InvalidInputError(f"{kind} {index} placeholder tokens are not preceded by <|vision_start|>")
        items.append(_VisionItem(run[0], (t, h, w), temporal_scale))
        consumed += count
    if consumed != len(token_positions):
        raise InvalidInputError(
            f"prompt has {len(token_positions)} {kind} placeholder tokens, the {len(grids)} {kind} grids use {consumed}"
        )
    return items
