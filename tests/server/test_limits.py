"""What a slow, large, unauthenticated or hostile client may hold, over real HTTP: body and header deadlines, the body
cap, body-parse errors, the API key, media sources that stall (FIFOs, slow remotes) and a request's media budget,
and the SSRF checks as the server applies them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.llm_factory import TEST_KV_CACHE_BYTES
from tests.server.conftest import ThreadedServer, data_url, png_bytes, run

NAMES = ("tiny-a", "tiny-b")
API_KEY = "sk-test-7f3a"
STALL = threading.Event()  # set: the stalling media server lets its requests go


class _MediaHandler(BaseHTTPRequestHandler):
    image = png_bytes(77)

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/stall":
            STALL.wait(60)
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MediaHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    STALL.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM.from_engine_args(EngineArgs(
        model="tiny-qwen2-vl", max_model_len=512, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
        limit_mm_per_prompt={"image": 64},
    ))
    yield engine
    engine.shutdown()


def serve(engine, **kwargs):
    args = ServerArgs(served_model_name=NAMES, **kwargs)
    return ThreadedServer(create_app(engine, args), args)


@pytest.fixture(scope="module")
def limited(engine, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("limited-media")
    server = serve(
        engine, header_timeout_s=0.5, body_timeout_s=0.5, max_request_body_bytes=1 << 20,
        allowed_local_media_path=str(media_dir), media_max_request_bytes=3 * len(png_bytes(5)) + 100,
        media_timeout_s=20,
    )
    yield server, media_dir
    server.stop()


def chat_body(content, **extra):
    return {"model": NAMES[0], "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def assert_openai_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error


def test_body_parse_errors_and_unknown_routes_answer_in_openai_format(limited):
    server, _ = limited
    url = f"{server.base_url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    invalid_utf8 = b'{"model": "tiny-a", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert_openai_error(httpx.post(url, content=invalid_utf8, headers=headers), 400, "could not be parsed")
    deep = ("[" * 10000 + "]" * 10000).encode()
    assert_openai_error(httpx.post(url, content=b'{"messages": ' + deep + b"}", headers=headers), 400, "")
    assert_openai_error(httpx.get(f"{server.base_url}/v1/nothing-here"), 404, "Not Found")


def test_a_body_over_the_cap_is_a_413_with_or_without_content_length(limited):
    server, _ = limited
    big = json.dumps(chat_body("x" * (2 << 20))).encode()
    url = f"{server.base_url}/v1/chat/completions"
    assert_openai_error(httpx.post(url, content=big, headers={"content-type": "application/json"}), 413, "limit of")

    def chunks():
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(chunked, 413, "limit of")


def _raw_connection(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_slow_sender_is_cut_off_while_others_are_served(limited):
    server, _ = limited
    slow_headers = _raw_connection(server.base_url)
    slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    slow_body = _raw_connection(server.base_url)
    body = json.dumps({"model": NAMES[0], "prompt": "x", "max_tokens": 2}).encode()
    slow_body.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode() + body[:5]
    )
    served = httpx.post(f"{server.base_url}/v1/completions", json={"model": NAMES[0], "prompt": "y", "max_tokens": 2})
    assert served.status_code == 200
    header_reply = _read_all(slow_headers)  # the server closes the connection: the read ends
    assert header_reply.startswith(b"HTTP/1.1 408")
    body_reply = _read_all(slow_body).decode()
    assert body_reply.startswith("HTTP/1.1 408") and '"RequestTimeoutError"' in body_reply
    slow_headers.close()
    slow_body.close()


def test_the_api_key_guards_every_v1_route(engine):
    server = serve(engine, api_key=(API_KEY,))
    try:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                response = httpx.request(method, f"{server.base_url}{path}", headers=headers, json={})
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
        reply = good.completions.create(model=NAMES[1], prompt="hi", max_tokens=2)
        assert reply.model == NAMES[0] and reply.usage.completion_tokens == 2
        assert [m.id for m in good.models.list().data] == list(NAMES)
        bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=NAMES[0], prompt="hi", max_tokens=2)
    finally:
        server.stop()


def test_fifos_in_the_allowed_folder_neither_hang_their_request_nor_block_others(limited):
    server, media_dir = limited
    fifos = []
    for index in range(8):
        fifo = media_dir / f"pipe{index}.png"
        os.mkfifo(fifo)
        fifos.append(fifo)

    async def many():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            stuck = [client.post("/v1/chat/completions", json=chat_body([image(f"file://{f}")])) for f in fifos]
            plain = client.post("/v1/chat/completions", json=chat_body("unrelated"))
            return await asyncio.gather(*stuck, plain)

    *refused, plain = run(many())
    assert all(r.status_code == 400 and "not a regular file" in r.json()["error"]["message"] for r in refused)
    assert plain.status_code == 200


def test_stalled_http_media_delay_only_their_own_requests(engine, media_server):
    STALL.clear()
    server = serve(engine, allow_http_media=True, allow_private_media_addresses=True, media_timeout_s=30)
    try:
        async def scenario():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                stalled = [
                    asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body([image(f"{media_server}/stall")])))
                    for _ in range(8)
                ]
                await asyncio.sleep(0.3)
                others = await asyncio.gather(*(
                    client.post("/v1/chat/completions", json=chat_body([image(data_url(png_bytes(i)))]))
                    for i in range(4)
                ))
                still_waiting = sum(not task.done() for task in stalled)
                STALL.set()
                return others, still_waiting, await asyncio.gather(*stalled)

        others, still_waiting, stalled = run(scenario())
        assert [r.status_code for r in others] == [200] * 4
        assert still_waiting == 8  # the others were answered while every stalled fetch was still waiting
        assert [r.status_code for r in stalled] == [200] * 8
    finally:
        STALL.set()
        server.stop()


def test_the_server_refuses_its_own_network_unless_allowed(engine, media_server):
    port = media_server.rsplit(":", 1)[1]
    server = serve(engine, allow_http_media=True)
    try:
        for url in (f"{media_server}/image", f"http://2130706433:{port}/image", f"http://localhost:{port}/image"):
            response = httpx.post(f"{server.base_url}/v1/chat/completions", json=chat_body([image(url)]))
            assert_openai_error(response, 400, "loopback, private or link-local")
        response = httpx.post(
            f"{server.base_url}/v1/chat/completions", json=chat_body([image(f"http://u:p@127.0.0.1:{port}/i")])
        )
        assert_openai_error(response, 400, "credentials")
    finally:
        server.stop()


def test_repeated_media_are_fetched_once_and_a_request_budget_caps_the_rest(limited):
    server, media_dir = limited
    files = []
    for index in range(4):
        path = media_dir / f"image{index}.png"
        path.write_bytes(png_bytes(5 + index))
        files.append(path)
    url = f"{server.base_url}/v1/chat/completions"
    sixty_of_one = chat_body([image(f"file://{files[0]}")] * 60 + [{"type": "text", "text": "?"}])
    assert httpx.post(url, json=sixty_of_one, timeout=60).status_code == 200
    four_distinct = chat_body([image(f"file://{f}") for f in files])
    assert_openai_error(httpx.post(url, json=four_distinct, timeout=60), 400, "per request")


def test_a_client_leaving_early_logs_no_error(live_server):
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.ERROR)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addHandler(handler)
    try:
        # the generation is far longer than the client waits (450 tokens against 50 ms), plain and streamed
        body = {"model": "tiny-vl", "prompt": "bye", "max_tokens": 450, "ignore_eos": True}
        for _ in range(3):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{live_server.base_url}/v1/completions", json=body, timeout=0.05)
        with httpx.stream("POST", f"{live_server.base_url}/v1/completions", json={**body, "stream": True}) as reply:
            next(reply.iter_lines())  # the first event, then the client hangs up
        live_server.wait_idle()
        time.sleep(0.2)
    finally:
        uvicorn_logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
