"""The OpenAI endpoints end to end over loopback with the official openai client."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np

from spaceserve import SamplingParams
from tests.server.conftest import CUSTOM_SYSTEM_PROMPT, SERVED_NAME, data_url, png_bytes, run

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "tau", "rho", "kappa"]


def random_text(rng: np.random.Generator, low: int = 3, high: int = 15) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


def user(text: str, *images: bytes) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def reference_chat(live_server, messages, max_tokens, stop=()):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=tuple(stop))
    return live_server.reference.chat(messages, params)[0]


def test_models_and_health(live_server):
    models = live_server.client().models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].model_extra["max_model_len"] == 512
    assert httpx.get(f"{live_server.base_url}/health").status_code == 200


def test_chat_equals_the_offline_engine_with_the_model_directory_template(live_server):
    rng = np.random.default_rng(1)
    client = live_server.client()
    cases = [user(random_text(rng)), user(random_text(rng), png_bytes(11)), user(random_text(rng), png_bytes(12), png_bytes(13))]
    for messages in cases:
        response = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16, temperature=0)
        expected = reference_chat(live_server, messages, 16)
        choice = response.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
        assert choice.finish_reason == expected.outputs[0].finish_reason
        assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
        assert response.model == SERVED_NAME and response.id.startswith("chatcmpl-")
        assert CUSTOM_SYSTEM_PROMPT in expected.prompt  # the model directory's template, not the built-in one
    live_server.assert_idle_and_clean()


def _stream_text(client, **kwargs):
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streamed_chat_equals_plain_chat_for_greedy_requests(live_server):
    rng = np.random.default_rng(2)
    client = live_server.client()
    for index in range(4):
        images = [png_bytes(20 + index)] if index % 2 else []
        kwargs = dict(model=SERVED_NAME, messages=user(random_text(rng), *images), max_tokens=24, temperature=0)
        plain = client.chat.completions.create(**kwargs)
        text = plain.choices[0].message.content
        if index >= 2:  # a stop string inside the text: streaming must never send what the stop takes back
            stop = next((text[i : i + 3] for i in range(2, len(text) - 3) if "\ufffd" not in text[i : i + 3]), None)
            assert stop is not None, text
            kwargs["stop"] = [stop]
            plain = client.chat.completions.create(**kwargs)
            assert plain.choices[0].finish_reason == "stop"
        chunks, streamed = _stream_text(client, stream_options={"include_usage": True}, **kwargs)
        assert streamed == plain.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
        assert all(c.usage is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1
    live_server.assert_idle_and_clean()


def test_stream_wire_format_ends_with_done_and_omits_usage_unless_asked(live_server):
    body = {"model": SERVED_NAME, "messages": user("wire format"), "max_tokens": 5, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live_server.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "chat.completion.chunk" and p.get("usage") is None for p in payloads)


def test_completions_plain_streamed_and_token_ids(live_server):
    client = live_server.client()
    rng = np.random.default_rng(3)
    prompt = random_text(rng)
    plain = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=20, temperature=0)
    expected = live_server.reference.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20))[0]
    assert plain.choices[0].text == expected.outputs[0].text and plain.object == "text_completion"
    assert plain.usage.prompt_tokens == len(expected.prompt_token_ids)

    chunks = list(
        client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage == plain.usage

    ids = [int(t) for t in rng.integers(0, 250, size=12)]
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=8, temperature=0)
    reference = live_server.reference.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=8))
    assert by_ids.choices[0].text == reference[0].outputs[0].text and by_ids.usage.prompt_tokens == 12


def test_sampling_extensions_and_max_completion_tokens(live_server):
    client = live_server.client()
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=user("extensions"), max_completion_tokens=7, temperature=0.8, top_p=0.9, seed=5,
        extra_body={"top_k": 20, "ignore_eos": True, "min_tokens": 7},
    )
    again = client.chat.completions.create(
        model=SERVED_NAME, messages=user("extensions"), max_completion_tokens=7, temperature=0.8, top_p=0.9, seed=5,
        extra_body={"top_k": 20, "ignore_eos": True, "min_tokens": 7},
    )
    assert response.usage.completion_tokens == 7 and response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == again.choices[0].message.content  # seeded


def test_local_files_only_under_the_allowed_path(live_server):
    inside = live_server.media_dir / "inside.png"
    inside.write_bytes(png_bytes(30))
    outside = live_server.outside_dir / "outside.png"
    outside.write_bytes(png_bytes(30))
    client = live_server.client()

    def ask(url):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]
        return client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4, temperature=0)

    by_file = ask(f"file://{inside}")
    by_data = ask(data_url(png_bytes(30)))
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    for url, message in [
        (f"file://{outside}", "outside the allowed local media path"),
        (f"file://{live_server.media_dir}/../{outside.parent.name}/outside.png", "outside the allowed local media path"),
        ("https://example.com/cat.png", "http(s) image URLs are not fetched"),
    ]:
        try:
            ask(url)
        except Exception as exc:  # noqa: BLE001 - checked below
            assert type(exc).__name__ == "BadRequestError" and message in str(exc), exc
        else:
            raise AssertionError(f"{url} was accepted")


def test_metrics_report_latencies_and_engine_state(live_server):
    client = live_server.client()
    client.chat.completions.create(model=SERVED_NAME, messages=user("metrics", png_bytes(40)), max_tokens=6, temperature=0)
    text = httpx.get(f"{live_server.base_url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    label = f'{{model_name="{SERVED_NAME}"}}'
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time", "encoder_queue_time"):
        suffix = "seconds"
        assert samples[f"spaceserve:{histogram}_{suffix}_count{label}"] >= 1, histogram
        assert samples[f"spaceserve:{histogram}_{suffix}_sum{label}"] >= 0, histogram
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "encoder_cache_usage_perc", "encoder_queue_length"):
        assert f"spaceserve:{gauge}{label}" in samples, gauge
    live_server.wait_idle()
    text = httpx.get(f"{live_server.base_url}/metrics").text
    assert f"spaceserve:num_requests_running{label} 0.0" in text and f"spaceserve:kv_cache_usage_perc{label} 0.0" in text
    assert samples[f"spaceserve:generation_tokens_total{label}"] >= 6


def test_a_burst_of_concurrent_requests_returns_every_kv_block(live_server):
    client = live_server.async_client()
    rng = np.random.default_rng(4)

    async def one(index: int):
        text = random_text(rng)
        images = [png_bytes(100 + index)] if index % 3 == 0 else []
        if index % 4 == 1:
            stream = await client.chat.completions.create(
                model=SERVED_NAME, messages=user(text, *images), max_tokens=12, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        if index % 4 == 2:
            response = await client.completions.create(model=SERVED_NAME, prompt=text, max_tokens=12, temperature=0)
            return response.choices[0].text
        response = await client.chat.completions.create(
            model=SERVED_NAME, messages=user(text, *images), max_tokens=12, temperature=0
        )
        return response.choices[0].message.content

    async def burst():
        try:
            return await asyncio.gather(*(one(i) for i in range(24)))
        finally:
            await client.close()

    results = run(burst())
    assert len(results) == 24 and all(isinstance(r, str) for r in results)
    live_server.assert_idle_and_clean()
    assert live_server.engine.stats.num_free_kv_blocks == live_server.engine.stats.num_kv_blocks
