"""Clients that go away mid-request abort it (KV blocks and encoder-cache references freed); an engine failure
reaches the client as a 503 and /health reports it."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.llm_factory import TEST_KV_CACHE_BYTES
from tests.server.conftest import SERVED_NAME, ThreadedServer, data_url, png_bytes, run

LONG_REQUEST = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def image_chat(seed: int, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(seed))}}, {"type": "text", "text": "go"}]
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], **LONG_REQUEST, **extra}


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_client_leaving_mid_stream_aborts_its_request(live_server, endpoint):
    aborted_before = live_server.recorder.count("abort")
    if endpoint == "chat":
        url, body = "/v1/chat/completions", image_chat(50, stream=True)
    else:
        url, body = "/v1/completions", {"model": SERVED_NAME, "prompt": "a long one", "stream": True, **LONG_REQUEST}
    with httpx.Client(base_url=live_server.base_url, timeout=30) as client:
        with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [next(lines) for _ in range(4)]  # a few events, then hang up
    assert all(line.startswith("data: ") or not line for line in received)
    wait_for(lambda: live_server.recorder.count("abort") == aborted_before + 1)
    live_server.assert_idle_and_clean()


def test_a_client_leaving_a_plain_request_aborts_it(live_server):
    aborted_before = live_server.recorder.count("abort")

    async def leave_while_running():
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as client:
            task = asyncio.create_task(client.post("/v1/chat/completions", json=image_chat(51)))
            while live_server.engine.stats.num_running == 0:
                await asyncio.sleep(0.005)
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    run(leave_while_running())
    wait_for(lambda: live_server.recorder.count("abort") == aborted_before + 1)
    live_server.assert_idle_and_clean()


def test_an_engine_failure_becomes_503_and_unhealthy():
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model="tiny-qwen2-vl", max_model_len=256, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES)
    )
    server = ThreadedServer(create_app(engine, ServerArgs(served_model_name=SERVED_NAME)))
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            body = {"model": SERVED_NAME, "prompt": "x", "max_tokens": 3}
            assert client.post("/v1/completions", json=body).status_code == 200

            def broken_step():
                raise RuntimeError("simulated CUDA error")

            engine.call_in_engine(lambda e: setattr(e, "step", broken_step))
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 503 and "engine is not running" in response.json()["error"]["message"]
            health = client.get("/health")
            assert health.status_code == 503 and "engine is not running" in health.json()["error"]
            for text in (response.text, health.text):  # the internal error stays in the server log
                assert "simulated" not in text and "RuntimeError" not in text and " at 0x" not in text
            again = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]})
            assert again.status_code == 503 and again.json()["error"]["type"] == "ServiceUnavailableError"
    finally:
        server.stop()
        engine.shutdown()
