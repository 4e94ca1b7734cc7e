"""The encoder in a process of its own: the same greedy tokens as the in-process encoder (the core in this process
or in its own), a killed encoder process fails only the requests waiting for images (nothing hangs, nothing
leaks, /health says so), a batch that raises in it comes back as that batch's error, and modes that cannot run say
why. The plumbing runs on the CPU (tower on the CPU, embeddings through shared memory); on a GPU the same tests
compare time, space, mps and space across processes, under an MPS daemon (scripts/mps_check.py starts one)."""

from __future__ import annotations

import glob
import os
import signal
import sys
import tempfile
import time

import httpx
import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.encoder_messages import ENCODER_UNAVAILABLE_PREFIX
from spaceserve.core.errors import ConfigError
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.models.loader import build_model
from spaceserve.runtime.embedding_ring import shared_memory_directory
from spaceserve.runtime.encoder_process import EncoderBatchError, EncoderProcessDiedError, ProcessEncoderWorker
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.mps import MPSUnavailableError, mps_daemon_problem
from spaceserve.runtime.multiplex import resolve_layout
from spaceserve.runtime.sm_partition import green_context_support
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.engine.test_multiplex import PAD, _image, _mixed_prompts
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm
from tests.server.conftest import SERVED_NAME, ThreadedServer, data_url, png_bytes

CPU = dict(device="cpu", dtype="float32", max_model_len=1024)
PROCESS = dict(multiplex="streams", encoder_process=True)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _generate(model: str, prompts: list, **kwargs) -> list[list[int]]:
    llm = make_llm(model, **kwargs)
    try:
        tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]
        llm.llm_engine.check_idle_integrity()
        return tokens
    finally:
        llm.llm_engine.shutdown()


def _leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "spaceserve-encoder-*"))) | set(
        glob.glob(os.path.join(shared_memory_directory(), "spaceserve-ring-*"))
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run(engine, limit_s: float = 60.0) -> dict:
    finished = {}
    deadline = time.monotonic() + limit_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish its requests"
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_an_encoder_process_gives_the_in_process_encoders_greedy_tokens(model):
    prompts = _mixed_prompts(seed=11, count=8)
    expected = _generate(model, prompts, multiplex="time", **CPU)
    before = _leftovers()
    llm = make_llm(model, **PROCESS, **CPU)
    engine = llm.llm_engine
    try:
        info = engine.info["encoder_process"]
        pid = info["pid"]
        assert _alive(pid) and info["mode"] == "streams" and info["ring_slots"] == 2
        assert engine.execution["encoder_process"] and "process of its own" in engine.execution["reason"]
        assert [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)] == expected
        engine.check_idle_integrity()
        engine.check_health()
        counters = engine.loop_counters()
        assert counters["encoder_batches"] > 0 and counters["encoder_copy_out_bytes"] > 0
        assert next(engine.core.model.visual.parameters()).device.type == "meta"  # the core keeps no tower
    finally:
        engine.shutdown()
    assert not _alive(pid)
    assert _leftovers() <= before


def test_front_core_and_encoder_each_in_a_process_of_their_own():
    prompts = _mixed_prompts(seed=23, count=6)
    expected = _generate("tiny-qwen2-vl", prompts, multiplex="time", **CPU)
    llm = make_llm("tiny-qwen2-vl", multiprocess=True, **PROCESS, **CPU)
    engine = llm.llm_engine
    try:
        pid = engine.info["encoder_process"]["pid"]
        assert [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)] == expected
        engine.check_idle_integrity()
        engine.check_health()
        assert engine.loop_counters()["encoder_batches"] > 0
    finally:
        engine.shutdown()
    assert not _alive(pid)


def test_a_killed_encoder_process_fails_only_the_requests_waiting_for_images():
    rng = np.random.default_rng(8)
    shared, lost, later = _image(rng), _image(rng), _image(rng)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = {
        "before": {"prompt": f"first {PAD} look", "multi_modal_data": {"image": shared}},
        "text": "only words here, nothing to encode",
        "cached": {"prompt": f"again, {PAD} seen before", "multi_modal_data": {"image": shared}},
        "text-after": "more words after the encoder died",
    }
    reference = make_llm("tiny-qwen2-vl", multiplex="time", **CPU)
    expected = {rid: list(o.outputs[0].token_ids) for rid, o in
                zip(prompts, reference.generate(list(prompts.values()), params))}
    reference.llm_engine.shutdown()

    llm = make_llm("tiny-qwen2-vl", **PROCESS, **CPU)
    engine = llm.llm_engine
    worker = engine.core.encoder_stage.worker
    try:
        engine.add_request(prompts["before"], params, "before")
        done = _run(engine)
        assert done["before"].error is None and list(done["before"].outputs[0].token_ids) == expected["before"]

        os.kill(worker.pid, signal.SIGSTOP)  # the next batch is certainly in flight when the process dies
        engine.add_request({"prompt": f"{PAD} a new image", "multi_modal_data": {"image": lost}}, params, "lost")
        engine.add_request(prompts["text"], params, "text")
        for _ in range(3):
            done.update({o.request_id: o for o in engine.step() if o.finished})
        assert worker.num_in_flight == 1
        os.kill(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        done.update(_run(engine))
        assert time.monotonic() - started < 10
        assert done["lost"].outputs[0].finish_reason == "error"
        assert done["lost"].error.startswith(ENCODER_UNAVAILABLE_PREFIX) and "died" in done["lost"].error
        assert done["text"].error is None and list(done["text"].outputs[0].token_ids) == expected["text"]
        engine.check_idle_integrity()
        with pytest.raises(RuntimeError, match="encoder is unavailable.*died"):
            engine.check_health()

        # after the death: an image already encoded is served from the core's copy of its rows, a new one fails
        engine.add_request(prompts["cached"], params, "cached")
        engine.add_request({"prompt": f"{PAD} one more", "multi_modal_data": {"image": later}}, params, "after")
        engine.add_request(prompts["text-after"], params, "text-after")
        done.update(_run(engine))
        assert done["after"].outputs[0].finish_reason == "error" and "cannot be encoded" in done["after"].error
        for request_id in ("cached", "text-after"):
            assert done[request_id].error is None
            assert list(done[request_id].outputs[0].token_ids) == expected[request_id], request_id
        engine.check_idle_integrity()
        free, total = engine.core.kv_block_counts()
        assert free == total
    finally:
        engine.shutdown()


def test_health_reports_a_dead_encoder_process_and_image_requests_get_503s():
    engine = AsyncLLM.from_engine_args(EngineArgs(
        model="tiny-qwen2-vl", max_model_len=256, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, multiprocess=False,
        **PROCESS, device="cpu",
    ))
    server = ThreadedServer(create_app(engine, ServerArgs(served_model_name=SERVED_NAME)))
    image = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(61))}}, {"type": "text", "text": "go"}]
    chat = {"model": SERVED_NAME, "messages": [{"role": "user", "content": image}], "max_tokens": 3}
    text = {"model": SERVED_NAME, "prompt": "x", "max_tokens": 3}
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
            pid = engine.info["encoder_process"]["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while (health := client.get("/health")).status_code == 200:
                assert time.monotonic() < deadline, "/health never reported the dead encoder process"
                time.sleep(0.05)
            assert health.status_code == 503 and "encoder" in health.json()["error"]
            failed = client.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(62))}}, {"type": "text", "text": "go"}]}]})
            assert failed.status_code == 503 and failed.json()["error"]["type"] == "ServiceUnavailableError"
            assert client.post("/v1/completions", json=text).status_code == 200  # text is still served
    finally:
        server.stop()
        engine.shutdown()


def test_a_batch_that_raises_in_the_encoder_process_comes_back_as_its_error_and_the_process_goes_on():
    config = EngineArgs("tiny-qwen2-vl", **PROCESS, device="cpu", dtype="float32").create_engine_config()
    device = torch.device("cpu")
    model = build_model(config.model_config, directory=None, load_format="dummy", dtype=torch.float32,
                        device=device, seed=config.seed)
    runner = EncoderRunner(model, device, config.image_config)
    worker = ProcessEncoderWorker(config, resolve_layout(config, device), device, torch.float32)
    vision = config.model_config.vision
    rng = torch.Generator().manual_seed(5)

    def item(name: str, grid: tuple[int, int, int], patch_dim: int = vision.patch_dim) -> MultiModalFeature:
        patches = grid[0] * grid[1] * grid[2]
        pixels = torch.randn(patches, patch_dim, generator=rng)
        return MultiModalFeature(name, "image", PlaceholderRange(0, patches // 4), patches, grid, pixels)

    try:
        broken = EncoderBatch((item("broken", (1, 4, 4), patch_dim=vision.patch_dim + 1),), frozenset({"r0"}))
        good = EncoderBatch((item("a", (1, 4, 6)), item("b", (1, 8, 4))), frozenset({"r1"}))
        worker.submit(broken, None)
        worker.submit(good, None)
        assert not worker.has_room
        with pytest.raises(RuntimeError, match="already has 2 batches"):
            worker.submit(good, None)
        finished = []
        deadline = time.monotonic() + 30
        while len(finished) < 2 and time.monotonic() < deadline:
            finished += worker.poll(timeout=0.5)
        by_batch = {id(done.batch): done for done in finished}
        assert isinstance(by_batch[id(broken)].error, EncoderBatchError) and not by_batch[id(broken)].embeddings
        result = by_batch[id(good)]
        assert result.error is None and worker.has_room and worker.dead_error is None
        expected = runner.execute(good)
        assert set(result.embeddings) == {"a", "b"}
        for name in ("a", "b"):
            assert torch.equal(result.embeddings[name], expected[name]), name
        assert worker.stats.num_batches == 1 and worker.stats.copy_out_bytes == 14 * vision.out_hidden_size * 4
    finally:
        worker.shutdown()
        worker.shutdown()


def test_an_encoder_process_that_cannot_start_is_the_engines_start_up_error(monkeypatch):
    before = _leftovers()
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(EncoderProcessDiedError, match="exited while starting"):
        make_llm("tiny-qwen2-vl", **PROCESS, **CPU)
    monkeypatch.undo()
    assert _leftovers() <= before


def test_encoder_process_modes_that_cannot_run_here_say_why():
    with pytest.raises(ConfigError, match="needs a concurrent mode"):
        make_llm("tiny-qwen2-vl", multiplex="time", encoder_process=True, **CPU)
    if not torch.cuda.is_available():
        with pytest.raises(MPSUnavailableError, match="needs CUDA; this engine runs on cpu"):
            make_llm("tiny-qwen2-vl", multiplex="mps", **CPU)
        with pytest.raises(ConfigError, match="green contexts"):
            make_llm("tiny-qwen2-vl", multiplex="space", encoder_process=True, **CPU)
    elif mps_daemon_problem() is not None:
        with pytest.raises(MPSUnavailableError, match="needs an NVIDIA MPS daemon"):
            make_llm("tiny-qwen2-vl", multiplex="mps", device="cuda", max_model_len=256)


# ---- on the GPU, under an MPS daemon ---------------------------------------------------------------------------

def _gpu_modes() -> list[tuple[str, dict]]:
    modes = [("mps", dict(multiplex="mps", multiprocess=True))]  # its percentage must precede the core's CUDA
    if green_context_support(torch.device("cuda")) is None:
        modes.append(("space", dict(multiplex="space", encoder_sms="20,100")))
        modes.append(("space-process", dict(multiplex="space", encoder_sms="20,100", encoder_process=True)))
    return modes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_greedy_tokens_are_identical_across_time_space_mps_and_space_across_processes(model):
    problem = mps_daemon_problem()
    if problem is not None:
        pytest.skip(problem)
    prompts = _mixed_prompts(seed=17, count=12)
    gpu = dict(device="cuda", dtype="float32", max_model_len=1024)
    expected = _generate(model, prompts, multiplex="time", **gpu)
    for name, kwargs in _gpu_modes():
        assert _generate(model, prompts, **kwargs, **gpu) == expected, name


def test_a_bare_cuda_device_is_given_its_index_before_the_encoder_process_starts():
    """The H200 run: a core on `cuda` handed the encoder process `cuda`, which torch.cuda.set_device refuses."""
    from spaceserve.runtime.device import device_with_index

    assert device_with_index(torch.device("cuda"), lambda: 3) == torch.device("cuda", 3)
    assert device_with_index(torch.device("cuda", 1), lambda: 3) == torch.device("cuda", 1)
    assert device_with_index(torch.device("cpu"), lambda: 3) == torch.device("cpu")
