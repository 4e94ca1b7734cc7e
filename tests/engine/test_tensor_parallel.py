"""Tensor parallelism on the CPU (gloo, rank 1 in a spawned process): greedy tokens identical to one rank for text,
images, videos, preemption and prefix hits, with the vision tower split by data or by weights and encoded inline
or concurrently; every rank samples the same tokens, random ones included; a rank that dies fails the requests
with an error naming it, and the engine reports dead instead of hanging."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from spaceserve.runtime.executor import RankFailedError
from tests.engine.parity import VIDEO_PAD, VISION_END, VISION_START, random_frames, random_image, random_prompt
from tests.llm_factory import make_llm
from tests.tiny_checkpoints import make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PIXELS = {"min_pixels": 3136, "max_pixels": 200704}
# (architecture, vision split, where the encoder runs): each split and each encoder placement once
CASES = [("qwen2_vl", "data", "time"), ("qwen2_5_vl", "weights", "streams")]


def _prompts(seed: int) -> list[dict]:
    """Text only, one and three odd images, an image shared by two prompts, a video with an image."""
    rng = np.random.default_rng(seed)
    shared = random_image(rng, 64, 88)
    prompts = [{"prompt_token_ids": random_prompt(rng, 0, text_len=13)}]
    for sizes in ([(70, 95)], [(37, 130), (90, 61), (151, 47)], [(64, 88)], [(64, 88)]):
        images = [shared] if sizes == [(64, 88)] else [random_image(rng, h, w) for h, w in sizes]
        prompts.append({"prompt_token_ids": random_prompt(rng, len(images)), "multi_modal_data": {"image": images}})
    ids = random_prompt(rng, 1) + [VISION_START, VIDEO_PAD, VISION_END, 17, 42]
    video = {"image": [random_image(rng, 56, 70)], "video": [random_frames(rng, 4, 90, 120)]}
    prompts.append({"prompt_token_ids": ids, "multi_modal_data": video, "mm_processor_kwargs": PIXELS})
    return prompts


def _engine(path, tp: int, mode: str, multiplex: str):
    # few blocks: the second and third copies of the batch preempt; small blocks: the repeat run hits the prefix
    # cache; a small encoder cache evicts (rank 1 must drop what rank 0 drops)
    return make_llm(
        str(path), device="cpu", dtype="float32", tensor_parallel_size=tp, mm_encoder_tp_mode=mode,
        multiplex=multiplex, num_gpu_blocks_override=48, block_size=4, max_num_batched_tokens=96,
        encoder_cache_tokens=32,
    )


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{m}-{x}" for a, m, x in CASES])
def case(request, tmp_path_factory):
    architecture, mode, multiplex = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(architecture), architecture, seed=31, sharded=True)
    write_tiny_tokenizer(path)
    return path, mode, multiplex


def _run(llm, prompts) -> tuple[list[list[int]], int, int]:
    engine = llm.llm_engine.core
    first = [list(o.outputs[0].token_ids) for o in llm.generate(prompts * 3, GREEDY)]
    hits = engine.kv_manager.prefix_cache_stats.hits
    again = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]
    engine.check_idle_integrity()
    return first + again, engine.scheduler.num_preemptions, engine.kv_manager.prefix_cache_stats.hits - hits


def test_two_ranks_give_one_ranks_greedy_tokens(case):
    path, mode, multiplex = case
    prompts = _prompts(seed=3)
    one = _engine(path, 1, mode, multiplex)
    try:
        expected, preempted, hits = _run(one, prompts)
    finally:
        one.llm_engine.shutdown()
    assert preempted > 0 and hits > 0, "the KV cache was meant to preempt and the repeat run to hit the prefix cache"
    assert len({t for tokens in expected for t in tokens}) > 5, "the checkpoint should not repeat one token"
    two = _engine(path, 2, mode, multiplex)
    try:
        tokens, preempted, hits = _run(two, prompts)
        described = two.llm_engine.core.executor.collective_rpc("describe")
    finally:
        two.llm_engine.shutdown()
    assert tokens == expected
    assert preempted > 0 and hits > 0
    assert [d["rank"] for d in described] == [0, 1]
    assert described[0]["kv_cache_shape"] == described[1]["kv_cache_shape"]
    assert described[0]["kv_cache_shape"][3] == 1  # 2 KV heads over 2 ranks
    assert described[1]["stored_embeddings"] > 0  # rank 1 holds the embeddings it spliced from
    assert described[1]["eager_steps"] == described[0]["eager_steps"] > 0  # rank 1 ran every step rank 0 did
    # rank 1 dropped what the encoder cache evicted on rank 0: it holds as many embeddings as rank 0's engine
    assert described[1]["stored_embeddings"] == described[0]["stored_embeddings"]


def test_four_ranks_replicate_the_two_kv_heads_and_keep_the_tokens(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "qwen2_vl", "qwen2_vl", seed=31)
    write_tiny_tokenizer(path)
    prompts = _prompts(seed=6)[:3]
    tokens = {}
    for tp in (1, 4):  # 4 ranks: 1 query head each, KV heads 0, 0, 1, 1; 2 vision heads: the data split
        llm = make_llm(str(path), device="cpu", dtype="float32", tensor_parallel_size=tp, mm_encoder_tp_mode="data")
        try:
            tokens[tp] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]
            if tp == 4:
                shapes = [d["kv_cache_shape"] for d in llm.llm_engine.core.executor.collective_rpc("describe")]
                assert len(shapes) == 4 and all(shape[3] == 1 for shape in shapes)
        finally:
            llm.llm_engine.shutdown()
    assert tokens[4] == tokens[1]


def test_every_rank_samples_the_same_tokens_seeded_or_not():
    llm = make_llm("tiny-qwen2-vl", device="cpu", dtype="float32", tensor_parallel_size=2, mm_encoder_tp_mode="data")
    engine = llm.llm_engine
    try:
        rng = np.random.default_rng(8)
        for index in range(6):
            params = SamplingParams(temperature=1.0, top_p=0.9, top_k=40 if index % 2 else -1, max_tokens=12,
                                    ignore_eos=True, seed=index if index < 3 else None)
            engine.add_request(f"word{rng.integers(0, 99)} " * (2 + index), params, f"r{index}")
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            per_rank = engine.core.executor.collective_rpc("last_sampled")
            assert per_rank[0] == per_rank[1] and per_rank[0]
            steps += 1
        assert steps >= 12
    finally:
        engine.shutdown()


def test_a_rank_that_dies_fails_every_request_and_the_engine_reports_dead():
    llm = make_llm("tiny-qwen2-vl", device="cpu", tensor_parallel_size=2, mm_encoder_tp_mode="data")
    engine = llm.llm_engine
    try:
        assert llm.generate("warm up", GREEDY)[0].outputs[0].token_ids
        os.kill(engine.info["parallel"]["worker_pids"][0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RankFailedError, match="tensor-parallel rank 1 .* exited"):
            llm.generate(["one", "two"], GREEDY)
        assert time.monotonic() - started < 30
    finally:
        engine.shutdown()

    async def serve_then_kill():
        # the engine core in a process of its own (the default outside tests): rank 0 there, rank 1 spawned by it
        engine_args = EngineArgs(
            "tiny-qwen2-vl", device="cpu", tensor_parallel_size=2, mm_encoder_tp_mode="data", multiprocess=True
        )
        async_llm = AsyncLLM.from_engine_args(engine_args)
        try:
            async for _ in async_llm.generate("warm", GREEDY, "a"):
                pass
            pids = (await async_llm.call_utility("describe"))["parallel"]["worker_pids"]
            os.kill(pids[0], signal.SIGKILL)  # while idle: the core reports it without a request
            for _ in range(200):
                if not async_llm.is_running:
                    break
                await asyncio.sleep(0.05)
            assert not async_llm.is_running and "rank 1" in str(async_llm.dead_error)
            with pytest.raises(EngineDeadError, match="rank 1"):
                async for _ in async_llm.generate("after the death", GREEDY, "b"):
                    pass
        finally:
            async_llm.shutdown()

    asyncio.run(asyncio.wait_for(serve_then_kill(), timeout=120))


# ---- on GPUs (skipped without them; scripts/tp_check.py measures) -------------------------------------------------

CUDA_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_tokens(model: str, prompts, **kwargs):
    llm = make_llm(model, device="cuda", dtype="float32", max_model_len=512, max_num_seqs=8, **kwargs)
    try:
        tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]
        runner = llm.llm_engine.core.model_runner
        return tokens, runner.num_graphed_steps
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_GPUS < 1, reason="needs a CUDA device")
def test_one_rank_through_the_multiprocess_path_gives_the_direct_paths_tokens_on_a_gpu(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "qwen2_vl", "qwen2_vl", seed=31)
    write_tiny_tokenizer(path)
    prompts = _prompts(seed=4)
    direct, graphed = _gpu_tokens(str(path), prompts, distributed_executor_backend="uni")
    multi, multi_graphed = _gpu_tokens(str(path), prompts, distributed_executor_backend="mp")
    assert multi == direct and graphed > 0 and multi_graphed == graphed


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_GPUS < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("multiplex", ["time", "streams", "space"])
def test_two_gpus_give_one_gpus_greedy_tokens(multiplex, tmp_path):
    from spaceserve.runtime.sm_partition import green_context_support

    if multiplex == "space" and green_context_support(torch.device("cuda")) is not None:
        pytest.skip("no green contexts here")
    path = make_tiny_checkpoint(tmp_path / "qwen2_5_vl", "qwen2_5_vl", seed=31)
    write_tiny_tokenizer(path)
    prompts = _prompts(seed=5)
    expected, _ = _gpu_tokens(str(path), prompts, multiplex=multiplex, encoder_sms=16)
    for mode in ("weights", "data"):
        tokens, graphed = _gpu_tokens(
            str(path), prompts, multiplex=multiplex, encoder_sms=16, tensor_parallel_size=2, mm_encoder_tp_mode=mode
        )
        assert tokens == expected, mode
        assert graphed > 0  # decode steps replayed graphs with the all-reduce inside, on both ranks
