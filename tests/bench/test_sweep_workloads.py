"""The capacity sweep's workloads: aspect-mix (0-3 non-square images) and multi-image-skew (the TWSRFT study)."""

import collections
import io

import pytest
from PIL import Image

from spaceserve.bench.workloads import (
    ASPECT_MIX_SIZES,
    SKEW_HEAVY_SIZES,
    SKEW_LIGHT_SIZES,
    IntRange,
    PromptTextMaker,
    WorkloadOptions,
    build_workload,
)


def test_aspect_mix_draws_zero_to_three_non_square_images_with_text_only_prompts():
    options = WorkloadOptions(60, seed=11, prompt_len=IntRange(16, 64), output_len=IntRange(8, 32))
    specs = build_workload("aspect-mix", options, PromptTextMaker(None))
    counts = collections.Counter(len(s.media) for s in specs)
    assert set(counts) == {0, 1, 2, 3}
    assert counts[1] > counts[3] and counts[0] > 0.1 * len(specs)
    sizes = {(m.width, m.height) for s in specs for m in s.media}
    assert sizes <= set(ASPECT_MIX_SIZES) and len(sizes) >= 6
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)
    item = next(m for s in specs for m in s.media)
    assert Image.open(io.BytesIO(item.data)).size == (item.width, item.height)
    text_only = build_workload("text-only", options, PromptTextMaker(None))
    assert [(s.prompt_text, s.output_len) for s in specs] == [(s.prompt_text, s.output_len) for s in text_only]
    again = build_workload("aspect-mix", options, PromptTextMaker(None))
    assert [s.media for s in again] == [s.media for s in specs]


def test_multi_image_skew_mixes_light_and_heavy_requests():
    specs = build_workload("multi-image-skew", WorkloadOptions(60, seed=5), PromptTextMaker(None))
    light = [s for s in specs if len(s.media) == 1]
    heavy = [s for s in specs if len(s.media) > 1]
    assert 0.5 < len(light) / len(specs) < 0.8 and {len(s.media) for s in heavy} == {3, 4}
    assert all((m.width, m.height) in SKEW_LIGHT_SIZES for s in light for m in s.media)
    assert all((m.width, m.height) in SKEW_HEAVY_SIZES for s in heavy for m in s.media)


@pytest.mark.parametrize("name", ["aspect-mix", "multi-image-skew"])
def test_their_image_options_are_their_own(name):
    with pytest.raises(ValueError, match="custom"):
        build_workload(name, WorkloadOptions(2, image_sizes=((64, 64),)), PromptTextMaker(None))
    with pytest.raises(ValueError, match="custom"):
        build_workload(name, WorkloadOptions(2, images_per_request=IntRange(0, 2)), PromptTextMaker(None))
