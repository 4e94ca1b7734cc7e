"""The engine's decoder pool: created from EngineArgs' video flags, warmed when the engine starts, used by the decode
stage so one video is decoded GOP-parallel over the free sessions (bit-exact with one session), and closed with the
engine (offline and under AsyncLLM)."""

from __future__ import annotations

import argparse
import io

import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.config import VideoConfig
from spaceserve.core.errors import ConfigError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.multimodal.video import decode as decode_module
from spaceserve.multimodal.video.decode import decode_frames, probe_video
from spaceserve.multimodal.video.nvdec_backend import _import_torchcodec
from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video, preprocess_video
from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices
from spaceserve.multimodal.video.stage import build_decoder_pool
from spaceserve.multimodal.video.synthetic import make_clip
from tests.engine.video_helpers import whole_videos
from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=3)
VIDEO_PROMPT = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 16}
FPS = 30


@pytest.fixture(scope="module")
def clip() -> bytes:
    """6 s at 30 fps, a keyframe every 45 frames: 4 GOPs, each with sampled frames (2 fps) deep inside it."""
    buffer = io.BytesIO()
    make_clip(buffer, width=64, height=48, seconds=6, fps=FPS, gop=45, seed=11)
    return buffer.getvalue()


def _parse(*flags: str) -> EngineArgs:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(["tiny-qwen2-vl", *flags]))


@pytest.fixture
def two_visible_gpus(monkeypatch):
    """GPU indices are checked against the visible devices; pin them to two so no test depends on the host."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cli_flags_reach_the_video_config(two_visible_gpus):
    video = _parse(
        "--video-decoder-sessions", "3", "--video-decoder-cpu-sessions", "5", "--video-decode-gpus", "1,0"
    ).create_engine_config().video
    assert (video.decoder_sessions_per_gpu, video.decoder_cpu_sessions, video.decode_gpus) == (3, 5, (1, 0))
    default = _parse().create_engine_config().video
    assert (default.decoder_sessions_per_gpu, default.decoder_cpu_sessions, default.decode_gpus) == (8, None, None)
    assert default.chunk_tokens == 1024 and _parse("--video-chunk-tokens", "0").create_engine_config().video.chunk_tokens == 0
    assert _parse("--video-decode-gpus", "all").create_engine_config().video.decode_gpus == (0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"video_decoder_sessions": -1}, "sessions per GPU must be >= 0"),
        ({"video_decoder_cpu_sessions": 0}, "CPU sessions must be >= 1"),
        ({"video_decode_gpus": "0,x"}, "'all' or device indices"),
        ({"video_decode_gpus": "1,1"}, "distinct CUDA device indices"),
        ({"video_decode_gpus": "0,2"}, "names 2, but only 2 GPUs are visible"),
        ({"video_chunk_tokens": -1}, "chunk_tokens must be >= 0"),
    ],
)
def test_bad_decoder_settings_are_rejected_by_name(kwargs, message, two_visible_gpus):
    with pytest.raises(ConfigError, match=message):
        EngineArgs(model="tiny-qwen2-vl", **kwargs).create_engine_config()


def test_pool_shape_follows_the_device_and_flags():
    cpu_pool = build_decoder_pool(VideoConfig(decoder_cpu_sessions=3), "cpu")
    assert cpu_pool.config.cpu_sessions == 3 and cpu_pool.gpu_devices() == ()
    # on a CUDA engine the configured GPUs decode, each with its sessions (nothing starts until a video arrives)
    gpu_pool = build_decoder_pool(VideoConfig(decoder_sessions_per_gpu=2, decode_gpus=(1, 0)), "cuda:0")
    assert gpu_pool.gpu_devices() == (1, 0) and gpu_pool.num_gpu_sessions() == 4
    own_gpu = build_decoder_pool(VideoConfig(decoder_sessions_per_gpu=3), "cuda:2")
    assert own_gpu.gpu_devices() == (2,) and own_gpu.num_gpu_sessions() == 3
    assert build_decoder_pool(VideoConfig(decoder_sessions_per_gpu=0), "cpu") is None
    for pool in (cpu_pool, gpu_pool, own_gpu):
        pool.close()


def _run(engine) -> dict:
    finished = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return finished
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    raise AssertionError("engine did not finish")


def _expected_pixels(clip: bytes, engine, backend: str) -> tuple[torch.Tensor, str]:
    """Sequential decode (no pool) of the frames the engine samples by `backend` on the engine's device,
    preprocessed there as the engine does (a GPU resizes in float32, the CPU in uint8); and the backend that
    decoded. Pixels compare only between decodes by one backend: NVDEC's RGB conversion is not swscale's."""
    meta = probe_video(clip)
    indices = sample_frame_indices(meta.num_frames, meta.fps, VideoSamplingParams())
    decoded = decode_frames(clip, indices, device=engine.core.device, backend=backend)
    image_config = engine.config.image_config
    plan = plan_video(len(indices), meta.height, meta.width, image_config, VideoProcessingParams(**SMALL))
    return preprocess_video(decoded.frames, plan, image_config).pixel_values, decoded.backend


def _counting_start_decode(monkeypatch) -> list:
    """Record (pool, backend, sessions) of every decode the stage starts."""
    started = []
    real_start = decode_module.start_decode

    def counting(*args, **kwargs):
        decode = real_start(*args, **kwargs)
        started.append((kwargs["decoders"], decode.backend, decode.num_sessions))
        return decode

    monkeypatch.setattr(decode_module, "start_decode", counting)
    return started


def test_engine_warms_its_sessions_and_decodes_gop_parallel_bit_exact_with_one_session(clip, monkeypatch):
    # the PyAV sessions of the pool, on any engine device (a CUDA engine would otherwise decode with NVDEC)
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, video_decoder_cpu_sessions=3, video_decode_backend="pyav")
    engine = llm.llm_engine
    pool = engine.core.video_decoders
    assert pool is not None and engine.core.video_stage.decoders is pool and pool.config.cpu_sessions == 3
    # started and warmed with the engine: three session threads exist before any video arrives
    assert len(pool.cpu_executor()._threads) == 3 and "cpu" in engine.core.video_stage.warm_up_s
    started = _counting_start_decode(monkeypatch)
    request = engine.add_request({"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": clip}}, PARAMS)
    outputs = _run(engine)
    assert outputs[request.request_id].error is None and len(outputs[request.request_id].outputs[0].token_ids) == 3
    assert started == [(pool, "pyav", 3)]  # 4 GOPs hold sampled frames: all three free sessions take part
    assert pool.num_free_sessions() == 3  # given back
    monkeypatch.undo()
    expected, backend = _expected_pixels(clip, engine, "pyav")
    ((_, pixel_values),) = whole_videos(request)
    assert backend == "pyav" and pixel_values.equal(expected)
    engine.check_idle_integrity()

    engine.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        pool.cpu_executor()
    engine.shutdown()  # idempotent


def test_zero_sessions_decodes_in_one_session_with_the_same_pixels(clip, monkeypatch):
    # the default backend: PyAV on the CPU, NVDEC on a GPU with torchcodec (else PyAV); expected by the same one
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, video_decoder_sessions=0)
    engine = llm.llm_engine
    assert engine.core.video_decoders is None and engine.core.video_stage.decoders is None
    started = _counting_start_decode(monkeypatch)
    request = engine.add_request({"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": clip}}, PARAMS)
    assert _run(engine)[request.request_id].error is None
    monkeypatch.undo()
    expected, backend = _expected_pixels(clip, engine, engine.config.video.decode_backend)
    assert started == [(None, backend, 1)]
    assert whole_videos(request)[0][1].equal(expected)
    engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(
    torch.cuda.is_available() and _import_torchcodec()[1] is not None,
    reason=str(_import_torchcodec()[1]) if torch.cuda.is_available() else "",
)
def test_engine_decodes_a_video_over_nvdec_sessions_bit_exact_with_one_session(clip, monkeypatch):
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, video_decoder_sessions=3, video_decode_backend="nvdec")
    engine = llm.llm_engine
    pool = engine.core.video_decoders
    assert engine.core.device.type == "cuda" and pool.num_gpu_sessions() == 3
    assert len(pool.gpu_executor(engine.core.device.index or 0)._threads) == 3  # warmed at start
    started = _counting_start_decode(monkeypatch)
    request = engine.add_request({"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": clip}}, PARAMS)
    outputs = _run(engine)
    assert outputs[request.request_id].error is None and len(outputs[request.request_id].outputs[0].token_ids) == 3
    assert started == [(pool, "nvdec", 3)]  # split across the GPU's three NVDEC sessions
    monkeypatch.undo()
    expected, backend = _expected_pixels(clip, engine, "nvdec")
    assert backend == "nvdec" and whole_videos(request)[0][1].equal(expected)
    engine.check_idle_integrity()
    engine.shutdown()


def test_async_engine_shutdown_closes_the_decoder_pool():
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model="tiny-qwen2-vl", kv_cache_memory_bytes=TEST_KV_CACHE_BYTES, video_decoder_cpu_sessions=2)
    )
    pool = engine.call_in_engine(lambda e: e.video_decoders)
    pool.cpu_executor()  # open while the engine runs
    engine.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        pool.cpu_executor()
