"""`spaceserve serve` as a user runs it (a subprocess on a loopback port): the engine's own logs on stderr, errors that
name CLI flags instead of tracebacks, help lines with defaults; and a checkpoint without tokenizer files served with
--skip-tokenizer-init."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spaceserve.cli import main as cli_main
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.cli_fields import flags_in_message
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.llm_factory import TEST_KV_CACHE_BYTES
from tests.server.conftest import ThreadedServer
from tests.tiny_checkpoints import PRESETS

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "spaceserve.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_errors_name_flags_and_exit_without_a_traceback():
    if not __import__("torch").cuda.is_available():
        result = _cli("serve", "tiny-qwen2-vl", "--device", "cuda")
        expected = ("--device cuda was asked for", "use --device cpu")
    else:
        result = _cli("generate", "Qwen/Qwen2-VL-2B-Instruct", "--prompt", "hi")
        expected = ("--load-format dummy",)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert all(fragment in result.stderr for fragment in expected), result.stderr
    message = "'Qwen/Qwen2-VL-2B-Instruct' has no weights here (no downloads); pass load_format='dummy' for random weights"
    assert "pass --load-format dummy for" in flags_in_message(message, EngineArgs, ServerArgs)


def test_every_flag_has_a_help_line_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--max-num-batched-tokens", "(default: 8192)"), ("--media-max-bytes", "(default: 20971520 = 20 MiB)"),
        ("--api-key", "SPACESERVE_API_KEY"), ("--enable-prefix-caching", "--no-enable-prefix-caching"),
        ("--served-model-name", "SERVED_MODEL_NAME ..."), ("--chat-template", "Jinja"),
        ("--trust-remote-code", "changes nothing"), ("--tokenizer", "tokenizer.json"),
    ]:
        assert flag in text and default in text, (flag, default)
    flags = [word for word in text.split() if word.startswith("--") and word[2:3].isalpha()]
    assert len(set(flags)) > 50


def test_serve_shows_the_engine_logs_and_accepts_vllm_flags(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPACESERVE_API_KEY": "sk-env"}
    process = subprocess.Popen(
        [sys.executable, "-m", "spaceserve.cli", "serve", "tiny-qwen2-vl", "--port", str(port), "--max-model-len",
         "256", "--kv-cache-memory-bytes", str(TEST_KV_CACHE_BYTES), "--served-model-name", "a", "b",
         "--enable-prefix-caching", "--disable-log-requests", "--trust-remote-code", "--limit-mm-per-prompt",
         '{"image": 2}'],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        unauthorized = httpx.get(f"http://127.0.0.1:{port}/v1/models")
        assert unauthorized.status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-env"}).json()
        assert [m["id"] for m in models["data"]] == ["a", "b"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert "multiplex" in stderr and "KV cache" in stderr, stderr  # the engine's own INFO lines
    assert "trust_remote_code" in stderr and "API key required" in stderr


def _checkpoint_without_tokenizer(path: Path) -> Path:
    config = json.loads((PRESETS / "tiny-qwen2-vl" / "config.json").read_text())
    del config["bos_token_id"]
    (path / "config.json").write_text(json.dumps(config))
    shutil.copyfile(PRESETS / "tiny-qwen2-vl" / "preprocessor_config.json", path / "preprocessor_config.json")
    return path


def test_a_checkpoint_without_tokenizer_files_serves_token_ids_with_skip_tokenizer_init(tmp_path):
    model_dir = _checkpoint_without_tokenizer(tmp_path)
    kwargs = dict(model=str(model_dir), load_format="dummy", max_model_len=256, kv_cache_memory_bytes=TEST_KV_CACHE_BYTES)
    with pytest.raises(Exception, match="bos_token_id"):  # the byte-level fallback needs it
        AsyncLLM.from_engine_args(EngineArgs(**kwargs))
    engine = AsyncLLM.from_engine_args(EngineArgs(**kwargs, skip_tokenizer_init=True))
    args = ServerArgs(served_model_name="bare")
    server = ThreadedServer(create_app(engine, args), args)
    try:
        ids = [5, 17, 99, 200, 31]
        body = {"model": "bare", "prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        reply = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30).json()
        choice = reply["choices"][0]
        assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        assert choice["text"] == "" and len(choice["logprobs"]["token_logprobs"]) == 4
        for url, body, fragment in [
            ("/v1/completions", {"model": "bare", "prompt": "text"}, "skip_tokenizer_init"),
            ("/v1/chat/completions", {"model": "bare", "messages": [{"role": "user", "content": "x"}]}, "skip_tokenizer_init"),
            ("/v1/completions", {"model": "bare", "prompt": ids, "stop": ["x"]}, "stop strings need a tokenizer"),
        ]:
            response = httpx.post(f"{server.base_url}{url}", json=body, timeout=30)
            assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text
    finally:
        server.stop()
        engine.shutdown()
