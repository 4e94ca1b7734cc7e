"""The server with its engine core in a process of its own (the default outside tests): it answers, and when the core
process dies every later request gets a 503 and /health says so, at once and without a hang."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.server.conftest import ThreadedServer
from tests.llm_factory import TEST_KV_CACHE_BYTES


@pytest.fixture()
def process_server():
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model="tiny-qwen2-vl", max_model_len=512, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, multiprocess=True)
    )
    server = ThreadedServer(create_app(engine, ServerArgs(served_model_name="tiny")))
    try:
        yield server, engine
    finally:
        server.stop()
        engine.shutdown()


def test_a_dead_core_process_turns_into_503s_and_an_unhealthy_health(process_server):
    server, engine = process_server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    os.kill(engine._client.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.is_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.is_running
    assert httpx.get(f"{server.base_url}/health").status_code == 503
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert caught.value.status_code == 503
