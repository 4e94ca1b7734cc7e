"""Videos through the engine: files, bytes and given frames; the decode stage outside the step loop (a request
joins the scheduler at once and prefills its text while its video decodes; aborts and failures while decoding leak
nothing); the processed-video cache; bad videos rejected with an error naming the problem while others finish."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.core.errors import InvalidInputError
from spaceserve.multimodal.video import decode as decode_module
from spaceserve.multimodal.video.errors import InvalidVideoError
from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video, preprocess_video
from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices
from spaceserve.multimodal.video.synthetic import make_clip
from tests.engine.video_helpers import HeldDecode, whole_videos
from tests.llm_factory import make_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=4)
VIDEO_PROMPT = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 16}  # a few tokens per frame keeps the tiny model fast
CLIP_SECONDS, CLIP_FPS = 3, 20


@pytest.fixture(scope="module")
def clip() -> bytes:
    buffer = io.BytesIO()
    make_clip(buffer, width=64, height=48, seconds=CLIP_SECONDS, fps=CLIP_FPS, gop=20, seed=3)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, max_video_duration_s=30.0)


def _video_prompt(video, **kwargs):
    prompt = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": video}}
    return prompt | ({"mm_processor_kwargs": kwargs} if kwargs else {})


def _all_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return np.stack([array for _, array in sorted(frames, key=lambda pair: pair[0])])


def _run(engine, limit_steps: int = 10_000):
    finished = {}
    for _ in range(limit_steps):
        if not engine.has_unfinished_requests():
            return finished
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    raise AssertionError("engine did not finish")


def test_file_bytes_and_sampled_frames_give_the_same_tokens_and_pixels(clip, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    # The given frames come from PyAV; the file and the bytes must be decoded by PyAV too for the pixels to be
    # the same (on a GPU the default backend is NVDEC, whose RGB conversion differs from swscale's by design).
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, max_video_duration_s=30.0, video_decode_backend="pyav")
    engine = llm.llm_engine
    frames = _all_frames(clip)
    indices = sample_frame_indices(len(frames), CLIP_FPS, VideoSamplingParams())
    assert len(indices) == 2 * CLIP_SECONDS  # 2 fps
    requests = [
        engine.add_request(_video_prompt(str(path)), PARAMS, "path"),
        engine.add_request(_video_prompt(clip), PARAMS, "bytes"),
        engine.add_request(_video_prompt(frames[indices]), PARAMS, "frames"),
        engine.add_request(_video_prompt(list(frames), do_sample_frames=True, num_frames=len(indices)), PARAMS, "all"),
    ]
    outputs = _run(engine)
    tokens = {rid: o.outputs[0].token_ids for rid, o in outputs.items()}
    assert all(o.error is None for o in outputs.values()), {rid: o.error for rid, o in outputs.items()}
    assert len(set(map(tuple, tokens.values()))) == 1, tokens
    plan = plan_video(len(indices), 48, 64, llm.llm_engine.config.image_config, VideoProcessingParams(**SMALL))
    # resized on the engine's device: CUDA resizes in float32 where the CPU resizes uint8, as transformers does
    device = llm.llm_engine.core.device
    expected = preprocess_video(torch.from_numpy(frames[indices]).to(device), plan, llm.llm_engine.config.image_config)
    for request in requests:
        ((grid, pixel_values),) = whole_videos(request)
        assert grid == plan.grid_thw and pixel_values.equal(expected.pixel_values)
    metrics = outputs["bytes"].metrics
    assert metrics["arrival_time"] <= metrics["video_decode_start_time"] <= metrics["video_decode_end_time"]
    assert metrics["arrival_time"] <= metrics["first_scheduled_time"] <= metrics["first_token_time"]
    assert metrics["encoder_enqueued_time"] <= metrics["encoder_end_time"] <= metrics["first_token_time"]
    engine.check_idle_integrity()
    engine.shutdown()


def test_same_video_hits_the_processed_video_cache_and_settings_change_the_key(llm, clip):
    engine = llm.llm_engine
    cache = engine.core.video_stage.cache
    first = engine.add_request(_video_prompt(clip, fps=1.0), PARAMS)
    _run(engine)
    hits = cache.hits
    again = engine.add_request(_video_prompt(clip, fps=1.0), PARAMS)
    other = engine.add_request(_video_prompt(clip, fps=3.0), PARAMS)
    _run(engine)
    assert cache.hits == hits + 1
    assert first.mm_features[0].mm_hash == again.mm_features[0].mm_hash != other.mm_features[0].mm_hash
    # 3 s at 1 fps is 3 frames, raised to min_frames=4 (2 temporal patches); at 3 fps 9, rounded down to 8
    assert (whole_videos(first)[0][0][0], whole_videos(other)[0][0][0]) == (2, 4)
    engine.check_idle_integrity()


def test_request_prefills_its_text_while_its_video_decodes_and_others_run(llm, clip, monkeypatch):
    engine = llm.llm_engine
    held = HeldDecode()
    monkeypatch.setattr(decode_module, "start_decode", held)
    prompt = {"prompt": "Tell me what happens in this clip. " + VIDEO_PROMPT, "multi_modal_data": {"video": clip}}
    video = engine.add_request(prompt | {"mm_processor_kwargs": {"num_frames": 14}}, PARAMS, "slow-video")
    engine.add_request("hello there", PARAMS, "text")
    assert engine.core.num_decoding == 1 and "slow-video" in engine.core.scheduler.requests
    text_before_video = video.mm_features[0].placeholder.offset
    assert text_before_video > 4
    finished = {}
    while "text" not in finished:
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert held.started.is_set() and engine.has_unfinished_requests()
    assert video.num_computed_tokens == text_before_video and not video.output_token_ids
    with pytest.raises(InvalidInputError, match="already in use"):
        engine.add_request("dup", PARAMS, "slow-video")
    held.release.set()
    finished = _run(engine)
    assert finished["slow-video"].error is None and len(finished["slow-video"].outputs[0].token_ids) == 4
    engine.check_idle_integrity()


@pytest.mark.parametrize("open_frames", [0, 6], ids=["before any chunk", "after the first chunks"])
def test_abort_while_decoding_leaks_nothing(llm, clip, monkeypatch, open_frames):
    engine = llm.llm_engine
    held = HeldDecode(open_frames=open_frames)
    monkeypatch.setattr(decode_module, "start_decode", held)
    video = engine.add_request(_video_prompt(clip, num_frames=16), PARAMS, "abort-me")
    assert held.started.wait(30)
    for _ in range(50):  # let the chunks whose frames are there be encoded and prefilled
        engine.step()
    ready = [f for f in video.mm_features if not f.inputs_pending]
    assert len(ready) == (0 if open_frames == 0 else 2)  # chunks of 1 and 2 temporal patches: frames 0-5
    assert video.num_computed_tokens == (ready[-1].placeholder.end if ready else video.mm_features[0].placeholder.offset)
    (output,) = engine.abort_request(["abort-me"])
    assert output.finished and output.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests() and engine.core.num_decoding == 0
    held.release.set()
    engine.step()  # the late chunks are dropped
    assert "abort-me" not in engine.core.scheduler.requests and engine.core.video_stage.num_jobs == 0
    engine.check_idle_integrity()


@pytest.mark.parametrize("open_frames", [0, 4], ids=["before any chunk", "after the first chunks"])
def test_decode_failure_finishes_only_that_request(llm, clip, monkeypatch, open_frames):
    engine = llm.llm_engine
    held = HeldDecode(open_frames=open_frames, fail_after=InvalidVideoError("corrupt packet in GOP 1"))
    held.release.set()
    monkeypatch.setattr(decode_module, "start_decode", held)
    engine.add_request(_video_prompt(clip, num_frames=18), PARAMS, "broken")
    engine.add_request("still fine", PARAMS, "text")
    finished = _run(engine)
    assert finished["broken"].error is not None and "corrupt packet" in finished["broken"].error
    assert finished["broken"].outputs[0].finish_reason == "error"
    assert finished["text"].error is None and len(finished["text"].outputs[0].token_ids) == 4
    engine.check_idle_integrity()


def _truncated(clip: bytes) -> bytes:
    return clip[: len(clip) // 8]


@pytest.mark.parametrize(
    ("make_video", "kwargs", "message"),
    [
        (lambda clip: b"certainly not a video" * 50, {}, "video 0"),
        (_truncated, {}, "video 0"),
        (lambda clip: clip, {"num_frames": 1000, "max_frames": 768}, "more frames than the allowed"),
        (lambda clip: np.zeros((800, 28, 28, 3), np.uint8), {}, "more than the allowed max_frames"),
        (lambda clip: "/nonexistent/clip.mp4", {}, "not found"),
        (lambda clip: clip, {"fps": 0}, "fps"),
    ],
    ids=["not a video", "truncated", "too many sampled frames", "too many given frames", "missing file", "zero fps"],
)
def test_bad_video_is_rejected_and_engine_untouched(llm, clip, make_video, kwargs, message):
    engine = llm.llm_engine
    engine.add_request("keep going", PARAMS, "survivor")
    with pytest.raises(InvalidInputError, match=message):
        engine.add_request(_video_prompt(make_video(clip), **kwargs), PARAMS)
    assert engine.core.num_decoding == 0
    finished = _run(engine)
    assert list(finished) == ["survivor"] and finished["survivor"].error is None
    engine.check_idle_integrity()


def test_longer_than_the_allowed_duration_is_rejected(clip):
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, max_video_duration_s=CLIP_SECONDS - 1)
    with pytest.raises(InvalidInputError, match=r"video 0: video is 3\.0 s long, longer than the allowed 2 s"):
        llm.llm_engine.add_request(_video_prompt(clip), PARAMS)
    llm.llm_engine.check_idle_integrity()


def test_limit_mm_per_prompt_video(clip):
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, limit_mm_per_prompt={"image": 2, "video": 1})
    prompt = {"prompt": VIDEO_PROMPT * 2, "multi_modal_data": {"video": [clip, clip]}}
    with pytest.raises(InvalidInputError, match="2 videos in one prompt exceed limit_mm_per_prompt video=1"):
        llm.generate(prompt, PARAMS)
    llm.llm_engine.check_idle_integrity()


def test_chat_with_video_url_and_video_parts(llm, clip, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    data_url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    frames = _all_frames(clip)
    indices = sample_frame_indices(len(frames), CLIP_FPS, VideoSamplingParams())

    def chat(video_part):
        content = [video_part, {"type": "text", "text": "What happens?"}]
        (output,) = llm.chat([{"role": "user", "content": content}], PARAMS)
        assert output.error is None
        assert output.prompt.count("<|vision_start|><|video_pad|><|vision_end|>") == 1
        return output.outputs[0].token_ids

    by_file = chat({"type": "video_url", "video_url": {"url": f"file://{path}"}})
    assert chat({"type": "video_url", "video_url": {"url": data_url}}) == by_file
    assert chat({"type": "video", "video": list(frames[indices])}) == by_file
    llm.llm_engine.check_idle_integrity()


def test_video_larger_than_the_encoder_cache_is_rejected_whole(clip):
    # 14 frames of 56x56 once resized: 7 temporal patches of 4 tokens, in chunks of at most 8; the cache holds 20
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, encoder_cache_tokens=20, video_chunk_tokens=8)
    engine = llm.llm_engine
    with pytest.raises(InvalidInputError, match="video needs 28 encoder tokens but the encoder cache holds 20"):
        engine.add_request(_video_prompt(clip, num_frames=14), PARAMS)
    assert engine.core.num_decoding == 0 and engine.core.video_stage.num_jobs == 0 and not engine.has_unfinished_requests()
    engine.check_idle_integrity()
