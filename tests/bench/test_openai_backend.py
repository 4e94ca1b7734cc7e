"""The openai backend on loopback against spaceserve's own server, compared with the in-process backend."""

import random
import socket
import threading
import time

import pytest

from spaceserve.bench.report import read_jsonl, row_fields
from spaceserve.bench.runner import SweepConfig, WorkloadSet
from spaceserve.bench.workloads import IntRange, PromptTextMaker, WorkloadOptions
from spaceserve.cli import main
from spaceserve.engine.arg_utils import EngineArgs

WORKLOAD = [
    "--workload", "custom",
    "--images-per-request", "0:2",
    "--image-sizes", "56x56,112x84",
    "--prompt-len", "10",
    "--output-len", "5",
    "--num-prompts", "6",
    "--num-warmups", "1",
    "--request-rate", "inf",
    "--disable-tqdm",
]
KV_BYTES = 64 << 20


def _seed_with_some_refused() -> tuple[int, int]:
    """A seed whose requests include some with two images (over the limit of one), some with one and some with
    none."""
    while True:
        seed = random.randrange(1 << 20)
        options = WorkloadOptions(6, seed, ((56, 56), (112, 84)), IntRange(0, 2), IntRange(10, 10), IntRange(5, 5))
        specs, _ = WorkloadSet(SweepConfig("custom", options, (float("inf"),)), PromptTextMaker(None)).rate_point(0)
        counts = [len(spec.media) for spec in specs]
        if {0, 1, 2} <= set(counts):
            return seed, counts.count(2)


@pytest.fixture
def server_url():
    pytest.importorskip("uvicorn")
    app_module = pytest.importorskip("spaceserve.server.app")
    from spaceserve.engine.async_llm import AsyncLLM
    from spaceserve.server.args import ServerArgs

    import uvicorn

    engine = AsyncLLM.from_engine_args(
        EngineArgs("tiny-qwen2-vl", kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 1})
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app_module.create_app(engine, ServerArgs()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the loopback server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
        sock.close()


def test_loopback_server_gives_the_same_requests_as_in_process(server_url, tmp_path):
    seed, refused = _seed_with_some_refused()
    common = ["tiny-qwen2-vl", *WORKLOAD, "--seed", str(seed)]
    http_out, local_out = tmp_path / "http.jsonl", tmp_path / "local.jsonl"
    assert main(["bench", *common, "--backend", "openai", "--base-url", server_url, "--out", str(http_out)]) == 0
    local_args = ["--kv-cache-memory-bytes", str(KV_BYTES), "--limit-mm-per-prompt", "image=1"]
    assert main(["bench", *common, *local_args, "--out", str(local_out)]) == 0
    (http,), (local,) = read_jsonl(http_out), read_jsonl(local_out)
    assert list(http) == row_fields()
    assert http["backend"] == "openai" and http["base_url"] == server_url and http["device"] == "remote"
    assert http["status"] == "ok" and http["completed"] == 6 - refused and http["failed"] == refused
    (message,) = http["errors"]
    assert message.startswith("HTTP 400") and "image" in message
    # the same prompts reach the engine either way: same token counts, same refusals
    for name in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
        assert http[name] == local[name], name
    assert http["total_output_tokens"] == 5 * (6 - refused) and http["output_len_mismatches"] == 0
    assert http["p50_ttft_ms"] > 0 and http["mean_tpot_ms"] > 0 and http["p99_e2el_ms"] >= http["p99_ttft_ms"]
    assert http["mean_encoder_queue_ms"] is None and http["engine_settings"] is None
    assert local["mean_encoder_queue_ms"] is not None


def test_unreachable_server_counts_every_request_as_failed(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    out = tmp_path / "r.jsonl"
    args = ["bench", "tiny-qwen2-vl", *WORKLOAD, "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1"]
    assert main([*args, "--out", str(out)]) == 0
    (row,) = read_jsonl(out)
    assert row["status"] == "ok" and row["completed"] == 0 and row["failed"] == 6 and row["warmup_failed"] == 1
    (message,) = row["errors"]
    assert "ConnectError" in message
    assert row["p50_ttft_ms"] is None and row["request_throughput"] == 0
