import io
import zlib

import numpy as np
import pytest
import torch

from spaceserve.core.errors import InvalidInputError
from spaceserve.multimodal.video import decode_frames, index_video, make_clip, probe_video
from tests.multimodal.video.clips import CLIP_KINDS, clip_bytes, random_indices, reference_frames


def test_probe_reports_the_stream_as_encoded(tmp_path):
    path = tmp_path / "clip.mp4"
    written = make_clip(path, width=80, height=48, seconds=2.5, fps=20, gop=10, seed=3)
    metadata = probe_video(path)
    assert metadata.num_frames == written == 50
    assert metadata.fps == pytest.approx(20.0)
    assert metadata.duration_s == pytest.approx(2.5)
    assert (metadata.width, metadata.height, metadata.codec) == (80, 48, "h264")
    assert metadata.keyframe_indices == (0, 10, 20, 30, 40)
    assert probe_video(path.read_bytes()) == metadata


@pytest.mark.parametrize("kind", list(CLIP_KINDS))
def test_decode_frames_equals_plain_sequential_decode(kind):
    reference = reference_frames(kind)
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    for _ in range(4):
        indices = random_indices(rng, len(reference))
        decoded = decode_frames(clip_bytes(kind), indices)
        assert decoded.backend == "pyav" and decoded.fallback_reason is None and decoded.num_chunks == 1
        assert decoded.frame_indices == tuple(indices)
        assert decoded.frames.dtype == torch.uint8 and decoded.frames.shape == (len(indices), 64, 96, 3)
        assert torch.equal(decoded.frames, torch.from_numpy(reference[indices]))


def test_synthetic_clips_move_and_are_not_blank():
    frames = reference_frames("h264-closed").astype(np.int16)
    assert frames.std() > 30
    assert (np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)) > 1).all()
    other = io.BytesIO()
    make_clip(other, width=96, height=64, seconds=0.5, fps=24, gop=24, seed=8)
    first_other = decode_frames(other.getvalue(), [0]).frames[0].numpy().astype(np.int16)
    assert np.abs(first_other - frames[0]).mean() > 10  # another seed paints another clip


def test_single_thread_and_ffmpeg_threads_agree():
    data = clip_bytes("h264-open")
    indices = list(range(0, 144, 5))
    from spaceserve.multimodal.video import PyAVOptions

    one = decode_frames(data, indices, pyav_options=PyAVOptions(threads=1))
    many = decode_frames(data, indices, pyav_options=PyAVOptions(threads=4, thread_type="FRAME"))
    assert torch.equal(one.frames, many.frames)


def test_indexed_video_is_reused_and_empty_request_gives_empty_tensor():
    video = index_video(clip_bytes("h264-closed"))
    assert index_video(video) is video
    empty = decode_frames(video, [])
    assert empty.frames.shape == (0, 64, 96, 3)


@pytest.mark.parametrize("indices", [[3, 2], [4, 4], [-1, 2], [0, 144]])
def test_bad_frame_indices_are_rejected(indices):
    with pytest.raises(InvalidInputError, match="frame indices"):
        decode_frames(clip_bytes("h264-closed"), indices)


def test_nvdec_requested_on_cpu_falls_back_with_the_reason():
    decoded = decode_frames(clip_bytes("h264-closed"), [0, 30], backend="nvdec")
    assert decoded.backend == "pyav"
    assert "CUDA" in decoded.fallback_reason
    assert torch.equal(decoded.frames, torch.from_numpy(reference_frames("h264-closed")[[0, 30]]))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        decode_frames(clip_bytes("h264-closed"), [0], backend="ffmpeg")
