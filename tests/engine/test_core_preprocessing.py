"""Images preprocessed by the engine core on its device (gpu_preprocess_min_pixels): the pixels the encoder sees, and
therefore the tokens, equal those of preprocessing in the front, in process and across processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.multimodal import RawImage
from spaceserve.models.resolve import resolve_model
from spaceserve.multimodal.image import pixels_to_patches, preprocess_image, smart_resize
from tests.engine.test_multiplex import DEVICE, _mixed_prompts
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm

KWARGS = dict(max_model_len=1024, device=DEVICE, dtype="float32", kv_cache_memory_bytes=TEST_KV_CACHE_BYTES)


@pytest.mark.parametrize("seed", range(4))
def test_core_side_patches_equal_the_fronts(seed):
    cfg = resolve_model("Qwen/Qwen2-VL-2B-Instruct").image_config
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(30, 700, size=2))
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    front = preprocess_image(rgb, cfg)
    target = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    core = pixels_to_patches(torch.from_numpy(rgb).to(DEVICE), *target, cfg)
    assert torch.equal(core.cpu(), front.pixel_values)


@pytest.mark.parametrize("multiprocess", [False, True])
def test_tokens_equal_with_images_preprocessed_in_the_core(multiprocess):
    prompts = _mixed_prompts(seed=17, count=8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    front = make_llm("tiny-qwen2-vl", **KWARGS)
    expected = [o.outputs[0].token_ids for o in front.generate(prompts, params)]
    core = make_llm("tiny-qwen2-vl", gpu_preprocess_min_pixels=0, multiprocess=multiprocess, **KWARGS)
    try:
        request = core.llm_engine.input_processor.process("probe", prompts[1], params)
        assert isinstance(request.mm_features[0].pixel_values, RawImage)
        assert [o.outputs[0].token_ids for o in core.generate(prompts, params)] == expected
        core.llm_engine.check_idle_integrity()
    finally:
        core.llm_engine.shutdown()


def test_bad_pixel_limits_are_refused_in_the_front_for_core_preprocessing_too():
    llm = make_llm("tiny-qwen2-vl", gpu_preprocess_min_pixels=0, **KWARGS)
    prompt = {
        "prompt": "<|vision_start|><|image_pad|><|vision_end|>",
        "multi_modal_data": {"image": np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)},
        "mm_processor_kwargs": {"min_pixels": 5000, "max_pixels": 100},
    }
    with pytest.raises(InvalidInputError, match="min_pixels"):
        llm.llm_engine.add_request(prompt)
