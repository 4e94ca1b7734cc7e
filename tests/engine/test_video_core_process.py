"""Videos across the front / engine-core boundary: a request's chunk features and its decode job (the encoded bytes
with the probe's packet index, so the core never demuxes again) survive the wire exactly, and a video request
served by a core in its own process gives the tokens of an in-process one."""

from __future__ import annotations

import io

import numpy as np
import pytest

from spaceserve import SamplingParams
from spaceserve.core.engine_messages import AddRequest, CoreInput
from spaceserve.engine.serial import MessageDecoder, MessageEncoder
from spaceserve.engine.wire import request_from_wire, request_to_wire
from spaceserve.multimodal.video.decode import IndexedVideo
from spaceserve.multimodal.video.synthetic import make_clip
from tests.llm_factory import make_llm

SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 16}
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def clip() -> bytes:
    buffer = io.BytesIO()
    make_clip(buffer, width=64, height=48, seconds=4, fps=20, gop=15, bframes=2, open_gop=True, seed=9)
    return buffer.getvalue()


def _prompt(clip: bytes) -> dict:
    frames = np.random.default_rng(4).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    return {
        "prompt": "Compare <|vision_start|><|video_pad|><|vision_end|> with <|vision_start|><|video_pad|><|vision_end|>",
        "multi_modal_data": {"video": [clip, frames]},
    }


def test_chunks_and_decode_jobs_cross_the_wire_exactly(clip):
    llm = make_llm("tiny-qwen2-vl", mm_processor_kwargs=SMALL, video_chunk_tokens=8)
    request = llm.llm_engine.input_processor.process("r", _prompt(clip), PARAMS)
    assert len(request.mm_features) > 2 and all(f.inputs_pending for f in request.mm_features)
    frames = MessageEncoder().encode(AddRequest(request_to_wire(request)))
    received = request_from_wire(MessageDecoder(CoreInput).decode(frames).request)
    assert received.mm_features == request.mm_features  # chunk ranges, hashes, pending flags
    assert received.prompt_token_ids == request.prompt_token_ids
    assert len(received.pending_mm_work) == 2
    for (index, work), (sent_index, sent) in zip(received.pending_mm_work, request.pending_mm_work):
        assert index == sent_index and work.plan == sent.plan and work.chunks == sent.chunks
        assert work.mm_hash == sent.mm_hash and work.frame_indices == sent.frame_indices
    encoded, given = received.pending_mm_work[0][1].source, received.pending_mm_work[1][1].source
    assert isinstance(encoded, IndexedVideo) and encoded.source == clip
    assert encoded.index == request.pending_mm_work[0][1].source.index  # open GOPs, B-frames: dts, keyframes
    assert encoded.index.open_gop
    assert np.array_equal(np.asarray(given), np.asarray(request.pending_mm_work[1][1].source))


def test_a_core_in_its_own_process_serves_videos_with_the_same_tokens(clip):
    kwargs = dict(mm_processor_kwargs=SMALL, video_chunk_tokens=8)
    expected = [o.outputs[0].token_ids for o in make_llm("tiny-qwen2-vl", multiprocess=False, **kwargs).generate(
        [_prompt(clip)] * 2, PARAMS)]  # fmt: skip
    llm = make_llm("tiny-qwen2-vl", multiprocess=True, **kwargs)
    try:
        outputs = llm.generate([_prompt(clip)] * 2, PARAMS)
        assert [o.error for o in outputs] == [None, None]
        assert [o.outputs[0].token_ids for o in outputs] == expected
        stats = llm.llm_engine.call_utility("video_stats")
        assert stats["warm_up_s"]["cpu"] > 0 and stats["last_decode"]["backend"] in ("pyav", "frames given", "cache")
        llm.llm_engine.check_idle_integrity()
    finally:
        llm.llm_engine.shutdown()
