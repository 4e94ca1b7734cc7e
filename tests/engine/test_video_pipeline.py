"""Pipelined videos (encoded and prefilled chunk by chunk while they decode) give exactly what the unpipelined path
gives (one chunk per video, encoded once fully decoded): the same embedding rows and the same greedy tokens, on both
tiny checkpoints, for encoded clips whose GOP boundaries fall inside a temporal patch pair, odd frame counts, two
videos and an image in one prompt, prefix-cache hits, preemption and a request's text prefilled before its video.

Bit-identical rows need the same float32 GEMM arithmetic per row: the CPU's sgemm blocks rows by 16, so a chunk of
a video with 24 patches per frame leaves rows to its edge kernel that were in a full block of the whole video (one
ulp apart; transformers' tower does the same). The videos here have 32 patches per frame, and items of other shapes
batched together are compared to rounding (their tokens exactly)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from spaceserve import SamplingParams
from spaceserve.multimodal.video import index_video
from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices
from spaceserve.multimodal.video.synthetic import make_clip
from tests.engine.parity import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, random_frames, random_image
from tests.llm_factory import make_llm
from tests.tiny_checkpoints import make_tiny_checkpoint
from tests.tiny_tokenizer import write_tiny_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PIXELS = {"min_pixels": 3136, "max_pixels": 200704}
CLIP_FPS, CLIP_GOP = 20, 15  # sampled at 2 fps: frames 0, 10, 20, 30, ...; keyframes at 0, 15, 30, ...


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=29)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def clip() -> bytes:
    buffer = io.BytesIO()
    make_clip(buffer, width=112, height=56, seconds=4, fps=CLIP_FPS, gop=CLIP_GOP, seed=5)
    data = buffer.getvalue()
    # the decode splits along GOPs; some temporal patch takes its two frames from two GOPs
    index = index_video(data).index
    sampled = sample_frame_indices(index.num_frames, index.fps, VideoSamplingParams())
    pairs = list(zip(sampled[0::2], sampled[1::2]))
    assert any(a < key <= b for a, b in pairs for key in index.keyframe_frames), (pairs, index.keyframe_frames)
    return data


def _text(rng, n=5):
    return [int(t) for t in rng.integers(0, 256, n)]


def _prompts(clip: bytes) -> dict[str, dict]:
    rng = np.random.default_rng(3)
    video = [VISION_START, VIDEO_PAD, VISION_END]
    image = [VISION_START, IMAGE_PAD, VISION_END]
    odd = random_frames(rng, 7, 56, 112)  # 7 frames: the last temporal patch repeats the last frame
    return {
        "clip": {"prompt_token_ids": _text(rng) + video + _text(rng), "multi_modal_data": {"video": clip}},
        "odd frames": {"prompt_token_ids": _text(rng) + video + _text(rng), "multi_modal_data": {"video": odd}},
        "two videos and an image": {
            "prompt_token_ids": _text(rng) + video + _text(rng) + image + _text(rng) + video + _text(rng),
            "multi_modal_data": {"video": [clip, random_frames(rng, 6, 60, 100)], "image": [random_image(rng, 60, 75)]},
        },
    }


def _engine(checkpoint, chunk_tokens: int, **kwargs):
    # 3 PyAV sessions split the clip along GOPs; the clip is 4 temporal patches of 8 tokens. One item per encoder
    # batch by default, so each chunk's GEMMs see only its own rows (module docstring)
    kwargs.setdefault("encoder_budget_tokens", 1)
    return make_llm(
        str(checkpoint),
        device="cpu",
        mm_processor_kwargs=PIXELS,
        video_chunk_tokens=chunk_tokens,
        video_decoder_cpu_sessions=3,
        **kwargs,
    )


def _run(llm, prompts):
    engine = llm.llm_engine
    requests = [engine.add_request(prompt, GREEDY) for prompt in prompts]
    outputs = {}
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o for o in engine.step() if o.finished}
    assert all(o.error is None for o in outputs.values()), [o.error for o in outputs.values()]
    return requests, [outputs[r.request_id].outputs[0].token_ids for r in requests]


def _video_embeddings(engine, request) -> list[torch.Tensor]:
    """Each video's embedding rows, its chunks' entries in the encoder outputs concatenated."""
    videos: list[list[torch.Tensor]] = []
    for feature in request.mm_features:
        if feature.modality == "video":
            if feature.chunk.index == 0:
                videos.append([])
            videos[-1].append(engine.core.encoder_stage.embeddings[feature.mm_hash])
    return [torch.cat(rows) for rows in videos]


@pytest.fixture(scope="module")
def unpipelined(checkpoint, clip):
    llm = _engine(checkpoint, chunk_tokens=0)
    prompts = list(_prompts(clip).values())
    requests, tokens = _run(llm, prompts)
    assert all(f.chunk.num_chunks == 1 for r in requests for f in r.mm_features if f.modality == "video")
    embeddings = [_video_embeddings(llm.llm_engine, r) for r in requests]
    assert len({t for ts in tokens for t in ts}) > 4, "the checkpoint should not repeat one token"
    llm.llm_engine.check_idle_integrity()
    llm.llm_engine.shutdown()
    return tokens, embeddings


@pytest.mark.parametrize("chunk_tokens", [1, 50])
def test_pipelined_embeddings_and_tokens_equal_the_unpipelined_path(checkpoint, clip, unpipelined, chunk_tokens):
    expected_tokens, expected_embeddings = unpipelined
    llm = _engine(checkpoint, chunk_tokens=chunk_tokens, max_num_batched_tokens=24, block_size=4)
    engine = llm.llm_engine
    requests, tokens = _run(llm, list(_prompts(clip).values()))
    clip_chunks = [(f.chunk.t_start, f.chunk.t_end) for f in requests[0].mm_features]
    assert clip_chunks == {1: [(0, 1), (1, 2), (2, 3), (3, 4)], 50: [(0, 1), (1, 3), (3, 4)]}[chunk_tokens]
    assert tokens == expected_tokens
    for request, expected in zip(requests, expected_embeddings, strict=True):
        ours = _video_embeddings(engine, request)
        assert len(ours) == len(expected) and all(a.equal(b) for a, b in zip(ours, expected))
    engine.check_idle_integrity()
    engine.shutdown()


def test_batched_chunks_prefix_cache_hits_and_preemption_keep_the_tokens(checkpoint, clip, unpipelined):
    expected_tokens, expected_embeddings = unpipelined
    # chunks batched with other items; few KV blocks: requests preempt each other; the later rounds are served
    # from the prefix and encoder caches
    llm = _engine(
        checkpoint,
        chunk_tokens=16,
        num_gpu_blocks_override=32,
        block_size=4,
        max_num_batched_tokens=32,
        encoder_budget_tokens=64,
    )
    engine = llm.llm_engine
    prompts = list(_prompts(clip).values())
    requests, tokens = _run(llm, prompts + prompts)
    assert tokens == expected_tokens + expected_tokens
    assert engine.core.scheduler.num_preemptions > 0
    for request, expected in zip(requests[:3], expected_embeddings):
        for ours, theirs in zip(_video_embeddings(engine, request), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    hits_before = engine.core.kv_manager.prefix_cache_stats.hits
    _, again = _run(llm, prompts)
    assert again == expected_tokens and engine.core.kv_manager.prefix_cache_stats.hits > hits_before
    engine.check_idle_integrity()
    engine.shutdown()
