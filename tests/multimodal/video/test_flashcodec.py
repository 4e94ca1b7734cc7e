import threading
import zlib

import numpy as np
import pytest
import torch

from spaceserve.multimodal.video import DecoderPoolConfig, VideoDecoderPool, decode_frames
from spaceserve.multimodal.video.gop import plan_chunks
from spaceserve.multimodal.video import index_video
from tests.multimodal.video.clips import CLIP_KINDS, clip_bytes, random_indices, reference_frames


@pytest.fixture(scope="module")
def pool():
    with VideoDecoderPool(DecoderPoolConfig(cpu_sessions=4, min_frames_per_chunk=1)) as shared:
        yield shared


@pytest.mark.parametrize("kind", list(CLIP_KINDS))
def test_gop_parallel_is_bit_exact_with_sequential(kind, pool):
    data = clip_bytes(kind)
    reference = reference_frames(kind)
    rng = np.random.default_rng(zlib.crc32(kind.encode()) + 1)
    index_sets = [list(range(len(reference))), list(range(1, len(reference), 12))]
    index_sets += [random_indices(rng, len(reference)) for _ in range(4)]
    for indices in index_sets:
        sequential = decode_frames(data, indices)
        parallel = decode_frames(data, indices, decoders=pool)
        assert parallel.backend == "pyav"
        assert torch.equal(parallel.frames, sequential.frames)
        assert torch.equal(parallel.frames, torch.from_numpy(reference[indices]))
    assert decode_frames(data, list(range(len(reference))), decoders=pool).num_chunks == 4


def test_open_gop_chunks_start_one_gop_early():
    video = index_video(clip_bytes("h264-open"))
    assert video.index.open_gop
    assert not index_video(clip_bytes("h264-closed")).index.open_gop
    keyframe_packets = video.index.keyframe_packets
    chunks = plan_chunks(video.index, tuple(range(48, 144)), max_chunks=2)
    starts = [chunk.segments[0].start_packet for chunk in chunks]
    assert starts == [keyframe_packets[1], keyframe_packets[3]]  # GOPs 2 and 4 start decoding at GOPs 1 and 3


def test_pool_sessions_are_reused_across_requests():
    seen: list[set[int]] = []
    config = DecoderPoolConfig(cpu_sessions=3, min_frames_per_chunk=1)
    with VideoDecoderPool(config) as pool:
        data = clip_bytes("h264-closed")
        for _ in range(3):
            decode_frames(data, list(range(0, 144, 2)), decoders=pool)
            executor = pool.cpu_executor()
            seen.append({thread.ident for thread in executor._threads})
            assert pool.cpu_executor() is executor
        assert len(seen[0]) <= 3 and seen[0] == seen[1] == seen[2]
    with pytest.raises(RuntimeError, match="closed"):
        decode_frames(data, list(range(0, 144, 2)), decoders=pool)


def test_concurrent_requests_share_one_pool(pool):
    kinds = list(CLIP_KINDS)
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def decode(kind):
        try:
            results[kind] = decode_frames(clip_bytes(kind), list(range(0, 144, 3)), decoders=pool).frames
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=decode, args=(kind,)) for kind in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for kind in kinds:
        assert torch.equal(results[kind], torch.from_numpy(reference_frames(kind)[0::3]))


def test_short_requests_are_not_split_below_min_frames():
    with VideoDecoderPool(DecoderPoolConfig(cpu_sessions=8, min_frames_per_chunk=48)) as pool:
        decoded = decode_frames(clip_bytes("h264-closed"), list(range(144)), decoders=pool)
    assert decoded.num_chunks == 3
