"""Greedy parity with transformers for prompts with videos (alone, several, and mixed with an image) on tiny
random checkpoints of both architectures: same frames in, same tokens out. Also checks our video rows equal the
reference preprocessing, so a mismatch points at the model side rather than the pixels."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from spaceserve import SamplingParams
from tests.engine.parity import (
    IMAGE_PAD,
    MAX_NEW_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    random_frames,
    random_image,
    reference_generate_mm,
    reference_processor,
    reference_video_inputs,
)
from tests.engine.video_helpers import whole_videos
from tests.llm_factory import make_llm
from tests.tiny_checkpoints import load_reference_model, make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

# transformers' reference runs on the CPU in float32 (and its video rows are the CPU's uint8 resize); our engine
# runs there too so rows and greedy tokens compare exactly (a CUDA engine resizes in float32, as torchvision does)
ENGINE_DEVICE = "cpu"
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
# the tiny image limits, so a request's min/max_pixels leave its images as the reference processes them
PIXELS = {"min_pixels": 3136, "max_pixels": 200704}
# (frames, height, width) per video, then whether an image sits between them. Frame counts keep the temporal
# extent within the spatial one, where transformers 5.17's M-RoPE agrees with Qwen's (see models/mrope.py).
CASES = {
    "one video": ([(4, 100, 130)], False),
    "odd frame count": ([(5, 90, 150)], False),
    "video and image": ([(4, 100, 130)], True),
    "two videos and an image": ([(4, 64, 120), (6, 140, 110)], True),
}


def _prompt(rng: np.random.Generator, num_videos: int, with_image: bool) -> list[int]:
    text = lambda: [int(t) for t in rng.integers(0, 256, 7)]  # noqa: E731
    ids = text()
    for index in range(num_videos):
        ids += [VISION_START, VIDEO_PAD, VISION_END] + text()
        if with_image and index == 0:
            ids += [VISION_START, IMAGE_PAD, VISION_END] + text()
    return ids


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def case(request, tmp_path_factory):
    architecture = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(architecture), architecture, seed=23)
    write_tiny_tokenizer(path)
    reference = load_reference_model(path)
    image_processor = reference_processor()
    rng = np.random.default_rng(17)
    prompts, expected, video_rows = [], [], []
    for shapes, with_image in CASES.values():
        videos = [random_frames(rng, *shape) for shape in shapes]
        images = [random_image(rng, 70, 95)] if with_image else []
        ids = _prompt(rng, len(videos), with_image)
        video_inputs = [reference_video_inputs(frames, **PIXELS) for frames in videos]
        image_inputs = None
        if images:
            processed = image_processor(images)
            image_inputs = (processed["pixel_values"], processed["image_grid_thw"])
        # given frames are taken at the default 2 fps: 2 frames per temporal patch is 1 s per grid step
        seconds = [1.0] * len(videos) if architecture == "qwen2_5_vl" else None
        expected.append(reference_generate_mm(reference, ids, image_inputs, video_inputs, seconds))
        mm_data = {"video": videos} | ({"image": images} if images else {})
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": mm_data, "mm_processor_kwargs": PIXELS})
        video_rows.append(video_inputs)
    assert len({t for tokens in expected for t in tokens}) > 5, "the checkpoint should not repeat one token"
    return path, prompts, expected, video_rows


def _tokens(outputs):
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("index", range(len(CASES)), ids=list(CASES))
def test_video_prompt_matches_transformers(case, index):
    path, prompts, expected, video_rows = case
    llm = make_llm(str(path), device=ENGINE_DEVICE)
    engine = llm.llm_engine
    request = engine.add_request(prompts[index], GREEDY, request_id="video")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    for (our_grid, our_rows), (rows, grid) in zip(whole_videos(request), video_rows[index], strict=True):
        assert list(our_grid) == grid
        assert our_rows.equal(rows)
    assert _tokens(outputs) == [expected[index]]
    engine.check_idle_integrity()


def test_batch_of_video_prompts_with_small_chunks_matches_transformers(case):
    path, prompts, expected, _ = case
    llm = make_llm(str(path), device=ENGINE_DEVICE, max_num_batched_tokens=16, block_size=4)
    assert _tokens(llm.generate(prompts[::-1] + prompts, GREEDY)) == expected[::-1] + expected
    llm.llm_engine.check_idle_integrity()


@functools.cache
def _rope_reference(architecture: str):
    import transformers

    from tests.tiny_checkpoints import preset_config

    config_class, model_class = {
        "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLModel),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLModel),
    }[architecture]
    return model_class(config_class(**preset_config(architecture)))


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("seconds_per_grid", [1.0, 2.0, 3.0])
def test_mrope_positions_equal_transformers_for_whole_second_grids(architecture, seconds_per_grid):
    """Where transformers 5.17 agrees with Qwen's rule (whole seconds per grid step, temporal extent inside the
    spatial one; models/mrope.py documents the fractional case where we follow Qwen/vLLM instead)."""
    import torch

    from spaceserve.models.config import ModelConfig
    from spaceserve.models.mrope import mrope_positions_for_config
    from tests.tiny_checkpoints import preset_config

    raw = preset_config(architecture)
    reference = _rope_reference(architecture)
    rng = np.random.default_rng(int(seconds_per_grid))
    video_grids, image_grids = [(2, 16, 12), (3, 20, 28)], [(1, 6, 8)]
    ids = _prompt(rng, len(video_grids), with_image=True)
    expanded, video_iter, image_iter = [], iter(video_grids), iter(image_grids)
    for token in ids:
        grid = next(video_iter) if token == VIDEO_PAD else next(image_iter) if token == IMAGE_PAD else None
        expanded += [token] * (1 if grid is None else int(np.prod(grid)) // 4)
    seconds = [seconds_per_grid] * len(video_grids)
    ours, delta = mrope_positions_for_config(expanded, image_grids, video_grids, ModelConfig.from_hf_dict(raw), seconds)
    input_ids = torch.tensor([expanded])
    kwargs = {"second_per_grid_ts": torch.tensor(seconds)} if architecture == "qwen2_5_vl" else {}
    theirs, their_delta = reference.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE_PAD).int() + 2 * (input_ids == VIDEO_PAD).int(),
        image_grid_thw=torch.tensor(image_grids),
        video_grid_thw=torch.tensor(video_grids),
        **kwargs,
    )
    assert torch.equal(ours, theirs[:, 0]) and delta == int(their_delta)
