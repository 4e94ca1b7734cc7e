"""What every data-parallel backend must do (tests/engine/test_data_parallel*.py run these against mp and Ray):
answer with one engine's greedy text, send a repeated image to the replica that encoded it, and survive a replica
that dies (its unstarted requests retried elsewhere, its streaming ones failed, /health degraded, then 503 once no
replica is left), without a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from spaceserve import SamplingParams
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from tests.engine.test_multiplex import PAD, _image, _mixed_prompts
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm
from tests.server.conftest import ThreadedServer
from tests.tiny_checkpoints import make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

ENGINE_KWARGS = dict(
    max_model_len=512, dtype="float32", device="cpu", kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, seed=3,
    limit_mm_per_prompt={"image": 2},
)
DEADLINE_S = 20.0


def make_model_dir(path: Path) -> Path:
    """Perturbed random weights (greedy text varies with the prompt) and a real tokenizer."""
    make_tiny_checkpoint(path, "qwen2_vl", seed=29)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model both backends' modules serve (import this fixture and `reference` into the module)."""
    return make_model_dir(tmp_path_factory.mktemp("dp-model"))


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = reference_llm(model_dir)
    yield llm
    llm.llm_engine.shutdown()


def start_engine(model_dir: Path, **data_parallel) -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), **ENGINE_KWARGS, **data_parallel))


def reference_llm(model_dir: Path):
    return make_llm(str(model_dir), multiprocess=False, **ENGINE_KWARGS)


def _summary(output) -> tuple:
    completion = output.outputs[0]
    return tuple(completion.token_ids), completion.text, completion.finish_reason


async def _final(engine: AsyncLLM, prompt, params, request_id: str):
    last = None
    async for output in engine.generate(prompt, params, request_id):
        last = output
    return last


def _decision(engine: AsyncLLM, request_id: str):
    return engine._client.recent_decisions[request_id][-1]


def wait_idle(engine: AsyncLLM) -> None:
    async def idle():
        deadline = time.monotonic() + DEADLINE_S
        while await engine.call_utility("has_unfinished_requests"):
            assert time.monotonic() < deadline, "replicas still busy"
            await asyncio.sleep(0.01)
        await engine.call_utility("check_idle_integrity")
        free, total = await engine.call_utility("kv_block_counts")
        assert free == total == engine.info["num_kv_blocks"]

    asyncio.run(idle())


def check_same_greedy_answers(engine: AsyncLLM, reference, seed: int, count: int = 8) -> None:
    prompts = _mixed_prompts(seed=seed, count=count)
    rng = np.random.default_rng(seed)
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(3, 14))) for _ in prompts]
    expected = [_summary(output) for output in reference.generate(prompts, params)]
    assert len(set(expected)) > count // 2, "the reference should answer different prompts differently"

    async def run():
        ids = [f"same-{seed}-{index}" for index in range(count)]
        outputs = await asyncio.gather(*(_final(engine, p, sp, rid) for p, sp, rid in zip(prompts, params, ids)))
        return ids, outputs

    ids, outputs = asyncio.run(run())
    assert [_summary(output) for output in outputs] == expected
    assert {_decision(engine, request_id).replica for request_id in ids} == set(range(engine._client.size))
    wait_idle(engine)


def check_repeated_image_goes_where_it_was_encoded(engine: AsyncLLM, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = _image(rng, (40, 90))
    params = SamplingParams(temperature=0, max_tokens=4)

    def words() -> str:
        return " ".join(f"w{rng.integers(0, 500)}" for _ in range(int(rng.integers(3, 9))))

    async def run():
        first = await _final(engine, {"prompt": f"{words()} {PAD} first", "multi_modal_data": {"image": image}},
                             params, f"img-first-{seed}")
        again = [
            await _final(engine, {"prompt": f"{words()} {PAD} again {k}", "multi_modal_data": {"image": image}},
                         params, f"img-again-{seed}-{k}")
            for k in range(3)
        ]
        fresh = await _final(engine, {"prompt": f"{words()} {PAD}", "multi_modal_data": {"image": _image(rng)}},
                             params, f"img-fresh-{seed}")
        return first, again, fresh

    first, again, fresh = asyncio.run(run())
    home = _decision(engine, first.request_id).replica
    assert "encoder_enqueued_time" in first.metrics  # encoded for the first request
    for output in again:
        decision = _decision(engine, output.request_id)
        assert (decision.replica, decision.reason) == (home, "image_affinity")
        assert "encoder_enqueued_time" not in output.metrics  # taken from that replica's encoder cache
        assert output.outputs[0].finish_reason == "length"
    assert "encoder_enqueued_time" in fresh.metrics  # a new image is encoded wherever it goes
    assert engine.router_stats()["decisions"]["image_affinity"] >= 3
    wait_idle(engine)


def check_replica_failure(engine: AsyncLLM, reference, seed: int, server: ThreadedServer | None = None) -> None:
    """Runs last on its engine: it kills every replica."""
    client = engine._client
    rng = np.random.default_rng(seed)
    image = _image(rng, (40, 90))
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    retried_prompts = [{"prompt": f"w{k} then {PAD} retried", "multi_modal_data": {"image": image}} for k in range(2)]
    expected_retried = [_summary(output) for output in reference.generate(retried_prompts, short)]
    after_prompt = "asked after the failure"
    expected_after = _summary(reference.generate([after_prompt], short)[0])

    async def run():
        with_image = await engine.add_request({"prompt": f"{PAD} long", "multi_modal_data": {"image": image}}, long,
                                              "long-image")
        text = await engine.add_request("a long text request", long, "long-text")
        await with_image.__anext__()
        await text.__anext__()
        victim = client.replica_of("long-image")
        survivor = client.replica_of("long-text")
        assert victim != survivor
        pid = client.replica_set.placements[victim]["pid"]
        os.kill(pid, signal.SIGSTOP)  # nothing it holds can start now
        try:
            retried = [await engine.add_request(p, short, f"retried-{k}") for k, p in enumerate(retried_prompts)]
            assert [client.replica_of(f"retried-{k}") for k in range(2)] == [victim, victim]  # image affinity
        finally:
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        failed = [output async for output in with_image][-1]
        assert failed.outputs[0].finish_reason == "error" and f"replica {victim}" in failed.error
        finished = [[output async for output in stream][-1] for stream in retried]
        assert [_summary(output) for output in finished] == expected_retried
        assert all(_decision(engine, f"retried-{k}").reason == "retry" for k in range(2))
        assert all(_decision(engine, f"retried-{k}").replica == survivor for k in range(2))
        assert time.monotonic() - started < DEADLINE_S
        state = engine.health()
        assert (state["status"], state["replicas_alive"]) == ("degraded", engine._client.size - 1)
        assert not state["replicas"][victim]["alive"] and state["replicas"][victim]["error"]
        if server is not None:
            response = httpx.get(f"{server.base_url}/health")
            assert response.status_code == 200 and response.json()["status"] == "degraded"
            metrics = httpx.get(f"{server.base_url}/metrics").text
            assert 'spaceserve:router_decisions_total{model_name="tiny",reason="retry"} 2.0' in metrics
            assert 'spaceserve:data_parallel_replicas_alive{model_name="tiny"} 1.0' in metrics
        await engine.abort("long-text")
        assert _summary(await _final(engine, after_prompt, short, "after-failure")) == expected_after
        assert _decision(engine, "after-failure").replica == survivor
        # the last replica goes too: the front is dead, every stream ends with EngineDeadError, nothing hangs
        streaming = await engine.add_request("the last one", long, "last")
        await streaming.__anext__()
        os.kill(client.replica_set.placements[survivor]["pid"], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in streaming:
                pass
        assert time.monotonic() - started < DEADLINE_S
        assert engine.health()["status"] == "dead"
        with pytest.raises(EngineDeadError):
            await engine.add_request("too late", short)
        if server is not None:
            assert httpx.get(f"{server.base_url}/health").status_code == 503

    asyncio.run(run())
