"""Memory planning: how many KV blocks the device holds once everything else has its share.

On CUDA, after the weights load, warm-up runs measure peak activation memory: the largest prefill chunk
(max_num_batched_tokens tokens) with the largest sampler, the largest encoder batch (the encoder budget filled
with the largest image the processor allows) and one eager decode step at the largest CUDA-graph size (standing
in for the graph pool). Then

    KV bytes = total x gpu_memory_utilization - non-torch usage - weights - peak activations
               - CUDA-graph estimate - vision CUDA graphs - encoder cache - processed-video cache

and the number of blocks is KV bytes // bytes per block. The encoder cache is counted at its capacity
(EncoderConfig.cache_tokens rows of the LM hidden size), and so is the cache of processed videos (their pixel
values live on the engine's device: VideoConfig.cache_bytes). `time` multiplexing never runs the encoder and the LM
at once, so their peaks overlap (max); concurrent modes add them. PyTorch's caching allocator keeps each stream's
freed blocks for that stream, so a stage that runs on several streams (space: the LM on the whole device and on its
partition) is counted once per stream, and so is each set of decode graphs.

Vision CUDA graphs are captured before the KV cache is sized, and what each stream's set holds (its buffers and
its graphs' private pool) is measured and reserved. Their pools are not shared with the LM's activations, so they
add to the peaks in every mode. When every batch the encoder can be given fits the largest bucket, the encoder never
runs eagerly and its eager peak is not reserved.

Overrides: `num_gpu_blocks` fixes the count, `kv_cache_memory_bytes` fixes the bytes (no profiling); on CPU the
default is 1 GiB capped at max_num_seqs x max_model_len.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from spaceserve.config import CacheConfig, SchedulerConfig
from spaceserve.core.errors import ConfigError
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.image import smart_resize

DEFAULT_CPU_KV_BYTES = 1 << 30
_GIB = float(1 << 30)


class MemoryReader(Protocol):
    """The device-memory figures the planner reads; CUDA's in production, a fake in unit tests."""

    def total_and_free(self) -> tuple[int, int]: ...
    def allocated(self) -> int: ...
    def reserved(self) -> int: ...
    def peak_allocated(self) -> int: ...
    def reset_peak(self) -> None: ...
    def synchronize(self) -> None: ...


class CudaMemoryReader:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total_and_free(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return total, free

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def peak_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


@dataclass(frozen=True)
class MemoryPlan:
    """Where the device memory goes. Byte counts; `source` says how the KV size was decided:
    "profiled" (gpu_memory_utilization), "kv_cache_memory_bytes", "num_gpu_blocks" or "cpu_default"."""

    source: str
    num_kv_blocks: int
    bytes_per_block: int
    kv_cache_bytes: int
    total_bytes: int = 0
    gpu_memory_utilization: float = 0.0
    non_torch_bytes: int = 0
    weights_bytes: int = 0
    peak_activation_bytes: int = 0
    lm_peak_bytes: int = 0
    encoder_peak_bytes: int = 0
    cuda_graph_bytes: int = 0
    vision_graph_bytes: int = 0
    encoder_cache_bytes: int = 0
    video_cache_bytes: int = 0

    def summary(self) -> str:
        if self.source != "profiled":
            return f"KV cache: {self.num_kv_blocks} blocks, {self.kv_cache_bytes / _GIB:.2f} GiB ({self.source})"
        return (
            f"memory plan: {self.total_bytes / _GIB:.2f} GiB x {self.gpu_memory_utilization} = "
            f"{self.total_bytes * self.gpu_memory_utilization / _GIB:.2f} GiB; non-torch {self.non_torch_bytes / _GIB:.2f}, "
            f"weights {self.weights_bytes / _GIB:.2f}, peak activations {self.peak_activation_bytes / _GIB:.2f} "
            f"(LM {self.lm_peak_bytes / _GIB:.2f}, encoder {self.encoder_peak_bytes / _GIB:.2f}), "
            f"CUDA graphs {self.cuda_graph_bytes / _GIB:.2f}, vision CUDA graphs {self.vision_graph_bytes / _GIB:.2f}, "
            f"encoder cache {self.encoder_cache_bytes / _GIB:.2f}, video cache {self.video_cache_bytes / _GIB:.2f} "
            f"-> KV cache {self.kv_cache_bytes / _GIB:.2f} GiB = {self.num_kv_blocks} blocks"
        )


@dataclass(frozen=True)
class ProfiledMemory:
    """What the warm-ups measured, in bytes."""

    total_bytes: int
    non_torch_bytes: int
    weights_bytes: int
    lm_peak_bytes: int
    encoder_peak_bytes: int
    cuda_graph_bytes: int


WarmUp = Callable[[], "int | None"]
"""Runs one warm-up; may return bytes of scratch state it allocated that a real step would not (a scratch KV
cache), which are discounted from its peak."""


def profile_memory(
    reader: MemoryReader,
    run_language_model: WarmUp,
    run_encoder: WarmUp | None,
    run_decode_graph_size: WarmUp | None,
    cuda_graph_buffer_bytes: int = 0,
) -> ProfiledMemory:
    """Run each warm-up and read the peak it adds over what is allocated before it (the weights)."""
    reader.synchronize()
    weights = reader.allocated()

    def peak_of(run: WarmUp | None) -> int:
        if run is None:
            return 0
        reader.reset_peak()
        scratch = run() or 0
        reader.synchronize()
        return max(reader.peak_allocated() - weights - scratch, 0)

    lm_peak = peak_of(run_language_model)
    encoder_peak = peak_of(run_encoder)
    graph_peak = peak_of(run_decode_graph_size)
    total, free = reader.total_and_free()
    return ProfiledMemory(
        total_bytes=total,
        non_torch_bytes=max(total - free - reader.reserved(), 0),
        weights_bytes=weights,
        lm_peak_bytes=lm_peak,
        encoder_peak_bytes=encoder_peak,
        cuda_graph_bytes=graph_peak + cuda_graph_buffer_bytes if run_decode_graph_size is not None else 0,
    )


def plan_memory(
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    bytes_per_block: int,
    *,
    device_type: str,
    encoder_cache_bytes: int,
    video_cache_bytes: int = 0,
    profiled: ProfiledMemory | None = None,
    lm_streams: int = 1,
    encoder_streams: int = 0,
    vision_graph_bytes: int = 0,
    encoder_runs_eagerly: bool = True,
) -> MemoryPlan:
    """The plan from the overrides, or from `profiled` measurements (CUDA with gpu_memory_utilization).

    `lm_streams`: streams the language model runs (and captures decode graphs) on; `encoder_streams`: streams the
    encoder runs on concurrently with the LM, 0 when it runs inside the LM's step (time multiplexing);
    `vision_graph_bytes`: what the vision CUDA graphs of every stream hold, measured; `encoder_runs_eagerly`: False
    when every encoder batch replays a graph, so the eager encoder peak needs no room."""
    min_blocks = -(-scheduler.max_model_len // cache.block_size)
    if cache.num_gpu_blocks is not None:
        blocks = cache.num_gpu_blocks
        return MemoryPlan("num_gpu_blocks", blocks, bytes_per_block, blocks * bytes_per_block)
    if cache.kv_cache_memory_bytes is not None or device_type != "cuda":
        if cache.kv_cache_memory_bytes is not None:
            source, budget = "kv_cache_memory_bytes", cache.kv_cache_memory_bytes
        else:
            source = "cpu_default"
            budget = min(DEFAULT_CPU_KV_BYTES, min_blocks * scheduler.max_num_seqs * bytes_per_block)
        blocks = max(budget, 0) // bytes_per_block
        if blocks < min_blocks:
            raise ConfigError(
                f"the KV cache ({source}={budget} bytes) fits {blocks} blocks of {cache.block_size} tokens, fewer "
                f"than one sequence of max_model_len={scheduler.max_model_len} needs ({min_blocks}); lower "
                f"max_model_len or give the KV cache more memory"
            )
        return MemoryPlan(source, blocks, bytes_per_block, blocks * bytes_per_block)
    if profiled is None:
        raise ValueError("sizing the KV cache from gpu_memory_utilization needs profiled memory")

    lm_peak = profiled.lm_peak_bytes * lm_streams
    encoder_alone = profiled.encoder_peak_bytes if encoder_runs_eagerly else 0
    encoder_peak = encoder_alone * encoder_streams
    peak = lm_peak + encoder_peak if encoder_streams else max(lm_peak, encoder_alone)
    graph_bytes = profiled.cuda_graph_bytes * lm_streams
    usable = math.floor(profiled.total_bytes * cache.gpu_memory_utilization)
    kv_bytes = (
        usable - profiled.non_torch_bytes - profiled.weights_bytes - peak - graph_bytes - vision_graph_bytes
        - encoder_cache_bytes - video_cache_bytes
    )  # fmt: skip
    blocks = max(kv_bytes, 0) // bytes_per_block
    plan = MemoryPlan(
        source="profiled",
        num_kv_blocks=blocks,
        bytes_per_block=bytes_per_block,
        kv_cache_bytes=blocks * bytes_per_block,
        total_bytes=profiled.total_bytes,
        gpu_memory_utilization=cache.gpu_memory_utilization,
        non_torch_bytes=profiled.non_torch_bytes,
        weights_bytes=profiled.weights_bytes,
        peak_activation_bytes=peak,
        lm_peak_bytes=lm_peak,
        encoder_peak_bytes=encoder_peak if encoder_streams else encoder_alone,
        cuda_graph_bytes=graph_bytes,
        vision_graph_bytes=vision_graph_bytes,
        encoder_cache_bytes=encoder_cache_bytes,
        video_cache_bytes=video_cache_bytes,
    )
    if blocks < min_blocks:
        need = min_blocks * bytes_per_block
        raise ConfigError(
            f"the model does not fit: {plan.summary()}; one sequence of max_model_len={scheduler.max_model_len} "
            f"needs {min_blocks} blocks ({need / _GIB:.2f} GiB). Raise gpu_memory_utilization or lower "
            f"max_num_batched_tokens (prefill peak), the encoder budget_tokens (encoder peak), encoder cache_tokens, "
            f"video cache_bytes, max_num_seqs / cuda_graph_sizes, the vision CUDA-graph buckets, or max_model_len"
        )
    return plan


def largest_image_grid(image_config: ImageProcessorConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of the largest image the processor produces (a square at max_pixels)."""
    side = math.isqrt(image_config.max_pixels)
    height, width = smart_resize(side, side, image_config.factor, image_config.min_pixels, image_config.max_pixels)
    return 1, height // image_config.patch_size, width // image_config.patch_size


def run_largest_encoder_batch(
    model: torch.nn.Module, image_config: ImageProcessorConfig, budget_tokens: int, device: torch.device
) -> None:
    """Encode as many of the largest images as the encoder budget allows (at least one), random pixels."""
    grid = largest_image_grid(image_config)
    patches = grid[0] * grid[1] * grid[2]
    tokens = patches // image_config.merge_size**2
    count = max(1, budget_tokens // tokens)
    vision = model.config.vision
    generator = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randn(count * patches, vision.patch_dim, generator=generator, device=device)
    grid_thw = torch.tensor([grid] * count, dtype=torch.long, device=device)
    with torch.inference_mode():
        model.encode_images(pixels, grid_thw)
