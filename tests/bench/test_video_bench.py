"""The `video` bench workload: seeded synthetic clips encoded once and cached on disk, unique bytes per request with
the clip's frames; a tiny in-process run reports TTFT split into video decode, encode and prefill; the same
requests over HTTP (video_url data URLs) reach the engine identically, their split null."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import numpy as np
import pytest

from spaceserve.bench import video_workload
from spaceserve.bench.backends import OpenAIBackend
from spaceserve.bench.metrics import STATISTICS, TTFT_PARTS
from spaceserve.bench.report import format_table, read_jsonl, row_fields
from spaceserve.bench.video_workload import VideoWorkloadOptions, parse_codecs, parse_durations, parse_resolutions
from spaceserve.bench.workloads import IntRange, PromptTextMaker, WorkloadOptions, build_workload
from spaceserve.cli import main
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.multimodal.video.decode import decode_frames, probe_video

KV_BYTES = 64 << 20
SMALL_FRAMES = json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 16})


def _options(cache_dir, seed: int, num_requests: int = 4, **video) -> WorkloadOptions:
    video = {"resolutions": ((64, 48), (96, 64)), "durations_s": (2.0,), "codecs": ("h264", "hevc")} | video
    return WorkloadOptions(
        num_requests,
        seed,
        prompt_len=IntRange(8, 8),
        output_len=IntRange(3, 3),
        video=VideoWorkloadOptions(**video, content_seed=seed, cache_dir=str(cache_dir)),
    )


def test_clips_are_cached_seeded_unique_per_request_and_not_blank(tmp_path, monkeypatch):
    seed = random.randrange(1 << 20)
    encoded = []
    real_clip_path = video_workload.clip_path

    def counting_clip_path(key, video):
        if not (tmp_path / key.file_name(video)).exists():
            encoded.append(key)
        return real_clip_path(key, video)

    monkeypatch.setattr(video_workload, "clip_path", counting_clip_path)
    specs = build_workload("video", _options(tmp_path, seed, num_requests=6), PromptTextMaker(None))
    keys = {(s.media[0].width, s.media[0].height) for s in specs}
    assert len(encoded) == len(set(encoded)) and 1 <= len(encoded) <= 4  # at most one encode per bucket
    again = build_workload("video", _options(tmp_path, seed, num_requests=6), PromptTextMaker(None))
    assert len(encoded) == len(set(encoded))  # the second build encoded nothing new
    assert [s.media[0].data for s in again] == [s.media[0].data for s in specs]
    assert len({s.media[0].data for s in specs}) == 6  # no two requests share bytes (no cache can serve them)
    for spec in specs:
        item = spec.media[0]
        assert item.modality == "video" and item.mime_type == "video/mp4" and spec.output_len == 3
        meta = probe_video(item.data)
        assert (meta.width, meta.height) == (item.width, item.height) and meta.num_frames == 60
        assert meta.codec in ("h264", "hevc") and meta.fps == 30
    assert keys <= {(64, 48), (96, 64)}
    frames = decode_frames(specs[0].media[0].data, [0, 1, 59]).frames.float()
    assert frames.std() > 10 and (frames[0] - frames[1]).abs().mean() > 1 and (frames[0] - frames[2]).abs().mean() > 1
    # requests of the same bucket decode to the same frames: the tag only changes the bytes
    twins = [s for s in specs if s.media[0].width == specs[0].media[0].width]
    twins = [s for s in twins if probe_video(s.media[0].data).codec == probe_video(specs[0].media[0].data).codec]
    if len(twins) > 1:
        other = decode_frames(twins[1].media[0].data, [0, 1, 59]).frames.float()
        assert other.equal(frames)


def test_option_parsing_names_bad_values():
    assert parse_resolutions("480p,720p,1080p,64x48") == ((854, 480), (1280, 720), (1920, 1080), (64, 48))
    assert parse_durations("10,60,120") == (10.0, 60.0, 120.0) and parse_codecs("h264,HEVC") == ("h264", "hevc")
    for parse, text, message in [
        (parse_resolutions, "4k", "480p,720p,1080p or WIDTHxHEIGHT"),
        (parse_resolutions, "65x48", "even"),
        (parse_durations, "10,0", "> 0"),
        (parse_codecs, "h264,vp9", "among h264, hevc"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(text)


def test_openai_backend_sends_videos_as_data_urls(tmp_path):
    (spec,) = build_workload("video", _options(tmp_path, 5, num_requests=1), PromptTextMaker(None))
    _, body = OpenAIBackend("http://127.0.0.1:1/v1", "tiny-qwen2-vl").prepare(spec)
    (message,) = json.loads(body)["messages"]
    video_part, text_part = message["content"]
    assert video_part["type"] == "video_url" and text_part["type"] == "text"
    assert video_part["video_url"]["url"].startswith("data:video/mp4;base64,")


@pytest.fixture
def server_url():
    pytest.importorskip("uvicorn")
    import uvicorn

    from spaceserve.engine.async_llm import AsyncLLM
    from spaceserve.server.app import create_app
    from spaceserve.server.args import ServerArgs

    engine = AsyncLLM.from_engine_args(
        EngineArgs("tiny-qwen2-vl", kv_cache_memory_bytes=KV_BYTES, mm_processor_kwargs=json.loads(SMALL_FRAMES))
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerArgs()), log_level="warning"))
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


def test_tiny_video_run_reports_the_ttft_split_in_process_and_null_over_http(tmp_path, server_url, capsys):
    seed = str(random.randrange(1 << 20))
    workload = [
        "tiny-qwen2-vl", "--workload", "video", "--video-resolutions", "64x48", "--video-durations", "2",
        "--video-codecs", "h264", "--video-clip-cache-dir", str(tmp_path / "clips"), "--prompt-len", "8",
        "--output-len", "3", "--num-prompts", "2", "--num-warmups", "0", "--request-rate", "inf", "--seed", seed,
        "--disable-tqdm",
    ]
    local_out, http_out = tmp_path / "local.jsonl", tmp_path / "http.jsonl"
    engine_flags = ["--kv-cache-memory-bytes", str(KV_BYTES), "--mm-processor-kwargs", SMALL_FRAMES]
    assert main(["bench", *workload, *engine_flags, "--out", str(local_out)]) == 0
    assert "dec p50" in capsys.readouterr().out  # the table shows the split for a video run
    (row,) = read_jsonl(local_out)
    assert list(row) == row_fields() and row["status"] == "ok" and row["completed"] == 2 and row["failed"] == 0
    assert row["workload"] == "video" and row["workload_options"]["video"]["resolutions"] == ["64x48"]
    assert row["engine_settings"]["video"]["decoder_sessions_per_gpu"] == 8
    for part in TTFT_PARTS:
        values = [row[f"{stat}_{part}_ms"] for stat in STATISTICS]
        assert all(v is not None and v > 0 for v in values), (part, values)
        assert row[f"p50_{part}_ms"] <= row[f"p99_{part}_ms"]
        assert row[f"mean_{part}_ms"] < row["mean_ttft_ms"], part  # each part lies within TTFT
    # the stages overlap by at most the decode; without overlap the parts would exceed TTFT by it
    assert 0 <= row["mean_ttft_overlap_ms"] <= row["mean_ttft_video_decode_ms"]
    assert row["total_output_tokens"] == 6

    assert main(["bench", *workload, "--backend", "openai", "--base-url", server_url, "--out", str(http_out)]) == 0
    (http,) = read_jsonl(http_out)
    assert http["status"] == "ok" and http["completed"] == 2, http["errors"]
    assert http["total_input_tokens"] == row["total_input_tokens"] and http["total_output_tokens"] == 6
    assert all(http[f"{stat}_{part}_ms"] is None for part in TTFT_PARTS for stat in STATISTICS)
    assert "dec p50" not in format_table([http])
    assert np.isfinite(http["p50_ttft_ms"])
