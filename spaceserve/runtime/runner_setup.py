"""Builds the runners for an engine: attention backend, memory plan (profiling on CUDA), vision CUDA graphs on every
stream the encoder runs on, KV cache, decode CUDA graphs. The executor calls `build_runners` once at start-up, on
every tensor-parallel rank in lockstep (profiling and graph capture issue collectives); the ranks then agree on the
smallest KV block count, since rank 0's scheduler hands the same block ids to all.

With the encoder in a process of its own (layout.encoder_process) this process neither profiles the encoder nor
captures vision graphs: that process has done both before this one profiles, so the device memory it holds is
already missing from what the plan finds free."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple

import torch

from spaceserve.config import EngineConfig
from spaceserve.layers.attention import AttentionBackend, get_attention_backend, triton_available
from spaceserve.runtime.cuda_graphs import cuda_graph_batch_sizes
from spaceserve.runtime.kv_cache import allocate_kv_caches, kv_bytes_per_block
from spaceserve.runtime.memory_planner import (
    CudaMemoryReader,
    MemoryPlan,
    plan_memory,
    profile_memory,
    run_largest_encoder_batch,
)
from spaceserve.runtime.model_runner import ModelRunner
from spaceserve.runtime.multiplex import ExecutionLayout
from spaceserve.runtime.parallel_state import GroupCoordinator
from spaceserve.runtime.vision_graphs import GraphCapture, VisionCUDAGraphs, cuda_graph_capture, vision_graph_buckets

logger = logging.getLogger(__name__)


class Runners(NamedTuple):
    model_runner: ModelRunner
    vision_graphs: VisionCUDAGraphs | None
    """The encoder's graph sets by stream, for the EncoderRunner; None when the encoder runs eagerly."""
    memory_plan: MemoryPlan


def decode_graph_sizes(config: EngineConfig, backend: AttentionBackend, device: torch.device) -> tuple[int, ...]:
    """The decode batch sizes to capture; none when eager is forced, off CUDA, or the backend can't be graphed."""
    if config.enforce_eager or device.type != "cuda" or not getattr(backend, "supports_cuda_graphs", False):
        return ()
    return cuda_graph_batch_sizes(config.scheduler.max_num_seqs, config.cuda_graph_sizes)


def vision_graph_patch_buckets(config: EngineConfig, device: torch.device) -> tuple[int, ...]:
    """The vision buckets to capture; none when eager is forced or vision graphs are off, off CUDA, or without Triton
    (a graph's torch attention path is dense, for CPU tests only)."""
    if config.enforce_eager or not config.vision_cuda_graphs or device.type != "cuda" or not triton_available():
        return ()
    merge = config.model_config.vision.spatial_merge_size
    return vision_graph_buckets(config.encoder.budget_tokens, merge, config.vision_cuda_graph_patches)


def encoder_runs_eagerly(config: EngineConfig, graphs: VisionCUDAGraphs | None) -> bool:
    """Whether any batch the encoder can be given is larger than the largest bucket: a batch is at most the
    budget, or one item alone, which the encoder cache (cache_tokens) bounds."""
    if graphs is None:
        return True
    unit = config.model_config.vision.spatial_merge_size ** 2
    return max(config.encoder.budget_tokens, config.encoder.cache_tokens) * unit > graphs.max_patches


def build_runners(
    config: EngineConfig,
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    layout: ExecutionLayout,
    vision_graph_capture: GraphCapture = cuda_graph_capture,
    tp_group: GroupCoordinator | None = None,
) -> Runners:
    text = config.model_config.text
    tp = tp_group.world_size if tp_group is not None else 1
    block_size = config.cache.block_size
    sched = config.scheduler
    backend = get_attention_backend(config.attention_backend, device)
    graph_sizes = decode_graph_sizes(config, backend, device)
    runner = ModelRunner(
        model,
        allocate_kv_caches(text, 1, block_size, dtype, device, tp),  # a layout to profile with; replaced below
        block_size,
        backend,
        device,
        max_num_tokens=max(sched.max_num_batched_tokens, max(graph_sizes, default=0)),
        max_num_seqs=sched.max_num_seqs,
        max_model_len=sched.max_model_len,
        stream=layout.lm_stream,
    )
    element = torch.empty((), dtype=dtype).element_size()
    encoder_cache_bytes = config.encoder.cache_tokens * text.hidden_size * element
    profiled = None
    if device.type == "cuda" and config.cache.num_gpu_blocks is None and config.cache.kv_cache_memory_bytes is None:
        largest_graph = max(graph_sizes, default=0)
        profiled = profile_memory(
            CudaMemoryReader(device),
            lambda: runner.profile_run(sched.max_num_batched_tokens, sched.max_model_len, sched.max_num_seqs),
            (lambda: run_largest_encoder_batch(model, config.image_config, config.encoder.budget_tokens, device))
            if not layout.encoder_process else None,
            (lambda: runner.profile_decode_step(largest_graph)) if graph_sizes else None,
            cuda_graph_buffer_bytes=largest_graph * text.vocab_size * 4,
        )
        torch.cuda.empty_cache()
    vision_graphs = None
    # tensor parallel: the tower runs eagerly (parallel_encoder.py; a graph would hold the weights mode's collectives);
    # an encoder process captures its own
    buckets = vision_graph_patch_buckets(config, device) if tp == 1 and not layout.encoder_process else ()
    if buckets:
        # time mode runs the encoder on the LM's stream, the others on streams of their own
        encoder_streams = layout.encoder_streams if layout.concurrent else (runner.stream,)
        vision_graphs = VisionCUDAGraphs(model.visual, buckets, device, dtype, capture=vision_graph_capture)
        vision_graphs.capture_on(encoder_streams)
        logger.info(
            "captured vision CUDA graphs for %d patch buckets (%d..%d) on %d stream(s), %.2f GiB",
            len(buckets), buckets[0], buckets[-1], len(encoder_streams), vision_graphs.total_memory_bytes / (1 << 30),
        )  # fmt: skip
    # with the prefill lane, each split's prefill stream may hold an LM step's activations too
    prefill_streams = len(layout.partitions) if config.allocation.enable_prefill_split else 0
    plan = plan_memory(
        config.cache,
        sched,
        kv_bytes_per_block(text, block_size, dtype, tp),
        device_type=device.type,
        encoder_cache_bytes=encoder_cache_bytes,
        video_cache_bytes=config.video.cache_bytes if device.type == "cuda" else 0,  # processed videos live there
        profiled=profiled,
        lm_streams=max(1, len(layout.lm_streams)) + prefill_streams,
        encoder_streams=layout.num_encoder_streams,
        vision_graph_bytes=vision_graphs.total_memory_bytes if vision_graphs is not None else 0,
        encoder_runs_eagerly=encoder_runs_eagerly(config, vision_graphs),
    )
    if tp > 1:
        agreed = tp_group.min_int(plan.num_kv_blocks)
        plan = replace(plan, num_kv_blocks=agreed, kv_cache_bytes=agreed * plan.bytes_per_block)
    logger.info(plan.summary())
    runner.initialize_kv_caches(allocate_kv_caches(text, plan.num_kv_blocks, block_size, dtype, device, tp))
    if graph_sizes:
        other_streams = tuple(s for s in layout.lm_streams if s != runner.stream)
        runner.capture_cuda_graphs(graph_sizes, other_streams)
        logger.info("captured decode CUDA graphs for batch sizes %s on %d stream(s)", graph_sizes, 1 + len(other_streams))
    return Runners(runner, vision_graphs, plan)
