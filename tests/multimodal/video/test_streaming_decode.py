"""Streaming GOP-parallel decoding (PyAV sessions): frames are handed out as soon as they are decoded, a video takes
as many sessions as its length gives work for and are free, failures and cancels stop it cleanly, and the pool's
sessions start and warm up before the first video."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest
import torch

from spaceserve.multimodal.video import DecoderPoolConfig, VideoDecoderPool, index_video, pyav_backend
from spaceserve.multimodal.video.decode import start_decode
from spaceserve.multimodal.video.errors import InvalidVideoError
from tests.multimodal.video.clips import clip_bytes, reference_frames

GOP = 24  # clips.py: 6 s at 24 fps, a keyframe every 24 frames -> 6 GOPs


class HeldSegments:
    """decode_segment that blocks every segment starting at or after `from_frame` until `release` is set."""

    def __init__(self, monkeypatch, from_frame: int, fail: BaseException | None = None) -> None:
        self.from_frame = from_frame
        self.fail = fail
        self.release = threading.Event()
        self.segments: list[int] = []
        self.real = pyav_backend.decode_segment
        monkeypatch.setattr(pyav_backend, "decode_segment", self)

    def __call__(self, source, index, segment, *args, **kwargs):
        first = segment.frame_indices[0]
        self.segments.append(first)
        if first >= self.from_frame:
            assert self.release.wait(10)
            if self.fail is not None:
                raise self.fail
        return self.real(source, index, segment, *args, **kwargs)


@pytest.fixture
def pool():
    with VideoDecoderPool(DecoderPoolConfig(cpu_sessions=2, min_frames_per_chunk=1)) as shared:
        yield shared


def test_first_frames_are_handed_out_while_later_gops_still_decode(pool, monkeypatch):
    held = HeldSegments(monkeypatch, from_frame=2 * GOP)
    indices = list(range(0, 6 * GOP, 6))
    decode = start_decode(clip_bytes("h264-closed"), indices, decoders=pool)
    assert decode.num_sessions == 2 and decode.num_chunks == 6
    early = [i for i, frame in enumerate(indices) if frame < 2 * GOP]
    assert decode.wait_for(0, len(early), timeout=30)
    assert torch.equal(decode.frames[: len(early)], torch.from_numpy(reference_frames("h264-closed")[indices[: len(early)]]))
    assert not decode.wait_for(0, len(indices), timeout=0.2)  # GOPs 2.. are held back
    held.release.set()
    assert torch.equal(decode.result(), torch.from_numpy(reference_frames("h264-closed")[indices]))
    assert pool.num_free_sessions() == 2


def test_sessions_follow_the_videos_length_and_the_free_sessions(monkeypatch):
    with VideoDecoderPool(DecoderPoolConfig(cpu_sessions=4, min_frames_per_chunk=1)) as pool:
        held = HeldSegments(monkeypatch, from_frame=0)
        short = start_decode(clip_bytes("h264-closed"), list(range(0, 2 * GOP, 4)), decoders=pool)  # 2 GOPs
        assert short.num_sessions == 2 and pool.num_free_sessions() == 2
        long = start_decode(clip_bytes("hevc-closed"), list(range(0, 6 * GOP, 4)), decoders=pool)
        assert long.num_sessions == 2 and pool.num_free_sessions() == 0  # only two were free
        third = start_decode(clip_bytes("h264-open"), list(range(0, 6 * GOP, 4)), decoders=pool)
        assert third.num_sessions == 1  # none free: one session, queued behind the others
        held.release.set()
        for decode, kind, end in ((short, "h264-closed", 2 * GOP), (long, "hevc-closed", 6 * GOP), (third, "h264-open", 6 * GOP)):
            assert torch.equal(decode.result(), torch.from_numpy(reference_frames(kind)[0:end:4]))
        assert pool.num_free_sessions() == 4


def test_a_failing_session_fails_the_decode_and_hands_out_no_more_chunks(pool, monkeypatch):
    held = HeldSegments(monkeypatch, from_frame=GOP, fail=InvalidVideoError("corrupt packet"))
    decode = start_decode(clip_bytes("h264-closed"), list(range(0, 6 * GOP, 3)), decoders=pool)
    held.release.set()
    with pytest.raises(InvalidVideoError, match="corrupt packet"):
        decode.wait_for(0, decode.frames.shape[0], timeout=30)
    with pytest.raises(InvalidVideoError):
        decode.result()
    assert len(held.segments) < 6 and pool.num_free_sessions() == 2


def test_cancel_stops_the_decode(pool, monkeypatch):
    held = HeldSegments(monkeypatch, from_frame=0)
    decode = start_decode(clip_bytes("h264-closed"), list(range(0, 6 * GOP, 3)), decoders=pool)
    decode.cancel()
    held.release.set()
    with pytest.raises(CancelledError):
        decode.wait_for(0, 1, timeout=30)
    with pytest.raises(CancelledError):
        decode.result()
    assert len(held.segments) == 2 and pool.num_free_sessions() == 2  # the two taken before the cancel


def test_one_session_without_a_pool_streams_too(monkeypatch):
    held = HeldSegments(monkeypatch, from_frame=10**9)
    decode = start_decode(clip_bytes("hevc-open"), [0, 30, 100], decoders=None)
    assert decode.num_sessions == 1 and decode.num_chunks == 1
    assert torch.equal(decode.result(), torch.from_numpy(reference_frames("hevc-open")[[0, 30, 100]]))
    assert held.segments == [0, 100]  # one session: GOPs 0-1, then GOP 4 (2 and 3 hold no sampled frame)


def test_warm_up_starts_every_session_before_any_video():
    with VideoDecoderPool(DecoderPoolConfig(cpu_sessions=3)) as pool:
        timings = pool.warm_up(clip_bytes("h264-closed", seconds=0.5), gpu_clip=None)
        assert set(timings) == {"cpu"} and timings["cpu"] > 0
        assert len(pool.cpu_executor()._threads) == 3 and pool.num_free_sessions() == 3
        video = index_video(clip_bytes("h264-closed"))
        decode = start_decode(video, [5, 50], decoders=pool)
        assert torch.equal(decode.result(), torch.from_numpy(reference_frames("h264-closed")[[5, 50]]))
