import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spaceserve.bench.workloads import (
    WORKLOADS,
    IntRange,
    PromptTextMaker,
    WorkloadOptions,
    build_workload,
    parse_image_sizes,
    register_workload,
)
from spaceserve.models.resolve import resolve_model
from spaceserve.tokenizer import HFTokenizer, load_tokenizer
from tests.tiny_tokenizer import write_tiny_tokenizer

SIZES = ((56, 56), (112, 84), (84, 140))


@pytest.fixture(scope="module")
def byte_tokenizer():
    resolved = resolve_model("tiny-qwen2-vl")
    return load_tokenizer(resolved.directory, resolved.model_config)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(Path(directory))
    return HFTokenizer.from_dir(directory)


def _options(**overrides) -> WorkloadOptions:
    values = {"num_requests": 12, "seed": random.randrange(1 << 30), "image_sizes": SIZES}
    values.update(overrides)
    return WorkloadOptions(**values)


def test_same_options_give_identical_requests(byte_tokenizer):
    options = _options(prompt_len=IntRange(8, 40), output_len=IntRange(2, 30))
    maker = PromptTextMaker(byte_tokenizer)
    first = build_workload("image-mix", options, maker)
    assert first == build_workload("image-mix", options, maker)
    other = build_workload("image-mix", _options(seed=options.seed + 1), maker)
    assert [s.prompt_text for s in first] != [s.prompt_text for s in other]
    assert [s.media[0].data for s in first] != [s.media[0].data for s in other]
    assert len({s.prompt_text for s in first}) == len(first)  # no two requests share a prompt


def test_image_mix_images_are_distinct_decodable_and_not_blank(byte_tokenizer):
    specs = build_workload("image-mix", _options(num_requests=20), PromptTextMaker(byte_tokenizer))
    assert all(len(s.media) == 1 for s in specs)
    assert len({s.media[0].data for s in specs}) == len(specs)
    assert {(s.media[0].width, s.media[0].height) for s in specs} == set(SIZES)  # 20 draws cover 3 buckets
    for spec in specs:
        item = spec.media[0]
        image = Image.open(io.BytesIO(item.data))
        assert image.format == "JPEG" and item.mime_type == "image/jpeg"
        assert image.size == (item.width, item.height)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def test_png_images(byte_tokenizer):
    spec = build_workload("image-mix", _options(num_requests=1, image_format="png"), PromptTextMaker(None))[0]
    assert Image.open(io.BytesIO(spec.media[0].data)).format == "PNG" and spec.media[0].mime_type == "image/png"


def test_text_only_is_image_mix_without_images(byte_tokenizer):
    options = _options(prompt_len=IntRange(4, 64), output_len=IntRange(1, 50))
    maker = PromptTextMaker(byte_tokenizer)
    images = build_workload("image-mix", options, maker)
    text = build_workload("text-only", options, maker)
    assert [(s.index, s.prompt_text, s.output_len) for s in text] == [
        (s.index, s.prompt_text, s.output_len) for s in images
    ]
    assert all(s.media == () for s in text)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_prompts_have_the_requested_token_count(which, byte_tokenizer, bpe_tokenizer):
    tokenizer = byte_tokenizer if which == "byte" else bpe_tokenizer
    options = _options(num_requests=30, prompt_len=IntRange(1, 300))
    specs = build_workload("text-only", options, PromptTextMaker(tokenizer))
    lengths = [len(tokenizer.encode(s.prompt_text)) for s in specs]
    rng = np.random.default_rng  # the builder draws the length first from each request's text stream
    expected = [options.prompt_len.draw(rng([options.seed, s.index, 0])) for s in specs]
    assert lengths == expected and len(set(lengths)) > 5


def test_custom_draws_counts_and_lengths_within_ranges(byte_tokenizer):
    options = _options(
        num_requests=40, images_per_request=IntRange(0, 3), prompt_len=IntRange(5, 9), output_len=IntRange(3, 6)
    )
    specs = build_workload("custom", options, PromptTextMaker(byte_tokenizer))
    counts = [len(s.media) for s in specs]
    assert set(counts) == {0, 1, 2, 3}
    assert all(3 <= s.output_len <= 6 for s in specs)
    assert all(5 <= len(byte_tokenizer.encode(s.prompt_text)) <= 9 for s in specs)


def test_image_mix_refuses_other_image_counts():
    with pytest.raises(ValueError, match="custom"):
        build_workload("image-mix", _options(images_per_request=IntRange(2, 2)), PromptTextMaker(None))


def test_registry_and_option_parsing():
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("nope", _options(), PromptTextMaker(None))
    with pytest.raises(ValueError, match="already registered"):
        register_workload("image-mix")(WORKLOADS["custom"])
    assert {"image-mix", "text-only", "custom"} <= set(WORKLOADS)
    assert parse_image_sizes("448x448, 896X672") == ((448, 448), (896, 672))
    assert IntRange.parse("32:128") == IntRange(32, 128) and IntRange.parse("7") == IntRange(7, 7)
    for bad in ("448", "0x10", "axb"):
        with pytest.raises(ValueError):
            parse_image_sizes(bad)
    for bad in ("9:3", "x", "-1"):
        with pytest.raises(ValueError):
            IntRange.parse(bad)
    with pytest.raises(ValueError):
        WorkloadOptions(num_requests=1, output_len=IntRange(0, 0))
