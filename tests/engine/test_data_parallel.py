"""Data parallelism on the mp backend: two engine-core processes behind one AsyncLLM and its HTTP server."""

from __future__ import annotations

import dataclasses

import pytest

from spaceserve.core.errors import ConfigError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.data_parallel.launch import mp_device_envs, shared_gpu_config
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.engine import dp_scenarios
from tests.engine.dp_scenarios import model_dir, reference  # noqa: F401 - module-scoped fixtures
from tests.server.conftest import ThreadedServer


@pytest.fixture(scope="module")
def served(model_dir):
    engine = dp_scenarios.start_engine(model_dir, data_parallel_size=2, data_parallel_backend="mp")
    server = ThreadedServer(create_app(engine, ServerArgs(served_model_name="tiny")))
    try:
        yield engine, server
    finally:
        server.stop()
        engine.shutdown()


def test_two_replicas_answer_with_one_engines_greedy_text(served, reference):
    engine, _ = served
    assert engine.info["data_parallel"]["size"] == 2
    assert engine.health()["status"] == "ok"
    dp_scenarios.check_same_greedy_answers(engine, reference, seed=5)


def test_a_repeated_image_goes_to_the_replica_that_encoded_it(served):
    dp_scenarios.check_repeated_image_goes_where_it_was_encoded(served[0], seed=6)


def test_a_killed_replica_fails_or_retries_its_requests_and_the_rest_serve(served, reference):
    engine, server = served
    dp_scenarios.check_replica_failure(engine, reference, seed=7, server=server)


def test_replicas_take_one_gpu_each_and_share_only_within_the_memory_budget():
    # create_engine_config refuses a CUDA device this build lacks; the placement is pure arithmetic over the config
    def on_cuda(device="cuda", **kwargs):
        made = EngineArgs(model="tiny-qwen2-vl", device="cpu", **kwargs).create_engine_config()
        return dataclasses.replace(made, device=device)

    engine_config = on_cuda(gpu_memory_utilization=0.45)
    assert mp_device_envs(engine_config, 4, visible="3,5") == [{"CUDA_VISIBLE_DEVICES": g} for g in "3535"]
    assert mp_device_envs(engine_config, 2, visible="", device_count=1) == [{"CUDA_VISIBLE_DEVICES": "0"}] * 2
    with pytest.raises(ConfigError, match="lower it to at most 0.33"):
        mp_device_envs(engine_config, 3, visible="", device_count=1)
    pinned = on_cuda("cuda:1")
    with pytest.raises(ConfigError, match="pins one GPU"):
        mp_device_envs(pinned, 2, visible="0,1")
    cpu = EngineArgs(model="tiny-qwen2-vl", device="cpu").create_engine_config()
    envs = mp_device_envs(cpu, 3)
    assert len(envs) == 3 and all("CUDA_VISIBLE_DEVICES" not in env for env in envs)
    # the second replica on a GPU sees the first's memory as held by others: it asks for two shares, one its own
    shares = [shared_gpu_config(engine_config, position).cache.gpu_memory_utilization for position in range(2)]
    assert shares == [0.45, 0.9]
    fixed = on_cuda(kv_cache_memory_bytes=1 << 30)
    assert shared_gpu_config(fixed, 1) is fixed


def test_bad_data_parallel_settings_are_refused():
    with pytest.raises(ConfigError, match="data_parallel_size"):
        EngineArgs(model="tiny-qwen2-vl", data_parallel_size=0).create_engine_config()
    with pytest.raises(ConfigError, match="ray_address needs"):
        EngineArgs(model="tiny-qwen2-vl", data_parallel_size=2, ray_address="auto").create_engine_config()
    with pytest.raises(ConfigError, match="offline engine"):
        from spaceserve import LLM

        LLM("tiny-qwen2-vl", data_parallel_size=2)


def test_what_the_router_weighs_is_what_the_replicas_cache(tmp_path):
    """Images and (still undecoded) video chunks by content hash, and the prompt's KV block hashes exactly as the
    replica's prefix cache computes them."""
    import io

    import numpy as np

    from spaceserve import SamplingParams
    from spaceserve.engine.data_parallel.dp_client import MAX_ROUTED_BLOCKS, route_request
    from spaceserve.engine.input_processor import InputProcessor
    from spaceserve.kvcache.prefix_hash import extend_block_hashes
    from spaceserve.multimodal.video.synthetic import make_clip
    from spaceserve.tokenizer import load_tokenizer
    from tests.engine.test_multiplex import PAD

    config = EngineArgs(model="tiny-qwen2-vl", max_model_len=8192, device="cpu").create_engine_config()
    processor = InputProcessor(config, load_tokenizer(config.model_dir, config.model_config))
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    clip = io.BytesIO()
    make_clip(clip, width=64, height=48, seconds=2, fps=10, gop=10, seed=4)
    video_pad = "<|vision_start|><|video_pad|><|vision_end|>"

    def build(request_id: str, text: str):
        prompt = {"prompt": f"{text} {PAD} then {video_pad} end", "multi_modal_data": {"image": image,
                                                                                         "video": clip.getvalue()}}
        return processor.process(request_id, prompt, SamplingParams(max_tokens=None))

    first, second = build("a", "one two"), build("b", "three four five six")
    assert first.pending_mm_work  # the video is not decoded yet, its chunks' hashes are known
    routes = [route_request(request, 16, 8192) for request in (first, second)]
    assert [r.mm_hash for r in routes[0].images] == [r.mm_hash for r in routes[1].images]
    assert len(routes[0].images) == len(first.mm_features) > 2
    assert routes[0].max_new_tokens == 8192 - len(first.prompt_token_ids)
    extend_block_hashes(first, 16)
    assert list(routes[0].block_hashes) == first.block_hashes[:MAX_ROUTED_BLOCKS]
    assert routes[0].block_hashes[0] != routes[1].block_hashes[0]
