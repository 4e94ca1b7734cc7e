"""NVDEC through torchcodec: needs a CUDA device and torchcodec (scripts/setup_video_gpu.sh installs it)."""

import io

import av
import numpy as np
import pytest
import torch

from spaceserve.multimodal.video import DecoderPoolConfig, VideoDecoderPool, decode_frames, make_clip
from spaceserve.multimodal.video.nvdec_backend import _import_torchcodec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and _import_torchcodec()[1] is not None,
        reason=str(_import_torchcodec()[1]) if torch.cuda.is_available() else "",
    ),
]

KINDS = {"h264-closed": ("h264", False), "h264-open": ("h264", True), "hevc-open": ("hevc", True)}


def _clip(kind: str) -> bytes:
    codec, open_gop = KINDS[kind]
    buffer = io.BytesIO()  # NVDEC's smallest HEVC frame is 144x144 on some GPUs
    make_clip(buffer, width=320, height=192, seconds=8, fps=24, gop=24, codec=codec, open_gop=open_gop, seed=11)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clips():
    return {kind: _clip(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def pool():
    with VideoDecoderPool(DecoderPoolConfig(gpu_sessions_per_device=4, min_frames_per_chunk=1)) as shared:
        yield shared


@pytest.mark.parametrize("kind", list(KINDS))
def test_nvdec_gop_parallel_is_bit_exact_with_sequential(kind, clips, pool):
    rng = np.random.default_rng(len(kind))
    for indices in [list(range(192)), sorted(rng.choice(192, size=50, replace=False).tolist())]:
        sequential = decode_frames(clips[kind], indices, device="cuda")
        parallel = decode_frames(clips[kind], indices, device="cuda", decoders=pool)
        assert sequential.backend == parallel.backend == "nvdec", sequential.fallback_reason
        assert sequential.frames.device.type == "cuda" and parallel.frames.device.type == "cuda"
        assert parallel.num_chunks > 1
        assert torch.equal(sequential.frames, parallel.frames)


@pytest.mark.parametrize("kind", list(KINDS))
def test_nvdec_numbering_and_pixels_match_pyav(kind, clips):
    indices = list(range(0, 192, 7))
    gpu = decode_frames(clips[kind], indices, device="cuda").frames.cpu().to(torch.int16)
    cpu = decode_frames(clips[kind], list(range(192)), backend="pyav").frames.to(torch.int16)
    # The RGB conversions differ by a few levels; motion makes the same index the nearest CPU frame by far.
    for row, frame_index in enumerate(indices):
        distances = (cpu - gpu[row]).abs().float().mean(dim=(1, 2, 3))
        nearest = distances.topk(2, largest=False)
        assert int(nearest.indices[0]) == frame_index, (frame_index, nearest)
        assert float(distances[frame_index]) < 8.0, float(distances[frame_index])


def test_profile_nvdec_cannot_decode_falls_back_to_cpu_frames_on_gpu():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 320, 192, "yuv444p"  # High 4:4:4: not an NVDEC profile
        for i in range(24):
            array = np.random.default_rng(i).integers(0, 256, (192, 320, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    decoded = decode_frames(buffer.getvalue(), [0, 5, 23], device="cuda")
    assert decoded.backend == "pyav" and "yuv444p" in decoded.fallback_reason
    assert decoded.frames.device.type == "cuda"
    cpu = decode_frames(buffer.getvalue(), [0, 5, 23], backend="pyav")
    assert torch.equal(decoded.frames.cpu(), cpu.frames)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sessions_spread_over_gpus_give_the_same_frames(clips):
    with VideoDecoderPool(DecoderPoolConfig(gpu_sessions_per_device=2, gpu_devices=(0, 1), min_frames_per_chunk=1)) as pool:
        spread = decode_frames(clips["h264-closed"], list(range(192)), device="cuda:0", decoders=pool)
        assert {t.name.split("-")[1] for t in _pool_threads(pool)} == {"cuda0", "cuda1"}
    single = decode_frames(clips["h264-closed"], list(range(192)), device="cuda:0")
    assert spread.frames.device == torch.device("cuda", 0)
    assert torch.equal(spread.frames, single.frames)


def _pool_threads(pool):
    return [thread for executor in pool._gpu_executors.values() for thread in executor._threads]
