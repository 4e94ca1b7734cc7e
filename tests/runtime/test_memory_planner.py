"""Memory-plan arithmetic against a fake device (no CUDA needed), the overrides, and the error when nothing fits."""

import random

import pytest
import torch

from spaceserve.config import CacheConfig, SchedulerConfig
from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.image import smart_resize
from spaceserve.runtime.memory_planner import (
    ProfiledMemory,
    largest_image_grid,
    plan_memory,
    profile_memory,
)

GIB = 1 << 30


class FakeDevice:
    """Allocations the warm-ups make are scripted: each run allocates `bytes` at its peak then frees them."""

    def __init__(self, total: int, non_torch: int, weights: int) -> None:
        self.total, self.non_torch = total, non_torch
        self.current = weights
        self.peak = weights
        self.cached = 0

    def run(self, nbytes: int, scratch: int = 0):
        def go():
            self.current += nbytes + scratch
            self.peak = max(self.peak, self.current)
            self.current -= nbytes + scratch
            self.cached = max(self.cached, nbytes + scratch)
            return scratch

        return go

    def total_and_free(self):
        return self.total, self.total - self.non_torch - self.current - self.cached

    def allocated(self):
        return self.current

    def reserved(self):
        return self.current + self.cached

    def peak_allocated(self):
        return self.peak

    def reset_peak(self):
        self.peak = self.current

    def synchronize(self):
        pass


def test_profiled_plan_gives_the_kv_cache_what_is_left():
    rng = random.Random(3)
    total = 80 * GIB
    non_torch, weights = rng.randint(1, 900) << 20, rng.randint(4, 30) * GIB
    lm, encoder, graph = rng.randint(1, 4000) << 20, rng.randint(1, 4000) << 20, rng.randint(1, 300) << 20
    device = FakeDevice(total, non_torch, weights)
    profiled = profile_memory(
        device, device.run(lm, scratch=rng.randint(1, 500) << 20), device.run(encoder), device.run(graph), cuda_graph_buffer_bytes=77
    )
    assert profiled.non_torch_bytes == non_torch  # the cached scratch counts as torch's, not as someone else's
    assert profiled == ProfiledMemory(total, non_torch, weights, lm, encoder, graph + 77)

    per_block = rng.randint(1, 64) << 16
    encoder_cache = rng.randint(1, 100) << 20
    cache = CacheConfig(gpu_memory_utilization=0.9)
    plan = plan_memory(cache, SchedulerConfig(), per_block, device_type="cuda", encoder_cache_bytes=encoder_cache, profiled=profiled)
    left = int(total * 0.9) - non_torch - weights - max(lm, encoder) - graph - 77 - encoder_cache
    assert plan.source == "profiled" and plan.num_kv_blocks == left // per_block
    assert plan.kv_cache_bytes == plan.num_kv_blocks * per_block and left - plan.kv_cache_bytes < per_block
    assert plan.peak_activation_bytes == max(lm, encoder)
    # the check: within 5% of what is left after weights and measured peak activations
    after_weights_and_peaks = int(total * 0.9) - weights - max(lm, encoder)
    assert abs(plan.kv_cache_bytes - after_weights_and_peaks) <= 0.05 * after_weights_and_peaks

    concurrent = plan_memory(
        cache, SchedulerConfig(), per_block, device_type="cuda", encoder_cache_bytes=encoder_cache, profiled=profiled,
        encoder_streams=1,
    )
    assert concurrent.peak_activation_bytes == lm + encoder
    assert concurrent.num_kv_blocks == (left - min(lm, encoder)) // per_block
    # space: the LM on the whole device and on its partition, the encoder on its partition and the whole device
    space = plan_memory(
        cache, SchedulerConfig(), per_block, device_type="cuda", encoder_cache_bytes=encoder_cache, profiled=profiled,
        lm_streams=2, encoder_streams=2,
    )
    assert space.peak_activation_bytes == 2 * (lm + encoder) and space.cuda_graph_bytes == 2 * (graph + 77)
    assert space.num_kv_blocks == (left - max(lm, encoder) - 2 * min(lm, encoder) - graph - 77) // per_block
    assert str(plan.num_kv_blocks) in plan.summary()

    # processed videos live on the device too: their cache is one more line item
    video_cache = rng.randint(1, 2000) << 20
    with_videos = plan_memory(
        cache, SchedulerConfig(), per_block, device_type="cuda", encoder_cache_bytes=encoder_cache,
        video_cache_bytes=video_cache, profiled=profiled,
    )
    assert with_videos.video_cache_bytes == video_cache
    assert with_videos.num_kv_blocks == (left - video_cache) // per_block
    assert "video cache" in with_videos.summary()


def test_vision_graphs_are_reserved_and_replace_the_eager_encoder_peak_when_every_batch_fits():
    rng = random.Random(5)
    total, non_torch, weights = 80 * GIB, rng.randint(1, 900) << 20, rng.randint(4, 30) * GIB
    lm, encoder = rng.randint(1, 4000) << 20, rng.randint(1, 4000) << 20
    vision = rng.randint(1, 3000) << 20
    device = FakeDevice(total, non_torch, weights)
    profiled = profile_memory(device, device.run(lm), device.run(encoder), None)
    cache, per_block = CacheConfig(gpu_memory_utilization=0.9), 1 << 20
    usable = int(total * 0.9) - non_torch - weights

    def plan(**kwargs):
        return plan_memory(cache, SchedulerConfig(), per_block, device_type="cuda", encoder_cache_bytes=0,
                           profiled=profiled, **kwargs)  # fmt: skip

    time_graphed = plan(vision_graph_bytes=vision, encoder_runs_eagerly=False)
    assert time_graphed.vision_graph_bytes == vision and time_graphed.encoder_peak_bytes == 0
    assert time_graphed.num_kv_blocks == (usable - lm - vision) // per_block  # the graph pool is not shared with the LM
    time_eager_too = plan(vision_graph_bytes=vision, encoder_runs_eagerly=True)  # a batch can exceed the last bucket
    assert time_eager_too.num_kv_blocks == (usable - max(lm, encoder) - vision) // per_block
    space = plan(lm_streams=2, encoder_streams=3, vision_graph_bytes=3 * vision, encoder_runs_eagerly=False)
    assert space.num_kv_blocks == (usable - 2 * lm - 3 * vision) // per_block
    assert "vision CUDA graphs" in space.summary()


def test_a_model_that_does_not_fit_names_the_numbers_and_what_to_lower():
    device = FakeDevice(24 * GIB, 500 << 20, 16 * GIB)
    profiled = profile_memory(device, device.run(5 * GIB), device.run(1 * GIB), None)
    with pytest.raises(ConfigError) as error:
        plan_memory(
            CacheConfig(gpu_memory_utilization=0.9), SchedulerConfig(max_model_len=4096), 1 << 20,
            device_type="cuda", encoder_cache_bytes=0, profiled=profiled,
        )
    message = str(error.value)
    assert "does not fit" in message and "weights 16.00" in message and "peak activations 5.00" in message
    assert "max_num_batched_tokens" in message and "gpu_memory_utilization" in message


def test_overrides_and_the_cpu_default():
    scheduler = SchedulerConfig(max_num_seqs=4, max_model_len=64)
    fixed = plan_memory(CacheConfig(num_gpu_blocks=37), scheduler, 1000, device_type="cuda", encoder_cache_bytes=0)
    assert (fixed.source, fixed.num_kv_blocks) == ("num_gpu_blocks", 37)
    budget = plan_memory(
        CacheConfig(kv_cache_memory_bytes=123_456), scheduler, 1000, device_type="cuda", encoder_cache_bytes=0
    )
    assert (budget.source, budget.num_kv_blocks) == ("kv_cache_memory_bytes", 123)
    cpu = plan_memory(CacheConfig(block_size=16), scheduler, 1000, device_type="cpu", encoder_cache_bytes=0)
    assert (cpu.source, cpu.num_kv_blocks) == ("cpu_default", 4 * 4)
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        plan_memory(CacheConfig(kv_cache_memory_bytes=3000), scheduler, 1000, device_type="cpu", encoder_cache_bytes=0)
    with pytest.raises(ValueError, match="needs profiled memory"):
        plan_memory(CacheConfig(), scheduler, 1000, device_type="cuda", encoder_cache_bytes=0)


def test_the_largest_image_is_the_processors_largest():
    config = ImageProcessorConfig(max_pixels=random.Random(1).randint(300_000, 2_000_000))
    t, h, w = largest_image_grid(config)
    assert t == 1 and h * w * config.patch_size**2 <= config.max_pixels
    # no other aspect ratio gives more patches under the same limit
    best = max(
        (a // config.patch_size) * (b // config.patch_size)
        for a, b in (smart_resize(x, 1000, config.factor, config.min_pixels, config.max_pixels) for x in range(400, 2001, 50))
    )
    assert h * w >= best * 0.97


def test_engine_exposes_the_plan_on_cpu():
    from tests.llm_factory import TEST_KV_CACHE_BYTES, make_llm

    engine = make_llm("tiny-qwen2-vl", max_model_len=256).llm_engine
    plan = engine.core.memory_plan
    assert plan.source == "kv_cache_memory_bytes" and plan.num_kv_blocks == engine.core.num_kv_blocks
    assert plan.kv_cache_bytes <= TEST_KV_CACHE_BYTES < plan.kv_cache_bytes + plan.bytes_per_block
    assert engine.core.model_runner.kv_caches[0].shape[1] == plan.num_kv_blocks
    assert torch.get_default_dtype() == torch.float32
