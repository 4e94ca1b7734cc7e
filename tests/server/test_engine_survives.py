"""Requests that once killed the engine thread (every later request got a 503 until restart): a seed outside int64,
and clients that disconnect just as their request is queued. And when the engine does die, every request already
handed to it is answered."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.llm_factory import TEST_KV_CACHE_BYTES
from tests.server.conftest import SERVED_NAME, ThreadedServer, run
from tests.server.test_bad_requests import assert_still_serving

INT64_MAX = (1 << 63) - 1


@pytest.mark.parametrize("seed", [1 << 63, 1 << 64, (1 << 70) + 3, -(1 << 63) - 1])
def test_a_seed_outside_int64_is_a_400_and_the_engine_lives(live_server, seed):
    for url, body in [
        ("/v1/completions", {"model": SERVED_NAME, "prompt": "seeded", "max_tokens": 3, "temperature": 1.0, "seed": seed}),
        ("/v1/chat/completions", {
            "model": SERVED_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0.7,
            "seed": seed,
        }),
    ]:
        response = httpx.post(f"{live_server.base_url}{url}", json=body, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "seed" and "seed must be an integer in" in error["message"], error
    assert_still_serving(live_server)
    assert live_server.engine.is_running


def test_the_int64_edges_are_valid_seeds(live_server):
    for seed in (INT64_MAX, -(1 << 63)):
        body = {"model": SERVED_NAME, "prompt": "edge", "max_tokens": 3, "temperature": 1.0, "seed": seed}
        first = httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=30)
        again = httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=30)
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_clients_that_hang_up_while_their_request_is_queued_never_kill_the_engine(live_server):
    """The issue's repro (300 `curl -m 0.01`) in a bounded, seeded form: client timeouts spread over the window in
    which the request is being processed and queued, for both endpoints, many at once."""

    async def hang_ups():
        async with httpx.AsyncClient(base_url=live_server.base_url) as client:
            async def one(index: int) -> None:
                timeout = 0.002 + 0.0015 * (index % 12)
                if index % 2:
                    url, body = "/v1/completions", {"model": SERVED_NAME, "prompt": f"gone {index}", "max_tokens": 2}
                else:
                    url = "/v1/chat/completions"
                    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": f"gone {index}"}], "max_tokens": 2}
                try:
                    await client.post(url, json=body, timeout=timeout)
                except httpx.TimeoutException:
                    pass

            for start in range(0, 240, 8):
                await asyncio.gather(*(one(i) for i in range(start, start + 8)))

    run(hang_ups())
    assert live_server.engine.is_running, live_server.engine.dead_error
    assert_still_serving(live_server)
    live_server.assert_idle_and_clean()


def test_requests_already_taken_by_a_dying_engine_are_answered():
    """The engine core's loop takes every queued message at once, then handles them one by one. If one of them fails
    the whole loop (here an abort, by a patched core), the front must hear of it and answer every request taken
    with it (a 503), not leave them hanging."""
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model="tiny-qwen2-vl", max_model_len=256, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES)
    )
    server = ThreadedServer(create_app(engine, ServerArgs(served_model_name=SERVED_NAME)))
    release = threading.Event()
    stepping = threading.Event()
    try:
        def patch(e):
            step = e.step

            def held_step():
                stepping.set()
                release.wait(20)  # while the loop is here, commands pile up in its queue
                return step()

            def broken_abort(request_ids, reason=None):
                raise RuntimeError("simulated engine fault")

            e.step = held_step
            e.abort_requests = broken_abort

        engine.call_in_engine(patch)

        async def many():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
                body = {"model": SERVED_NAME, "prompt": "x", "max_tokens": 3}
                first = asyncio.create_task(client.post("/v1/completions", json=body))
                while not stepping.is_set():  # the loop took the first request and is in its step
                    await asyncio.sleep(0.005)
                with pytest.raises(httpx.TimeoutException):  # its add is queued, then its abort
                    await client.post("/v1/completions", json=body, timeout=0.5)
                rest = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(5)]
                await asyncio.sleep(0.5)
                release.set()
                return await asyncio.wait_for(asyncio.gather(first, *rest), 20)

        responses = run(many())
        assert [r.status_code for r in responses] == [503] * 6
        assert all(r.json()["error"]["type"] == "ServiceUnavailableError" for r in responses)
        assert not engine.is_running
    finally:
        release.set()
        server.stop()
        engine.shutdown()


def test_an_unexpected_failure_adding_one_request_ends_only_that_request(live_server):
    """Not an input error (those are 400s): a bug or fault while the core adds one request. That request gets a
    500; the loop, and every other request, goes on."""
    failed = threading.Event()

    def patch(core):
        add = core.add_request

        def add_once_broken(request):
            if not failed.is_set():
                failed.set()
                raise RuntimeError("simulated fault adding a request")
            return add(request)

        core.add_request = add_once_broken
        return add

    original = live_server.engine.call_in_engine(patch)
    try:
        body = {"model": SERVED_NAME, "prompt": "fault", "max_tokens": 3}
        response = httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 500, response.text
        assert "simulated" not in response.text and response.json()["error"]["type"] == "InternalServerError"
        assert_still_serving(live_server)
        assert live_server.engine.is_running
    finally:
        live_server.engine.call_in_engine(lambda core: setattr(core, "add_request", original))
    live_server.assert_idle_and_clean()
