"""Bad input gets a clear error naming the problem; requests already in the engine finish unchanged."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from spaceserve import SamplingParams
from tests.llm_factory import make_llm
from spaceserve.core.errors import InvalidInputError

PAD = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-qwen2-vl", max_model_len=512, limit_mm_per_prompt={"image": 2}, encoder_cache_tokens=200)


def image(seed=0, size=(60, 80)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png_bytes(height, width):
    buffer = io.BytesIO()
    Image.fromarray(image(1, (height, width))).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_PROMPTS = {
    "wrong image type": ({"prompt": PAD, "multi_modal_data": {"image": 42}}, "got int"),
    "corrupt bytes": ({"prompt": PAD, "multi_modal_data": {"image": b"\x89PNG not really"}}, "image"),
    "missing file": ({"prompt": PAD, "multi_modal_data": {"image": "/no/such/file.png"}}, "file.png"),
    "aspect ratio": ({"prompt": PAD, "multi_modal_data": {"image": png_bytes(2, 600)}}, "aspect ratio"),
    "too many images": ({"prompt": PAD * 3, "multi_modal_data": {"image": [image(1), image(2), image(3)]}}, "limit"),
    "placeholder mismatch": ({"prompt": PAD * 2, "multi_modal_data": {"image": image()}}, "placeholders"),
    "image without placeholder": ({"prompt": "hi", "multi_modal_data": {"image": image()}}, "placeholders"),
    "prompt over the context": ("x" * 600, "max_model_len"),
    "token id out of vocab": ({"prompt_token_ids": [1, 2, 100000]}, "100000"),
    "empty prompt": ("", "empty"),
    "unknown modality": ({"prompt": "hi", "multi_modal_data": {"audio": b"x"}}, "audio"),
    "image bigger than the encoder cache": (
        {"prompt": PAD, "multi_modal_data": {"image": image(4, (600, 600))}},
        "encoder cache",
    ),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_request_is_rejected_while_others_keep_running(llm, name):
    prompt, message = BAD_PROMPTS[name]
    engine = llm.llm_engine
    good = [{"prompt": "hello " + PAD, "multi_modal_data": {"image": image(7)}}, "plain text prompt"]
    expected = [o.outputs[0].token_ids for o in llm.generate(good, GREEDY)]

    requests = [engine.add_request(p, GREEDY) for p in good]
    engine.step()
    with pytest.raises(InvalidInputError, match=message):
        engine.add_request(prompt, GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert [finished[r.request_id].outputs[0].token_ids for r in requests] == expected
    engine.check_idle_integrity()
    assert not engine.core.encoder_stage.scheduler.has_work


def test_generate_names_the_bad_prompt_and_queues_nothing(llm):
    with pytest.raises(InvalidInputError, match="prompt 1"):
        llm.generate(["fine", {"prompt": PAD, "multi_modal_data": {"image": "nope.png"}}], GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()
    llm.llm_engine.check_idle_integrity()


def test_invalid_sampling_values_are_named():
    for kwargs, message in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(InvalidInputError, match=message):
            SamplingParams(**kwargs)
