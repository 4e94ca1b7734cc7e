"""The decode stage on its own: a video's chunks come out in order as soon as their frames are decoded (before the
rest of the video), the processed-video cache serves a repeat, a cancelled job emits nothing more, a failure ends
the job with its error, and the stage warms its decoder sessions when it starts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.hashing import hash_video
from spaceserve.multimodal.video import DecoderPoolConfig, VideoDecoderPool, index_video, pyav_backend
from spaceserve.multimodal.video.chunks import plan_video_chunks
from spaceserve.multimodal.video.errors import InvalidVideoError
from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video, preprocess_video
from spaceserve.multimodal.video.stage import VideoChunkReady, VideoDecodeStage, VideoDone, VideoWork
from tests.multimodal.video.clips import clip_bytes, reference_frames

CFG = ImageProcessorConfig()
PARAMS = VideoProcessingParams(min_pixels=3136, max_pixels=16 * 784)
FRAMES = tuple(range(0, 144, 12))  # 12 frames, one per half GOP: 6 temporal patches
WAIT_S = 30


def _work(kind: str = "h264-closed") -> VideoWork:
    video = index_video(clip_bytes(kind))
    plan = plan_video(len(FRAMES), video.index.height, video.index.width, CFG, PARAMS)
    tokens = plan.grid_thw[1] * plan.grid_thw[2] // 4
    chunks = plan_video_chunks(plan.grid_thw[0], tokens, 2 * tokens)  # (0, 1), (1, 3), (3, 5), (5, 6)
    return VideoWork(video, FRAMES, plan, hash_video(clip_bytes(kind), "bytes", clip=kind), chunks)


def _events(stage: VideoDecodeStage, until_done: int = 1) -> list:
    events, done = [], 0
    while done < until_done:
        batch = stage.poll(timeout=WAIT_S)
        assert batch, "no event within the timeout"
        events += batch
        done += sum(isinstance(e, VideoDone) for e in batch)
    return events


@pytest.fixture
def stage():
    pool = VideoDecoderPool(DecoderPoolConfig(cpu_sessions=2, min_frames_per_chunk=1))
    made = VideoDecodeStage(CFG, "cpu", num_workers=2, cache_bytes=1 << 30, decoders=pool)
    yield made
    made.shutdown()
    pool.close()


def test_chunks_come_out_in_order_and_equal_the_whole_video(stage):
    assert stage.warm_up_s["cpu"] > 0 and len(stage.decoders.cpu_executor()._threads) == 2
    work = _work()
    job = stage.submit(work)
    events = _events(stage)
    chunks = [e for e in events if isinstance(e, VideoChunkReady)]
    assert [e.chunk_index for e in chunks] == [0, 1, 2, 3] and all(e.job_id == job for e in events)
    done = events[-1]
    assert isinstance(done, VideoDone) and done.error is None and not done.cache_hit
    expected = preprocess_video(torch.from_numpy(reference_frames("h264-closed")[list(FRAMES)]), work.plan, CFG)
    assert torch.cat([e.pixel_values for e in chunks]).equal(expected.pixel_values)
    assert stage.num_jobs == 0

    again = stage.submit(work)
    events = _events(stage)
    assert [e.chunk_index for e in events if isinstance(e, VideoChunkReady)] == [0, 1, 2, 3]
    assert events[-1].cache_hit and all(e.job_id == again for e in events)


def test_the_first_chunk_comes_out_while_later_gops_are_still_decoding(stage, monkeypatch):
    release = threading.Event()
    real = pyav_backend.decode_segment

    def held(source, index, segment, *args, **kwargs):
        if segment.frame_indices[0] >= 72:  # GOPs 3.. wait
            assert release.wait(WAIT_S)
        return real(source, index, segment, *args, **kwargs)

    monkeypatch.setattr(pyav_backend, "decode_segment", held)
    stage.submit(_work())
    first = []
    for _ in range(2):  # frames 0..60 are there: chunks 0 and 1
        first += stage.poll(timeout=WAIT_S)
        if len(first) == 2:
            break
    assert [e.chunk_index for e in first] == [0, 1]
    assert not stage.poll(timeout=0.3)  # chunk 2 needs frame 72
    release.set()
    rest = _events(stage)
    assert [e.chunk_index for e in rest if isinstance(e, VideoChunkReady)] == [2, 3]


def test_cancel_stops_the_job_and_drops_its_late_events(stage, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = pyav_backend.decode_segment

    def held(*args, **kwargs):
        started.set()
        assert release.wait(WAIT_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(pyav_backend, "decode_segment", held)
    job = stage.submit(_work())
    assert started.wait(WAIT_S)
    stage.cancel(job)
    release.set()
    assert stage.num_jobs == 0
    deadline = time.monotonic() + WAIT_S
    while stage.decoders.num_free_sessions() < 2:  # the sessions finish their segment and take no more
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not stage.poll(timeout=0.5)  # nothing from the cancelled job


def test_a_decode_failure_ends_the_job_with_the_error(stage, monkeypatch):
    real = pyav_backend.decode_segment

    def broken(source, index, segment, *args, **kwargs):
        if segment.frame_indices[0] >= 72:
            raise InvalidVideoError("corrupt packet in GOP 3")
        return real(source, index, segment, *args, **kwargs)

    monkeypatch.setattr(pyav_backend, "decode_segment", broken)
    stage.submit(_work("hevc-closed"))
    events = _events(stage)
    done = events[-1]
    assert isinstance(done, VideoDone) and isinstance(done.error, InvalidVideoError)
    emitted = [e.chunk_index for e in events if isinstance(e, VideoChunkReady)]
    assert emitted == list(range(len(emitted))) and len(emitted) <= 2  # at most those before GOP 3, in order
    assert len(stage.cache) == 0
