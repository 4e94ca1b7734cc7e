"""A bounded, seeded soak over loopback: valid requests (chat, images, streams, completions, n > 1), bad inputs and
clients that hang up at random moments, mixed and concurrent. Afterwards the engine is alive, every request that
waited for its answer got the one it should, every KV block is free and no encoder-cache entry is referenced."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from tests.server.conftest import SERVED_NAME, data_url, png_bytes, run

NUM_REQUESTS = 160
CONCURRENCY = 12
IMAGES = [data_url(png_bytes(200 + i)) for i in range(4)]


def _chat(content, **extra) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def _image_chat(rng: np.random.Generator, **extra) -> dict:
    url = IMAGES[int(rng.integers(len(IMAGES)))]
    return _chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "soak"}], **extra)


BAD = [
    ("chat", _chat("x", seed=1 << 64, temperature=1.0)),
    ("chat", _chat("x", temperature=-1)),
    ("chat", _chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}])),
    ("chat", {"model": SERVED_NAME, "messages": [{"role": "robot", "content": "x"}]}),
    ("chat", _chat([{"type": "image_url", "image_url": {"url": IMAGES[0]}}], mm_processor_kwargs={"max_pixels": 10**12})),
    ("chat", _chat("x", chat_template_kwargs={"messages": 1})),
    ("chat", _chat("x", stop_token_ids=[1 << 40])),
    ("chat", _chat("x", max_tokens=5000)),
    ("completions", {"model": SERVED_NAME, "prompt": [1, 2, 1 << 30]}),
    ("raw", b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "\xff"}]}'),
]


async def _one(client: httpx.AsyncClient, index: int, rng: np.random.Generator) -> tuple[str, int | None]:
    kind = rng.choice(["valid", "bad", "hang_up"], p=[0.5, 0.25, 0.25])
    if kind == "bad":
        endpoint, body = BAD[int(rng.integers(len(BAD)))]
        if endpoint == "raw":
            response = await client.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
        else:
            response = await client.post(f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body)
        assert "error" in response.json(), response.text
        return kind, response.status_code
    choice = int(rng.integers(5))
    if choice == 0:
        url, body = "/v1/completions", {"model": SERVED_NAME, "prompt": f"soak {index}", "max_tokens": 5}
    elif choice == 1:
        url, body = "/v1/chat/completions", _image_chat(rng)
    elif choice == 2:
        url, body = "/v1/chat/completions", _chat(f"n {index}", n=2, seed=index, temperature=0.9)
    else:
        url, body = "/v1/chat/completions", _chat(f"stream {index}", stream=True)
    if kind == "hang_up":
        body = {**body, "max_tokens": 40, "ignore_eos": True}
        if body.get("stream") and rng.random() < 0.5:
            async with client.stream("POST", url, json=body) as response:
                async for _ in response.aiter_lines():
                    if rng.random() < 0.3:
                        break  # leave mid-stream
            return kind, None
        try:
            timeout = float(rng.uniform(0.001, 0.015) if rng.random() < 0.6 else rng.uniform(0.015, 0.25))
            await client.post(url, json=body, timeout=timeout)
        except httpx.TimeoutException:
            return kind, None
        return kind, 200
    response = await client.post(url, json=body)
    if body.get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text
    return kind, response.status_code


def test_soak_mixed_clients_leave_the_engine_alive_and_clean(live_server):
    rng = np.random.default_rng(2026)

    async def soak():
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as client:
            results = []
            for start in range(0, NUM_REQUESTS, CONCURRENCY):
                batch = [_one(client, i, rng) for i in range(start, min(start + CONCURRENCY, NUM_REQUESTS))]
                results += await asyncio.wait_for(asyncio.gather(*batch), 120)
            return results

    results = run(soak())
    assert len(results) == NUM_REQUESTS
    for kind, status in results:
        if kind == "valid":
            assert status == 200
        elif kind == "bad":
            assert status == 400
    assert {kind for kind, _ in results} == {"valid", "bad", "hang_up"}
    assert live_server.engine.is_running
    assert httpx.get(f"{live_server.base_url}/health").status_code == 200
    live_server.assert_idle_and_clean()  # every KV block free, no encoder-cache entry referenced
