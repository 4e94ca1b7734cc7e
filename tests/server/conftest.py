"""A real uvicorn server on a free loopback port, in a background thread, serving a tiny model whose dummy weights
are perturbed so greedy text varies; plus an offline LLM with the same weights as the reference."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from spaceserve.server.http_limits import uvicorn_config
from spaceserve.tokenizer.chat_template import QWEN2_VL_CHAT_TEMPLATE
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm
from tests.tiny_checkpoints import PRESETS
from tests.tiny_tokenizer import write_tiny_tokenizer

SERVED_NAME = "tiny-vl"
CUSTOM_SYSTEM_PROMPT = "You are the spaceserve test model."
ENGINE_KWARGS = dict(
    load_format="dummy",
    max_model_len=512,
    kv_cache_memory_bytes=TEST_KV_CACHE_BYTES,
    limit_mm_per_prompt={"image": 2},
)


class FinishRecorder:
    """A stat logger remembering how each request ended (called on the engine thread)."""

    def __init__(self) -> None:
        self.finish_reasons: dict[str, str] = {}
        self.lock = threading.Lock()

    def record_finished(self, output) -> None:
        with self.lock:
            self.finish_reasons[output.request_id] = output.outputs[0].finish_reason

    def count(self, reason: str) -> int:
        with self.lock:
            return sum(1 for r in self.finish_reasons.values() if r == reason)


def perturb_weights(model: torch.nn.Module, seed: int = 7) -> None:
    """The noise is drawn on the CPU (the seeded generator gives the same draws everywhere) and moved to each
    parameter's device, so the server and the offline reference get the same weights on a GPU as on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_((torch.randn(param.shape, generator=generator) * 0.2).to(param.device))


def png_bytes(seed: int, height: int = 48, width: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_model_dir(path: Path) -> Path:
    """The tiny preset's configs, a real tokenizer, and a chat template of its own (a different system prompt)."""
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(PRESETS / "tiny-qwen2-vl" / name, path / name)
    write_tiny_tokenizer(path)
    template = QWEN2_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", CUSTOM_SYSTEM_PROMPT)
    assert template != QWEN2_VL_CHAT_TEMPLATE
    (path / "chat_template.jinja").write_text(template)
    return path


class ThreadedServer:
    """The server's own uvicorn settings (header deadline, keep-alive), on a free loopback port."""

    def __init__(self, app, args: ServerArgs | None = None) -> None:
        config = uvicorn_config(app, args or ServerArgs(), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class LiveServer:
    base_url: str
    engine: AsyncLLM
    recorder: FinishRecorder
    reference: object  # offline LLM with the same weights
    media_dir: Path
    outside_dir: Path

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def utility(self, method: str, *args):
        """An engine-core utility call (works wherever the core runs)."""
        return run(self.engine.call_utility(method, *args))

    def wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.utility("has_unfinished_requests"):
            if time.monotonic() > deadline:
                raise TimeoutError("the engine still has requests in flight")
            time.sleep(0.01)

    def assert_idle_and_clean(self) -> None:
        self.wait_idle()
        self.utility("check_idle_integrity")
        free, total = self.utility("kv_block_counts")
        assert free == total


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("model"))
    media_dir = tmp_path_factory.mktemp("media")
    outside_dir = tmp_path_factory.mktemp("outside")
    recorder = FinishRecorder()
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), **ENGINE_KWARGS), stat_loggers=[recorder])
    engine.call_in_engine(lambda e: perturb_weights(e.model))
    reference = make_llm(str(model_dir), **ENGINE_KWARGS)
    perturb_weights(reference.llm_engine.core.model)
    args = ServerArgs(served_model_name=SERVED_NAME, allowed_local_media_path=str(media_dir))
    server = ThreadedServer(create_app(engine, args), args)
    try:
        yield LiveServer(server.base_url, engine, recorder, reference, media_dir, outside_dir)
    finally:
        server.stop()
        engine.shutdown()


def run(coro):
    return asyncio.run(coro)
