"""Every kind of bad request gets an OpenAI error body naming the problem, and the server keeps serving."""

from __future__ import annotations

import base64
import struct
import zlib

import httpx
import openai
import pytest

from tests.server.conftest import SERVED_NAME, data_url, png_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height: an image bomb needs no more than its header to be caught."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def chat(content, **extra):
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


PNG = data_url(png_bytes(1))
CHAT_CASES = {
    "unknown model": ({**chat("hi"), "model": "gpt-4o"}, 404, "NotFoundError", "gpt-4o"),
    "missing messages": ({"model": SERVED_NAME}, 400, "BadRequestError", "messages"),
    "empty messages": ({"model": SERVED_NAME, "messages": []}, 400, "BadRequestError", "non-empty"),
    "bad base64": (chat([image_part("data:image/png;base64,@@not-base64@@")]), 400, "BadRequestError", "base64"),
    "bytes that are not an image": (
        chat([image_part(data_url(b"plain text, not pixels" * 8))]), 400, "BadRequestError", "not a recognised image"
    ),
    "decompression bomb": (chat([image_part(data_url(png_header_only(30000, 30000)))]), 400, "BadRequestError", "too large"),
    "over the pixel limit": (chat([image_part(data_url(png_header_only(9000, 9000)))]), 400, "BadRequestError", "exceeds the limit"),
    "aspect ratio": (chat([image_part(data_url(png_bytes(2, 2, 600)))]), 400, "BadRequestError", "aspect ratio"),
    "too many images": (chat([image_part(PNG)] * 3 + [{"type": "text", "text": "?"}]), 400, "BadRequestError", "limit_mm_per_prompt"),
    "prompt over the context": (chat("word " * 700), 400, "BadRequestError", "max_model_len"),
    "unsupported part": (chat([{"type": "input_audio", "input_audio": {}}]), 400, "BadRequestError", "input_audio"),
    "negative temperature": (chat("hi", temperature=-0.5), 400, "BadRequestError", "temperature"),
    "temperature not a number": (chat("hi", temperature="hot"), 400, "BadRequestError", "temperature"),
    "top_p zero": (chat("hi", top_p=0), 400, "BadRequestError", "top_p"),
    "max_tokens zero": (chat("hi", max_tokens=0), 400, "BadRequestError", "max_tokens"),
    "n zero": (chat("hi", n=0), 400, "BadRequestError", "n must be in [1, 128]"),
    "n too large": (chat("hi", n=1000), 400, "BadRequestError", "n must be in [1, 128]"),
    "min_tokens above max_tokens": (chat("hi", min_tokens=9), 400, "BadRequestError", "min_tokens"),
    "top_k below -1": (chat("hi", top_k=-3), 400, "BadRequestError", "top_k"),
    "top_logprobs above 20": (chat("hi", logprobs=True, top_logprobs=21), 400, "BadRequestError", "[0, 20]"),
    "top_logprobs without logprobs": (chat("hi", top_logprobs=2), 400, "BadRequestError", "needs logprobs"),
    "chat_template_kwargs naming messages": (
        chat("hi", chat_template_kwargs={"messages": []}), 400, "BadRequestError", "may not set messages"
    ),
    "chat_template_kwargs naming add_generation_prompt": (
        chat("hi", chat_template_kwargs={"add_generation_prompt": False}), 400, "BadRequestError",
        "may not set add_generation_prompt",
    ),
    "max_pixels not a number": (
        chat([image_part(PNG)], mm_processor_kwargs={"max_pixels": "lots"}), 400, "BadRequestError",
        "max_pixels must be a positive integer",
    ),
    "max_pixels absurd": (
        chat([image_part(PNG)], mm_processor_kwargs={"max_pixels": 10**12}), 400, "BadRequestError",
        "exceeds the limit of",
    ),
    "min_pixels absurd": (
        chat([image_part(PNG)], mm_processor_kwargs={"min_pixels": 10**12}), 400, "BadRequestError",
        "exceeds the limit of",
    ),
    "fps not finite": (chat("hi", mm_processor_kwargs={"fps": "nan"}), 400, "BadRequestError", "fps must be"),
    "unknown mm_processor_kwargs": (chat("hi", mm_processor_kwargs={"resize": 1}), 400, "BadRequestError", "resize"),
    "unknown role": (
        {"model": SERVED_NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "BadRequestError", "'wizard'"
    ),
    "stop_token_ids outside the vocabulary": (chat("hi", stop_token_ids=[10**6]), 400, "BadRequestError", "1000000"),
    "stop_token_ids negative": (chat("hi", stop_token_ids=[-1]), 400, "BadRequestError", "stop_token_ids"),
    "max_tokens past the context": (chat("hi", max_tokens=600), 400, "BadRequestError", "maximum context length"),
    "structured output": (
        chat("hi", response_format={"type": "json_object"}), 400, "BadRequestError", "structured output"
    ),
    "tools": (chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "BadRequestError", "tools"),
    "min_p": (chat("hi", min_p=0.1), 400, "BadRequestError", "'min_p' is not supported"),
    "guided_json": (chat("hi", guided_json={"type": "object"}), 400, "BadRequestError", "'guided_json' is not supported"),
    "priority": (chat("hi", priority=3), 400, "BadRequestError", "'priority' is not supported"),
    "use_beam_search": (chat("hi", use_beam_search=True), 400, "BadRequestError", "'use_beam_search' is not supported"),
    "image data URL over the size cap": (
        chat([image_part("data:image/png;base64," + "A" * (28 << 20))]), 400, "BadRequestError", "limit of"
    ),
}
COMPLETION_CASES = {
    "an empty batch": ({"model": SERVED_NAME, "prompt": []}, "empty list"),
    "a bad prompt in a batch": ({"model": SERVED_NAME, "prompt": [[1, 2], [1, 99999]]}, "prompt 1: prompt_token_ids"),
    "logprobs above 20": ({"model": SERVED_NAME, "prompt": "x", "logprobs": 21}, "[0, 20]"),
    "max_tokens past the context": ({"model": SERVED_NAME, "prompt": "x", "max_tokens": 512}, "maximum context length"),
    "token id out of vocab": ({"model": SERVED_NAME, "prompt": [1, 2, 99999]}, "99999"),
    "empty prompt": ({"model": SERVED_NAME, "prompt": ""}, "empty"),
    "echo": ({"model": SERVED_NAME, "prompt": "x", "echo": True}, "echo"),
    "prompt_logprobs": ({"model": SERVED_NAME, "prompt": "x", "prompt_logprobs": 2}, "'prompt_logprobs' is not supported"),
    "allowed_token_ids": ({"model": SERVED_NAME, "prompt": "x", "allowed_token_ids": [1, 2]}, "allowed_token_ids"),
}


def assert_still_serving(live_server) -> None:
    response = httpx.post(
        f"{live_server.base_url}/v1/completions",
        json={"model": SERVED_NAME, "prompt": "still there?", "max_tokens": 3, "temperature": 0},
        timeout=30,
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("name", list(CHAT_CASES))
def test_bad_chat_request(live_server, name):
    body, status, error_type, message = CHAT_CASES[name]
    response = httpx.post(f"{live_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert_still_serving(live_server)


@pytest.mark.parametrize("name", list(COMPLETION_CASES))
def test_bad_completion_request(live_server, name):
    body, message = COMPLETION_CASES[name]
    response = httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("body", [b'{"model": "tiny-vl", "messages": [', b"[1, 2, 3]", b"\xff\xfe"])
def test_body_that_is_not_a_json_object(live_server, body):
    response = httpx.post(
        f"{live_server.base_url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and ("JSON" in error["message"] or "dictionary" in error["message"])


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_a_temperature_json_cannot_write_as_a_number_is_refused(live_server, value):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % (SERVED_NAME, value)
    response = httpx.post(f"{live_server.base_url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "temperature" and "finite number >= 0" in error["message"], error
    assert_still_serving(live_server)


def test_the_openai_client_sees_typed_errors_and_streams_are_checked_before_they_start(live_server):
    client = live_server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad_image = [{"role": "user", "content": [image_part("data:image/png;base64," + base64.b64encode(b"xx").decode())]}]
    with pytest.raises(openai.BadRequestError, match="image 0"):
        client.chat.completions.create(model=SERVED_NAME, messages=bad_image, stream=True)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=SERVED_NAME, prompt="x", temperature=-1, stream=True)
    live_server.assert_idle_and_clean()
