"""Log-probabilities: each generated token's, and the top ones, equal those of a teacher-forced prefill of the same
tokens (decode steps and prefills agree), and n > 1 fans out offline as on the server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spaceserve import SamplingParams
from tests.llm_factory import make_llm


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-qwen2-vl", max_model_len=256, dtype="float32")  # CUDA graphs on a GPU, eager on CPU


def test_decode_logprobs_equal_a_teacher_forced_prefill(llm):
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, 250, size=9)]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, logprobs=4, ignore_eos=True), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for step, token in enumerate(completion.token_ids):
        forced = llm.generate(
            {"prompt_token_ids": prompt + completion.token_ids[:step]},
            SamplingParams(temperature=0, max_tokens=1, logprobs=4, ignore_eos=True), use_tqdm=False,
        )[0].outputs[0]
        expected = forced.logprobs[0]
        got = completion.logprobs[step]
        assert forced.token_ids[0] == token and got[token].rank == 1
        assert set(got) == set(expected)
        for token_id, entry in got.items():
            assert math.isclose(entry.logprob, expected[token_id].logprob, abs_tol=1e-4)
        values = sorted((e.logprob for e in got.values()), reverse=True)
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_sampled_token_rank_and_value_for_random_sampling(llm):
    out = llm.generate("rank me", SamplingParams(temperature=1.5, seed=3, max_tokens=8, logprobs=0, ignore_eos=True), use_tqdm=False)[0]
    completion = out.outputs[0]
    for token, step in zip(completion.token_ids, completion.logprobs):
        assert list(step) == [token] and step[token].rank >= 1 and step[token].logprob <= 0


def test_n_fans_out_with_derived_seeds(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=5, ignore_eos=True)
    merged = llm.generate("fan out", params, use_tqdm=False)[0]
    singles = [
        llm.generate("fan out", SamplingParams(temperature=1.0, seed=21 + i, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
        for i in range(3)
    ]
    assert [c.index for c in merged.outputs] == [0, 1, 2]
    assert [c.token_ids for c in merged.outputs] == [s.outputs[0].token_ids for s in singles]
    with pytest.raises(Exception, match="n=2 is fanned out"):
        llm.llm_engine.add_request("direct", SamplingParams(n=2))
