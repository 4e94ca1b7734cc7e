"""The engine's decoder pool: created from EngineArgs' video flags, used by the decode stage so one video is decoded
GOP-parallel (bit-exact with one session), and closed with the engine (offline and under AsyncLLM)."""

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
from spaceserve.multimodal.video import flashcodec
from spaceserve.multimodal.video.decode import decode_frames, probe_video
from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video, preprocess_video
from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices
from spaceserve.multimodal.video.stage import build_decoder_pool
from spaceserve.multimodal.video.synthetic import make_clip
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


def test_cli_flags_reach_the_video_config():
    video = _parse(
        "--video-decoder-sessions", "3", "--video-decoder-cpu-sessions", "5", "--video-decode-gpus", "1,0"
    ).create_engine_config().video
    assert (video.decoder_sessions_per_gpu, video.decoder_cpu_sessions, video.decode_gpus) == (3, 5, (1, 0))
    default = _parse().create_engine_config().video
    assert (default.decoder_sessions_per_gpu, default.decoder_cpu_sessions, default.decode_gpus) == (4, None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"video_decoder_sessions": -1}, "sessions per GPU must be >= 0"),
        ({"video_decoder_cpu_sessions": 0}, "CPU sessions must be >= 1"),
        ({"video_decode_gpus": "0,x"}, "'all' or device indices"),
        ({"video_decode_gpus": "1,1"}, "distinct CUDA device indices"),
    ],
)
def test_bad_decoder_settings_are_rejected_by_name(kwargs, message):
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


def _expected_pixels(clip: bytes, image_config) -> torch.Tensor:
    """Sequential decode (no pool) of the frames the engine samples, preprocessed as the engine does."""
    meta = probe_video(clip)
    indices = sample_frame_indices(meta.num_frames, meta.fps, VideoSamplingParams())
    frames = decode_frames(clip, indices, backend="pyav").frames
    plan = plan_video(len(indices), meta.height, meta.width, image_config, VideoProcessingParams(**SMALL))
    return preprocess_video(frames, plan, image_config).pixel_values


def test_engine_decodes_a_video_gop_parallel_bit_exact_with_one_session(clip, monkeypatch):
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, video_decoder_cpu_sessions=3)
    engine = llm.llm_engine
    pool = engine.video_decoders
    assert pool is not None and engine.video_stage.decoders is pool and pool.config.cpu_sessions == 3
    chunk_counts = []
    real_decode_pyav = flashcodec.decode_pyav

    def counting_decode_pyav(*args, **kwargs):
        frames, chunks = real_decode_pyav(*args, **kwargs)
        chunk_counts.append((kwargs["pool"], chunks))
        return frames, chunks

    monkeypatch.setattr(flashcodec, "decode_pyav", counting_decode_pyav)
    request = engine.add_request({"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": clip}}, PARAMS)
    outputs = _run(engine)
    assert outputs[request.request_id].error is None and len(outputs[request.request_id].outputs[0].token_ids) == 3
    assert chunk_counts == [(pool, 3)]  # split across all three sessions
    monkeypatch.undo()
    assert request.mm_features[0].pixel_values.equal(_expected_pixels(clip, engine.config.image_config))
    engine.check_idle_integrity()

    engine.shutdown()
    with pytest.raises(RuntimeError, match="closed"):
        pool.cpu_executor()
    engine.shutdown()  # idempotent


def test_zero_sessions_decodes_in_one_session_with_the_same_pixels(clip):
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, video_decoder_sessions=0)
    engine = llm.llm_engine
    assert engine.video_decoders is None and engine.video_stage.decoders is None
    request = engine.add_request({"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": clip}}, PARAMS)
    assert _run(engine)[request.request_id].error is None
    assert request.mm_features[0].pixel_values.equal(_expected_pixels(clip, engine.config.image_config))
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
