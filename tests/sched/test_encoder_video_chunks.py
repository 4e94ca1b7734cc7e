"""The encoder scheduler with video chunks (no torch): chunks queue before their frames exist, run once their
inputs arrive and in chunk order, count as remaining work for TWSRFT, and leave nothing behind when cancelled."""

import random

from spaceserve.core import MultiModalFeature, PlaceholderRange, Request, SamplingParams, VideoChunk
from tests.sched.test_encoder_scheduler import drain, make_request, make_scheduler

VIDEO_PAD = 151656


def make_video_request(request_id, arrival_time, chunk_tokens, video_hash, decoded=0, seed=0):
    """3 text tokens, then a video of len(chunk_tokens) chunks of which the first `decoded` have pixel values."""
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 150_000) for _ in range(3)]
    features, t = [], 0
    for index, length in enumerate(chunk_tokens):
        temporal = length // 2  # 2 tokens per temporal patch in these fake grids
        chunk = VideoChunk(video_hash, index, len(chunk_tokens), t, t + temporal)
        features.append(
            MultiModalFeature(
                f"{video_hash}-c{index}",
                "video",
                PlaceholderRange(len(tokens), length),
                4 * length,
                (temporal, 2, 4),
                pixel_values=f"pixels-{index}" if index < decoded else None,
                chunk=chunk,
                inputs_pending=index >= decoded,
            )
        )
        tokens += [VIDEO_PAD] * length
        t += temporal
    tokens += [rng.randrange(1, 150_000) for _ in range(3)]
    return Request(request_id, tokens, SamplingParams(), mm_features=features, arrival_time=arrival_time)


def queue_all(scheduler, *requests):
    for request in requests:
        for index in range(len(request.mm_features)):
            scheduler.request_encoding(request, index)


def decoded(request, index):
    """The chunk as the engine hands it over once the decode stage produced it."""
    feature = request.mm_features[index]
    return MultiModalFeature(
        feature.mm_hash, feature.modality, feature.placeholder, feature.num_patches, feature.grid_thw,
        pixel_values=f"pixels-{index}", chunk=feature.chunk, inputs_pending=False,
    )


def test_chunks_wait_for_their_frames_then_run_in_order():
    scheduler, cache = make_scheduler("fcfs")
    video = make_video_request("v", 0.0, [4, 8, 8], "vid")
    queue_all(scheduler, video)
    assert scheduler.num_queued_items == 3 and scheduler.num_pending_items == 3
    assert not scheduler.has_work and scheduler.schedule() is None and cache.num_entries == 0
    assert video.encoder_enqueued_time is None  # nothing the encoder could start on yet
    # frames of chunk 1 arrive before chunk 0's: chunk 1 must not take cache room ahead of chunk 0
    assert scheduler.provide_inputs(decoded(video, 1)) == {"v"}
    assert not scheduler.has_work and scheduler.schedule() is None
    assert cache.num_entries == 0
    scheduler.provide_inputs(decoded(video, 0))
    batch = scheduler.schedule()
    assert [f.mm_hash for f in batch.items] == ["vid-c0", "vid-c1"]
    assert [f.pixel_values for f in batch.items] == ["pixels-0", "pixels-1"]
    assert scheduler.num_pending_items == 1 and scheduler.schedule() is None
    scheduler.provide_inputs(decoded(video, 2))
    assert [f.mm_hash for f in scheduler.schedule().items] == ["vid-c2"]
    assert not scheduler.has_work and scheduler.num_queued_items == 0


def test_inputs_for_an_item_nobody_queued_change_nothing():
    scheduler, _ = make_scheduler("fcfs")
    video = make_video_request("v", 0.0, [4, 4], "vid")
    assert scheduler.provide_inputs(decoded(video, 0)) == frozenset()
    assert scheduler.num_queued_items == 0 and scheduler.schedule() is None


def test_enqueue_time_is_when_the_first_chunk_can_run():
    scheduler, _ = make_scheduler("fcfs")
    video = make_video_request("v", 0.0, [4, 4], "vid")
    scheduler.clock.now = 1.0
    queue_all(scheduler, video)
    assert video.encoder_enqueued_time is None
    video.mm_features[0] = decoded(video, 0)
    scheduler.clock.now = 2.5
    scheduler.request_encoding(video, 0)  # the LM scheduler asks again once the request holds the pixels
    assert video.encoder_enqueued_time == 2.5
    assert scheduler.queued_item("vid-c0").feature.pixel_values == "pixels-0"


def test_twsrft_counts_a_videos_undecoded_chunks_so_short_images_go_first():
    chunks = [8] * 6  # 48 tokens, only the first chunk decoded
    for policy, expected_first in (("twsrft", "img-img0"), ("fcfs", "vid-c0")):
        scheduler, _ = make_scheduler(policy, window_s=1.0, budget=8)
        video = make_video_request("vid", 0.1, chunks, "vid", decoded=1)
        image = make_request("img", 0.5, [20])  # 20 tokens: more than one chunk, less than the video
        queue_all(scheduler, video, image)
        assert scheduler.schedule().items[0].mm_hash == expected_first


def test_short_image_overtakes_the_rest_of_a_long_video_already_running():
    scheduler, cache = make_scheduler("twsrft", window_s=1.0, budget=8)
    video = make_video_request("vid", 0.0, [8] * 5, "vid", decoded=5)
    queue_all(scheduler, video)
    first = scheduler.schedule()
    assert [f.mm_hash for f in first.items] == ["vid-c0"]
    cache.mark_ready("vid-c0")
    image = make_request("img", 0.4, [8])  # arrives while the video is being encoded, same window
    queue_all(scheduler, image)
    # the video still has 32 tokens queued, the image 8: the image runs next, not after the whole video
    assert drain(scheduler) == ["img-img0", "vid-c1", "vid-c2", "vid-c3", "vid-c4"]


def test_cancel_while_decoding_drops_pending_chunks_and_holds_no_cache_entry():
    scheduler, cache = make_scheduler("fcfs")
    video = make_video_request("v", 0.0, [4, 4, 4], "vid", decoded=1)
    queue_all(scheduler, video)
    assert [f.mm_hash for f in scheduler.schedule().items] == ["vid-c0"]
    scheduler.cancel("v")
    assert scheduler.num_queued_items == 0 and scheduler.provide_inputs(decoded(video, 1)) == frozenset()
    cache.mark_ready("vid-c0")
    cache.check_integrity()


def test_a_second_request_with_the_pixels_makes_the_shared_chunk_runnable():
    scheduler, cache = make_scheduler("fcfs")
    waiting = make_video_request("a", 0.0, [4, 4], "vid")
    ready = make_video_request("b", 1.0, [4, 4], "vid", decoded=2, seed=1)
    queue_all(scheduler, waiting, ready)
    assert scheduler.num_queued_items == 2 and scheduler.num_pending_items == 0
    batch = scheduler.schedule()
    assert [f.mm_hash for f in batch.items] == ["vid-c0", "vid-c1"] and batch.request_ids == {"a", "b"}
    assert cache.request_ids("vid-c0") == {"a", "b"}


def test_schedulers_and_caches_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; import spaceserve.sched.scheduler, spaceserve.sched.encoder_scheduler, "
        "spaceserve.kvcache.encoder_cache, spaceserve.kvcache.kv_manager; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
