"""Greedy token ids equal transformers' generate() on tiny random checkpoints, across batch compositions,
preemption, chunked prefill through an image's span, and prefix-cache hits."""

from __future__ import annotations

import numpy as np
import pytest

from spaceserve import SamplingParams
from tests.llm_factory import make_llm
from tests.engine.parity import MAX_NEW_TOKENS, random_image, random_prompt, reference_generate, reference_processor
from tests.tiny_checkpoints import load_reference_model, make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

# transformers' reference runs on the CPU in float32; our engine runs there too so greedy tokens compare exactly
# (GPU parity of the engine is checked against its torch path in tests/layers and tests/runtime)
ENGINE_DEVICE = "cpu"
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
IMAGE_SIZES = {"text only": [], "one image": [(70, 95)], "three odd images": [(37, 130), (90, 61), (151, 47)]}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def case(request, tmp_path_factory):
    """A checkpoint, its prompts with images, and transformers' greedy continuation of each."""
    architecture = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(architecture), architecture, seed=11)
    write_tiny_tokenizer(path)
    reference = load_reference_model(path)
    processor = reference_processor()
    rng = np.random.default_rng(5)
    prompts, expected = [], []
    for sizes in IMAGE_SIZES.values():
        images = [random_image(rng, h, w) for h, w in sizes]
        ids = random_prompt(rng, len(images))
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
        expected.append(reference_generate(reference, processor, ids, images))
    assert len({t for tokens in expected for t in tokens}) > 5, "the checkpoint should not repeat one token"
    return path, prompts, expected


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("index", range(len(IMAGE_SIZES)), ids=list(IMAGE_SIZES))
def test_single_prompt_matches_transformers(case, index):
    path, prompts, expected = case
    llm = make_llm(str(path), device=ENGINE_DEVICE)
    assert _tokens(llm.generate(prompts[index], GREEDY)) == [expected[index]]


def test_mixed_batch_matches_transformers(case):
    path, prompts, expected = case
    llm = make_llm(str(path), device=ENGINE_DEVICE)
    assert _tokens(llm.generate(prompts[::-1] + prompts, GREEDY)) == expected[::-1] + expected


def test_preemption_keeps_tokens_identical(case):
    path, prompts, expected = case
    llm = make_llm(str(path), device=ENGINE_DEVICE, num_gpu_blocks_override=14, block_size=8)
    outputs = llm.generate(prompts * 3, GREEDY)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert _tokens(outputs) == expected * 3
    llm.llm_engine.check_idle_integrity()


def test_chunked_prefill_through_an_image_span_keeps_tokens_identical(case):
    path, prompts, expected = case
    llm = make_llm(str(path), device=ENGINE_DEVICE, max_num_batched_tokens=7, encoder_cache_tokens=256)
    assert _tokens(llm.generate(prompts, GREEDY)) == expected


def test_prefix_cache_hits_keep_tokens_identical(case):
    path, prompts, expected = case
    llm = make_llm(str(path), device=ENGINE_DEVICE, block_size=4)
    assert _tokens(llm.generate(prompts, GREEDY)) == expected
    stats = llm.llm_engine.core.kv_manager.prefix_cache_stats
    hits_before = stats.hits
    assert _tokens(llm.generate(prompts, GREEDY)) == expected
    assert stats.hits > hits_before
    llm.llm_engine.check_idle_integrity()


def test_sharded_checkpoint_with_nested_text_config_loads_identically(case, tmp_path):
    path, prompts, expected = case
    architecture = "qwen2_5_vl" if "qwen2_5_vl" in path.name else "qwen2_vl"
    sharded = make_tiny_checkpoint(tmp_path / "sharded", architecture, seed=11, sharded=True, nested_text_config=True)
    write_tiny_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert _tokens(make_llm(str(sharded), device=ENGINE_DEVICE).generate(prompts, GREEDY)) == expected


def test_text_prompt_goes_through_the_checkpoint_tokenizer(case):
    from transformers import AutoTokenizer

    path, prompts, _ = case
    text = "Describe <|vision_start|><|image_pad|><|vision_end|> en détail, s'il vous plaît."
    reference_ids = AutoTokenizer.from_pretrained(path).encode(text)
    llm = make_llm(str(path), device=ENGINE_DEVICE)
    assert llm.get_tokenizer().encode(text) == reference_ids
    images = prompts[1]["multi_modal_data"]["image"]
    expected = reference_generate(load_reference_model(path), reference_processor(), reference_ids, images)
    outputs = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, GREEDY)
    assert _tokens(outputs) == [expected]
