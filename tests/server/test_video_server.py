"""Videos over HTTP: video_url parts (data URLs, file:// under the allowed path) give the offline engine's tokens,
plain and streamed, alone or mixed with images; the media policy and --limit-mm-per-prompt video=N hold (the count
before anything is fetched); every kind of bad video is a 400 naming it; a decode that fails after the request was
accepted reaches the client (400/500 body, or an error event in a stream); nothing leaks and the server keeps
serving."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import av
import numpy as np
import openai
import pytest

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.async_llm import AsyncLLM
from spaceserve.multimodal.video import decode as decode_module
from spaceserve.multimodal.video.synthetic import make_clip
from spaceserve.server.app import create_app
from spaceserve.server.args import ServerArgs
from tests.llm_factory import make_llm
from tests.server.conftest import (
    ENGINE_KWARGS,
    SERVED_NAME,
    FinishRecorder,
    LiveServer,
    ThreadedServer,
    data_url,
    make_model_dir,
    perturb_weights,
    png_bytes,
)

SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 16}  # a few tokens per frame keeps the tiny model fast
MAX_DURATION_S = 3.0
MAX_VIDEO_BYTES = 200_000
VIDEO_KWARGS = ENGINE_KWARGS | dict(
    limit_mm_per_prompt={"image": 2, "video": 1}, mm_processor_kwargs=SMALL, max_video_duration_s=MAX_DURATION_S
)


def clip_bytes(seconds: float = 2, seed: int = 5) -> bytes:
    buffer = io.BytesIO()
    make_clip(buffer, width=64, height=48, seconds=seconds, fps=30, gop=30, seed=seed)
    return buffer.getvalue()


def video_url(data: bytes) -> str:
    return data_url(data, "video/mp4")


def messages_with(*parts: dict, text: str = "What happens here?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("video-model"))
    media_dir = tmp_path_factory.mktemp("video-media")
    outside_dir = tmp_path_factory.mktemp("video-outside")
    recorder = FinishRecorder()
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), **VIDEO_KWARGS), stat_loggers=[recorder])
    engine.call_in_engine(lambda e: perturb_weights(e.model))
    reference = make_llm(str(model_dir), **VIDEO_KWARGS)
    perturb_weights(reference.llm_engine.core.model)
    args = ServerArgs(
        served_model_name=SERVED_NAME, allowed_local_media_path=str(media_dir), media_max_video_bytes=MAX_VIDEO_BYTES
    )
    server = ThreadedServer(create_app(engine, args))
    try:
        yield LiveServer(server.base_url, engine, recorder, reference, media_dir, outside_dir)
    finally:
        server.stop()
        engine.shutdown()


def _chat(server: LiveServer, messages: list[dict], **kwargs):
    return server.client().chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=6, temperature=0, **kwargs
    )


def _offline(server: LiveServer, messages: list[dict]):
    from spaceserve import SamplingParams

    (output,) = server.reference.chat(messages, SamplingParams(temperature=0.0, max_tokens=6))
    assert output.error is None
    return output


def _expect_400(server: LiveServer, messages: list[dict], pattern: str, **kwargs) -> None:
    with pytest.raises(openai.BadRequestError, match=pattern) as info:
        _chat(server, messages, **kwargs)
    assert info.value.body["type"] == "BadRequestError"


def test_video_url_gives_the_offline_tokens_plain_streamed_and_from_a_file(video_server):
    clip = clip_bytes(seed=5)
    messages = messages_with(video_part(video_url(clip)))
    expected = _offline(video_server, messages)
    reply = _chat(video_server, messages)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert expected.prompt.count("<|vision_start|><|video_pad|><|vision_end|>") == 1

    streamed = _chat(video_server, messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == reply.choices[
        0
    ].message.content

    path = video_server.media_dir / "clip.mp4"
    path.write_bytes(clip)
    from_file = _chat(video_server, messages_with(video_part(path.as_uri())))
    assert from_file.choices[0].message.content == reply.choices[0].message.content
    video_server.assert_idle_and_clean()


def test_images_and_a_video_in_one_prompt(video_server):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(3))}}
    messages = messages_with(image, video_part(video_url(clip_bytes(seed=9))), text="Compare them.")
    expected = _offline(video_server, messages)
    reply = _chat(video_server, messages)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    video_server.assert_idle_and_clean()


def test_media_policy_applies_to_videos(video_server):
    outside = video_server.outside_dir / "clip.mp4"
    outside.write_bytes(clip_bytes())
    def expect(part: dict, pattern: str) -> None:
        _expect_400(video_server, messages_with(part), pattern)

    expect(video_part(outside.as_uri()), "video 0: video file .* is outside the allowed")
    expect(video_part("http://127.0.0.1:9/clip.mp4"), "http\\(s\\) video URLs are not")
    too_big = np.random.default_rng(0).bytes(MAX_VIDEO_BYTES + 1000)
    expect(video_part(video_url(too_big)), f"video data URL holds more than the limit of {MAX_VIDEO_BYTES} bytes")
    expect({"type": "video", "video": [1, 2, 3]}, "send a video as a URL string")
    video_server.assert_idle_and_clean()


def test_video_limit_is_checked_before_anything_is_fetched(video_server):
    # fetching either would fail differently (outside the allowed path); the count is refused first
    outside = (video_server.outside_dir / "never-read.mp4").as_uri()
    messages = messages_with(video_part(outside), video_part(outside))
    _expect_400(video_server, messages, "2 videos in one prompt exceed limit_mm_per_prompt video=1")
    video_server.assert_idle_and_clean()


def _encode_noise(count: int, target=None, container_format: str = "matroska", options: dict | None = None) -> bytes:
    buffer = target or io.BytesIO()
    rng = np.random.default_rng(count)
    with av.open(buffer, "w", format=container_format, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(count):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue() if target is None else Path(target).read_bytes()


def _unknown_codec() -> bytes:
    data = _encode_noise(10)
    assert b"V_MPEG4/ISO/AVC" in data
    return data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/QQQ/QQQ")


def _truncated() -> bytes:
    """An MP4 with its index up front, cut short: the index names frames whose data is missing."""
    with tempfile.TemporaryDirectory() as directory:  # faststart rewrites the file: it needs a real one
        data = _encode_noise(48, str(Path(directory) / "faststart.mp4"), "mp4", {"movflags": "faststart"})
    return data[: len(data) * 2 // 3]


def _unknown_frame_rate() -> bytes:
    data = _encode_noise(1)
    default_duration_id = b"\x23\xe3\x83"  # Matroska's DefaultDuration: the only place the rate is stored
    assert data.count(default_duration_id) == 1
    return data.replace(default_duration_id, b"\x23\xe3\x84")


@pytest.mark.parametrize(
    ("make_video", "request_kwargs", "pattern"),
    [
        (lambda: np.random.default_rng(1).bytes(5000), {}, "video 0: not a readable video"),
        (_truncated, {}, "video 0: .*truncated"),
        (_unknown_codec, {}, "video 0: .*codec.*unknown"),
        (_unknown_frame_rate, {}, "video 0: .*frame rate is zero or unknown"),
        (lambda: clip_bytes(seconds=4), {}, "video 0: video is 4.0 s long, longer than the allowed 3 s"),
        (clip_bytes, {"num_frames": 1000}, "num_frames=1000 is more frames than the allowed max_frames"),
    ],
    ids=["not a video", "truncated", "unknown codec", "unknown fps", "too long", "too many frames"],
)
def test_bad_video_is_a_400_naming_it_and_nothing_else_is_disturbed(video_server, make_video, request_kwargs, pattern):
    extra = {"extra_body": {"mm_processor_kwargs": request_kwargs}} if request_kwargs else {}
    _expect_400(video_server, messages_with(video_part(video_url(make_video()))), pattern, **extra)
    video_server.assert_idle_and_clean()


def _corrupt_packets(clip: bytes) -> bytes:
    """The container's index intact (the probe passes), the coded frames garbage (decoding fails later)."""
    data = bytearray(clip)
    middle = len(data) // 2
    data[middle - 5000 : middle + 5000] = np.random.default_rng(3).bytes(10000)
    return bytes(data)


def test_decode_failure_after_acceptance_reaches_the_client_and_frees_everything(video_server):
    messages = messages_with(video_part(video_url(_corrupt_packets(clip_bytes(seed=21)))))
    with pytest.raises(openai.BadRequestError, match="video is corrupt") as info:
        _chat(video_server, messages)
    assert info.value.status_code == 400
    with pytest.raises(openai.APIError, match="video is corrupt"):
        for _ in _chat(video_server, messages, stream=True):
            pass
    assert video_server.recorder.count("error") >= 2
    video_server.assert_idle_and_clean()
    # the server keeps serving videos
    assert _chat(video_server, messages_with(video_part(video_url(clip_bytes(seed=22))))).choices[0].finish_reason


def test_decoder_fault_is_a_500_and_a_stream_error_event(video_server, monkeypatch):
    def broken_decoder(*args, **kwargs):
        raise RuntimeError("NVDEC session lost")

    monkeypatch.setattr(decode_module, "start_decode", broken_decoder)  # the decode stage starts its decodes here
    messages = messages_with(video_part(video_url(clip_bytes(seed=31))))
    with pytest.raises(openai.InternalServerError, match="video could not be decoded on the server") as plain:
        _chat(video_server, messages)
    with pytest.raises(openai.APIError, match="video could not be decoded on the server") as streamed:
        for _ in _chat(video_server, messages, stream=True):
            pass
    for error in (plain.value, streamed.value):  # the decoder's own error stays in the server log
        assert "NVDEC" not in str(error) and "RuntimeError" not in str(error)
    monkeypatch.undo()
    video_server.assert_idle_and_clean()
    reply = _chat(video_server, messages_with({"type": "text", "text": "still here?"}))
    assert reply.choices[0].finish_reason in ("length", "stop")
