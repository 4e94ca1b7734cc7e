"""Greedy tokens are identical with the torch and the Triton attention backends on the tiny parity checkpoints
(float32): text and images, batches that mix prefill and decode, chunked prefill and prefix-cache hits.

Without CUDA the Triton kernels run under the interpreter, which takes tens of seconds per engine, so one case
runs there and the rest are marked gpu."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from tests.engine.parity import random_image, random_prompt
from tests.llm_factory import make_llm
from tests.tiny_checkpoints import make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

pytest.importorskip("triton")

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
CHUNKED = {"max_num_batched_tokens": 7, "encoder_cache_tokens": 256, "block_size": 4}
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, str] = {}

    def checkpoint(architecture: str) -> str:
        if architecture not in made:
            path = make_tiny_checkpoint(tmp_path_factory.mktemp(architecture), architecture, seed=random.randrange(1000))
            write_tiny_tokenizer(path)
            made[architecture] = str(path)
        return made[architecture]

    return checkpoint


def _prompts():
    rng = np.random.default_rng(random.randrange(2**31))
    prompts = []
    for sizes in ([], [(70, 95)], [(37, 130), (90, 61)]):
        images = [random_image(rng, h, w) for h, w in sizes]
        ids = random_prompt(rng, len(images), text_len=int(rng.integers(5, 30)))
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
    return prompts


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize(
    ("architecture", "engine_args"),
    [
        pytest.param("qwen2_vl", CHUNKED, id="qwen2_vl-chunked-prefill"),
        pytest.param("qwen2_5_vl", CHUNKED, id="qwen2_5_vl-chunked-prefill", marks=gpu_only),
        pytest.param("qwen2_vl", {}, id="qwen2_vl-whole-prompts", marks=gpu_only),
        pytest.param("qwen2_5_vl", {}, id="qwen2_5_vl-whole-prompts", marks=gpu_only),
    ],
)
def test_triton_backend_gives_the_torch_backend_tokens(checkpoints, architecture, engine_args):
    path, prompts = checkpoints(architecture), _prompts()
    expected = _tokens(make_llm(path, attention_backend="torch", **engine_args), prompts)
    llm = make_llm(path, attention_backend="triton", **engine_args)
    assert _tokens(llm, prompts) == expected
    # again, now hitting the prefix cache, and in another batch order
    assert _tokens(llm, prompts[::-1]) == expected[::-1]
    llm.llm_engine.check_idle_integrity()
