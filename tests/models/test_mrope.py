"""M-RoPE positions against transformers' get_rope_index, plus the video cases where transformers 5.17 deviates."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from spaceserve.core.errors import InvalidInputError
from spaceserve.models.config import ModelConfig
from spaceserve.models.mrope import mrope_positions, mrope_positions_for_config

transformers = pytest.importorskip("transformers")

PRESETS = Path(__file__).resolve().parents[2] / "spaceserve" / "models" / "presets"
ARCHITECTURES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


@lru_cache
def _config(preset: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(json.loads((PRESETS / preset / "config.json").read_text()))


@lru_cache
def _reference_model(preset: str) -> torch.nn.Module:
    raw = json.loads((PRESETS / preset / "config.json").read_text())
    if preset == "tiny-qwen2-vl":
        return transformers.Qwen2VLModel(transformers.Qwen2VLConfig(**raw))
    return transformers.Qwen2_5_VLModel(transformers.Qwen2_5_VLConfig(**raw))


def _prompt(config: ModelConfig, parts: list, seed: int = 0) -> list[int]:
    """parts: ints = that many random text tokens; ("image"|"video", grid) = an expanded placeholder block."""
    rng = random.Random(seed)
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += [rng.randrange(0, 256) for _ in range(part)]
            continue
        kind, (t, h, w) = part
        token = config.image_token_id if kind == "image" else config.video_token_id
        ids += [config.vision_start_token_id] + [token] * (t * h * w // 4) + [config.vision_end_token_id]
    return ids


def _grids(parts: list, kind: str) -> list[tuple[int, int, int]]:
    return [part[1] for part in parts if not isinstance(part, int) and part[0] == kind]


def _reference(preset: str, ids: list[int], images: list, videos: list, seconds: list | None):
    config = _config(preset)
    input_ids = torch.tensor([ids])
    token_types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
    kwargs = {"second_per_grid_ts": torch.tensor(seconds)} if seconds is not None else {}
    positions, deltas = _reference_model(preset).get_rope_index(
        input_ids,
        token_types,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        **kwargs,
    )
    return positions[:, 0], int(deltas.flatten()[0])


CASES = {
    "text_only": [17],
    "one_image": [5, ("image", (1, 6, 8)), 9],
    "three_images": [3, ("image", (1, 6, 8)), 4, ("image", (1, 4, 10)), 2, ("image", (1, 12, 6)), 6],
    "image_at_start": [("image", (1, 4, 6)), 8],
    "image_at_end": [7, ("image", (1, 10, 4))],
    "adjacent_images": [2, ("image", (1, 4, 4)), ("image", (1, 2, 6)), 3],
    # Temporal extent stays within the spatial one, so transformers 5.17 agrees with the reference rule.
    "video_and_images": [4, ("image", (1, 4, 6)), 3, ("video", (2, 6, 8)), 5, ("image", (1, 2, 2)), 2],
}


@pytest.mark.parametrize("preset", ARCHITECTURES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers_get_rope_index(preset: str, case: str) -> None:
    config = _config(preset)
    parts = CASES[case]
    ids = _prompt(config, parts)
    images, videos = _grids(parts, "image"), _grids(parts, "video")
    seconds = [1.0] * len(videos) if preset == "tiny-qwen2.5-vl" and videos else None
    positions, delta = mrope_positions_for_config(ids, images, videos, config, second_per_grid_ts=seconds)
    expected_positions, expected_delta = _reference(preset, ids, images, videos, seconds)
    assert positions.dtype == torch.int64 and positions.shape == (3, len(ids))
    assert torch.equal(positions, expected_positions)
    assert delta == expected_delta
    assert int(positions.max()) + 1 == len(ids) + delta


def test_qwen2_5_video_temporal_axis_scales_with_seconds_per_grid() -> None:
    config = _config("tiny-qwen2.5-vl")
    parts = [3, ("video", (3, 4, 4)), 2]
    ids = _prompt(config, parts)
    positions, delta = mrope_positions_for_config(ids, [], [(3, 4, 4)], config, second_per_grid_ts=[1.0])
    # Placeholders start at index 4 (3 text + vision_start): t = 4 + {0, 2, 4} (1 s/grid * 2 tokens/s).
    assert positions[0, 4:16].tolist() == [4] * 4 + [6] * 4 + [8] * 4
    assert positions[1, 4:16].tolist() == [4, 4, 5, 5] * 3
    assert positions[2, 4:16].tolist() == [4, 5, 4, 5] * 3
    # vision_end follows the largest id used (8); transformers 5.17 would restart at 4 + 2 = 6.
    assert positions[:, 16].tolist() == [9, 9, 9]
    assert delta == 9 + 3 - len(ids)


def test_qwen2_5_fractional_seconds_per_grid_are_scaled_before_truncation() -> None:
    config = _config("tiny-qwen2.5-vl")
    ids = _prompt(config, [("video", (4, 2, 2))])
    positions, delta = mrope_positions_for_config(ids, [], [(4, 2, 2)], config, second_per_grid_ts=[0.75])
    # 0.75 s * 2 tokens/s = 1.5 per grid -> floor(0, 1.5, 3, 4.5) = 0, 1, 3, 4 after start 1.
    assert positions[0, 1:5].tolist() == [1, 2, 4, 5]
    assert positions[:, 5].tolist() == [6, 6, 6]
    assert delta == 6 + 1 - len(ids)


def test_qwen2_vl_video_uses_frame_group_index() -> None:
    config = _config("tiny-qwen2-vl")
    ids = _prompt(config, [2, ("video", (3, 2, 4)), 1])
    positions, delta = mrope_positions_for_config(ids, [], [(3, 2, 4)], config, second_per_grid_ts=[5.0])
    assert positions[0, 3:9].tolist() == [3, 3, 4, 4, 5, 5]
    assert positions[:, 9].tolist() == [6, 6, 6]
    assert delta == 7 + 1 - len(ids)


def test_rejects_placeholder_count_mismatch() -> None:
    config = _config("tiny-qwen2-vl")
    ids = _prompt(config, [2, ("image", (1, 4, 4)), 2])
    with pytest.raises(InvalidInputError, match="needs 8 consecutive"):
        mrope_positions_for_config(ids, [(1, 4, 8)], [], config)
    with pytest.raises(InvalidInputError, match="grids use 2"):
        mrope_positions_for_config(ids, [(1, 2, 4)], [], config)
    ids_without_start = ids[:2] + ids[3:]
    with pytest.raises(InvalidInputError, match="vision_start"):
        mrope_positions_for_config(ids_without_start, [(1, 4, 4)], [], config)


def test_empty_prompt() -> None:
    positions, delta = mrope_positions(
        [], [], [], image_token_id=1, video_token_id=2, vision_start_token_id=3, spatial_merge_size=2
    )
    assert positions.shape == (3, 0) and delta == 0
