"""Execution modes: the concurrent encoder gives the same tokens as `time`, never holds up requests that don't need
it, and leaves no KV block or encoder-cache entry behind under concurrency; modes that cannot run say why."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.errors import ConfigError
from spaceserve.engine.encoder_stage import EncoderFailedError
from spaceserve.runtime.sm_partition import green_context_support
from tests.llm_factory import make_llm

PAD = "<|vision_start|><|image_pad|><|vision_end|>"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _image(rng: np.random.Generator, side_range=(28, 160)) -> np.ndarray:
    height, width = rng.integers(*side_range, size=2)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _mixed_prompts(seed: int, count: int) -> list:
    """Text-only prompts, one or two images of mixed sizes, and an image shared by two prompts (a cache hit)."""
    rng = np.random.default_rng(seed)
    shared = _image(rng)
    prompts = []
    for index in range(count):
        words = " ".join(f"w{rng.integers(0, 500)}" for _ in range(rng.integers(2, 12)))
        kind = index % 4
        if kind == 0:
            prompts.append(words)
        elif kind == 1:
            prompts.append({"prompt": f"{PAD} {words}", "multi_modal_data": {"image": _image(rng)}})
        elif kind == 2:
            images = [_image(rng), _image(rng)]
            prompts.append({"prompt": f"{words} {PAD} and {PAD}", "multi_modal_data": {"image": images}})
        else:
            prompts.append({"prompt": f"{words} {PAD}", "multi_modal_data": {"image": shared}})
    return prompts


def _tokens(model: str, prompts: list, **engine_kwargs) -> list[list[int]]:
    llm = make_llm(model, max_model_len=1024, device=DEVICE, dtype="float32", **engine_kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        llm.llm_engine.check_idle_integrity()
        return tokens
    finally:
        llm.llm_engine.shutdown()


def _modes_here() -> list[str]:
    modes = ["streams"]
    if CUDA and green_context_support(torch.device("cuda")) is None:
        modes.append("space")
    return modes


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_concurrent_modes_give_the_time_modes_greedy_tokens(model):
    prompts = _mixed_prompts(seed=11, count=12)
    expected = _tokens(model, prompts, multiplex="time")
    for mode in _modes_here():
        assert _tokens(model, prompts, multiplex=mode, encoder_sms=16) == expected, mode


def test_the_lm_keeps_decoding_while_an_image_is_being_encoded():
    llm = make_llm("tiny-qwen2-vl", max_model_len=512, multiplex="streams", device=DEVICE)
    engine = llm.llm_engine
    release = threading.Event()
    worker = engine.core.encoder_stage.worker
    execute = worker.runner.execute

    def held_execute(batch):
        assert release.wait(30), "the test never released the encoder"
        return execute(batch)

    worker.runner.execute = held_execute
    try:
        rng = np.random.default_rng(4)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        image_request = engine.add_request(
            {"prompt": "look at " + PAD + " please", "multi_modal_data": {"image": _image(rng)}}, params, "img"
        )
        engine.add_request("only words here", params, "txt")
        finished = set()
        for _ in range(200):
            finished.update(o.request_id for o in engine.step() if o.finished)
            if "txt" in finished:
                break
        assert "txt" in finished and "img" not in finished
        placeholder = image_request.mm_features[0].placeholder
        # its text before the image was prefilled; it waits at the image while the encoder is held
        assert image_request.num_computed_tokens == placeholder.offset
        assert engine.core.encoder_stage.busy
        release.set()
        while engine.has_unfinished_requests():
            finished.update(o.request_id for o in engine.step() if o.finished)
        assert finished == {"txt", "img"} and len(image_request.output_token_ids) == 6
        engine.check_idle_integrity()
    finally:
        release.set()
        engine.shutdown()


def test_stress_many_images_arriving_while_dozens_decode_lose_nothing_and_leak_nothing():
    rng = np.random.default_rng(21)
    prompts = _mixed_prompts(seed=5, count=40)
    lengths = [int(rng.integers(4, 24)) for _ in prompts]
    abort_at = {7: 3, 18: 1, 29: 6}  # request index -> the step at which it is aborted (before/while encoding)
    results = {}
    for mode in ("time", "streams"):
        llm = make_llm(
            "tiny-qwen2-vl", max_model_len=512, max_num_seqs=24, multiplex=mode, device=DEVICE,
            encoder_cache_tokens=300, num_gpu_blocks_override=40,
        )
        engine = llm.llm_engine
        tokens, finished_ids = {}, set()
        step = added = 0
        try:
            while True:
                for index in range(added, min(added + 3, len(prompts))):  # three arrivals per step
                    params = SamplingParams(temperature=0, max_tokens=lengths[index], ignore_eos=True)
                    engine.add_request(prompts[index], params, f"r{index}")
                added = min(added + 3, len(prompts))
                for index, at in abort_at.items():
                    if step == at + index // 3:
                        engine.abort_request([f"r{index}"])
                for output in engine.step():
                    if output.finished:
                        finished_ids.add(output.request_id)
                        tokens[output.request_id] = list(output.outputs[0].token_ids)
                step += 1
                if not engine.has_unfinished_requests() and added == len(prompts):
                    break
            assert engine.core.scheduler.num_preemptions > 0, "the KV cache was meant to be tight enough to preempt"
            engine.check_idle_integrity()
            assert engine.core.kv_manager.num_free_blocks == engine.core.kv_manager.num_blocks
        finally:
            engine.shutdown()
        completed = {f"r{i}" for i in range(len(prompts)) if i not in abort_at}
        assert completed <= finished_ids, f"{mode}: lost {sorted(completed - finished_ids)}"
        for request_id in completed:
            assert len(tokens[request_id]) == lengths[int(request_id[1:])]
        results[mode] = {r: tokens[r] for r in completed}
    assert results["streams"] == results["time"]


def test_an_encoder_failure_surfaces_as_an_engine_error():
    llm = make_llm("tiny-qwen2-vl", max_model_len=512, multiplex="streams", device=DEVICE)
    engine = llm.llm_engine

    def broken(batch):
        raise RuntimeError("device fault")

    engine.core.encoder_stage.worker.runner.execute = broken
    try:
        prompt = {"prompt": PAD, "multi_modal_data": {"image": _image(np.random.default_rng(1))}}
        engine.add_request(prompt, SamplingParams(max_tokens=2))
        with pytest.raises(EncoderFailedError, match="device fault"):
            for _ in range(500):
                engine.step()
    finally:
        engine.shutdown()


@pytest.mark.skipif(CUDA, reason="checks what the CPU build says")
def test_space_on_cpu_refuses_and_auto_falls_back_to_time_saying_why():
    with pytest.raises(ConfigError, match="green contexts"):
        make_llm("tiny-qwen2-vl", max_model_len=256, multiplex="space", device="cpu")
    llm = make_llm("tiny-qwen2-vl", max_model_len=256, multiplex="auto", device="cpu")
    layout = llm.llm_engine.core.layout
    assert layout.mode == "time" and layout.concurrent is False and "auto chose time" in layout.reason
    streams = make_llm("tiny-qwen2-vl", max_model_len=256, multiplex="streams", device="cpu").llm_engine
    assert streams.core.layout.mode == "streams" and "worker thread" in streams.core.layout.reason
    streams.shutdown()


def test_bad_multiplex_settings_name_the_problem():
    with pytest.raises(ConfigError, match="multiplex must be one of"):
        make_llm("tiny-qwen2-vl", max_model_len=256, multiplex="sometimes")
    with pytest.raises(ConfigError, match="encoder_sms must be >= 1"):
        make_llm("tiny-qwen2-vl", max_model_len=256, multiplex="space", encoder_sms=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_space_reports_its_split_and_replays_graphs_on_both_lm_streams():
    reason = green_context_support(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    llm = make_llm(
        "tiny-qwen2-vl", max_model_len=1024, multiplex="space", encoder_sms="20,100", attention_backend="triton"
    )
    engine = llm.llm_engine
    try:
        described = engine.core.layout.describe()
        assert described["multiplex"] == "space" and len(described["splits"]) == 2
        small, large = described["splits"]
        assert 20 <= small["encoder_sms"] < large["encoder_sms"]
        for split in described["splits"]:
            assert split["encoder_sms"] + split["lm_sms"] == described["total_sms"]
        runner = engine.core.model_runner
        assert set(runner._graphs_by_stream) == set(engine.core.layout.lm_streams) and len(runner._graphs_by_stream) == 3
        prompts = _mixed_prompts(seed=2, count=16)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        assert runner.num_graphed_steps > 0
        counters = engine.loop_counters()
        assert counters["encoder_batches"] > 0 and counters["lm_steps"] > 0
        engine.check_idle_integrity()
    finally:
        engine.shutdown()
