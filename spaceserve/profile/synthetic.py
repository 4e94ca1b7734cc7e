"""Synthetic steps for an EngineCore's own runners: requests whose KV is already "computed", so one decode or prefill
step of a chosen shape can be timed in isolation with exactly the runner, KV caches and graphs the engine runs.

Blocks come from the engine's block pool (and go back to it), shuffled so block tables are in random order as after
hours of serving; the KV caches are filled with random values, never zeros. Requests are built directly (no input
processing, no scheduler): what is timed is `ModelRunner` alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange
from spaceserve.core.request import Request, RequestStatus
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.core.scheduler_output import EncoderBatch, ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from spaceserve.kvcache.block_pool import KVBlock
from spaceserve.models.mrope import mrope_positions_for_config
from spaceserve.profile.timing import synchronize


class DoesNotFit(RuntimeError):
    """The step needs more KV blocks than the engine's cache has free, or more sequences or tokens than one of its
    steps may hold."""


@dataclass
class SyntheticStep:
    scheduled: SchedulerOutput
    blocks: list[KVBlock]

    @property
    def request_ids(self) -> list[str]:
        return [s.request.request_id for s in self.scheduled.sequences]

    def release(self, engine) -> None:
        """Give the blocks back to the pool and drop any per-request state the runner keeps."""
        engine.kv_manager.pool.free_blocks(self.blocks)
        self.blocks = []
        for request_id in self.request_ids:
            engine.model_runner.release(request_id)


def take_shuffled_blocks(engine, num_blocks: int, rng: np.random.Generator) -> list[KVBlock]:
    pool = engine.kv_manager.pool
    if num_blocks > pool.num_free_blocks:
        raise DoesNotFit(f"needs {num_blocks} KV blocks, the cache has {pool.num_free_blocks} free of {pool.num_blocks}")
    blocks = pool.get_new_blocks(num_blocks)
    return [blocks[i] for i in rng.permutation(num_blocks)]


def _request(engine, request_id: str, num_prompt_tokens: int, num_output_tokens: int, rng) -> Request:
    config = engine.config.model_config
    vocab = _plain_token_limit(config)
    prompt = rng.integers(0, vocab, size=num_prompt_tokens).tolist()
    positions, delta = mrope_positions_for_config(prompt, [], [], config)
    request = Request(
        request_id,
        prompt,
        SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
        eos_token_ids=config.eos_token_ids,
        mrope_positions=positions,
        mrope_position_delta=delta,
    )
    for token in rng.integers(0, vocab, size=num_output_tokens).tolist():
        request.append_output_token(token)
    request.status = RequestStatus.RUNNING
    return request


def _plain_token_limit(config) -> int:
    """Ids below every special token: a random vision-start id would make M-RoPE look for an image."""
    special = [config.vision_start_token_id, config.image_token_id, config.video_token_id, *config.eos_token_ids]
    if config.bos_token_id is not None:
        special.append(config.bos_token_id)
    return min([config.text.vocab_size, *special])


def _step(engine, shapes: Sequence[tuple[int, int, int]], rng, tag: str) -> SyntheticStep:
    """shapes: (prompt tokens, output tokens so far, tokens scheduled now) per sequence; the scheduled tokens are the
    last ones, everything before them counts as computed."""
    limits = engine.config.scheduler
    if len(shapes) > limits.max_num_seqs or sum(s[2] for s in shapes) > limits.max_num_batched_tokens:
        # a serving engine's start-up profile runs within its own limits (the profile command raises them)
        raise DoesNotFit(f"{len(shapes)} sequences and {sum(s[2] for s in shapes)} tokens in one step, past the "
                         f"engine's max_num_seqs={limits.max_num_seqs} or "
                         f"max_num_batched_tokens={limits.max_num_batched_tokens}")
    longest = max((prompt + output for prompt, output, _ in shapes), default=0)
    if longest > engine.config.scheduler.max_model_len:
        # the GPU run's start-up profile asked for 2048-token contexts in a 1024-token engine, which the input batch
        # refused mid-profile
        raise DoesNotFit(f"a sequence of {longest} tokens, past the engine's max_model_len="
                         f"{engine.config.scheduler.max_model_len}")
    block_size = engine.config.cache.block_size
    needed = [-(-(prompt + output) // block_size) for prompt, output, _ in shapes]
    blocks = take_shuffled_blocks(engine, sum(needed), rng)
    sequences, start = [], 0
    for index, ((prompt, output, scheduled), count) in enumerate(zip(shapes, needed)):
        request = _request(engine, f"{tag}-{index}", prompt, output, rng)
        request.num_computed_tokens = request.num_tokens - scheduled
        table = tuple(b.block_id for b in blocks[start : start + count])
        start += count
        sequences.append(ScheduledSequence(request, request.num_computed_tokens, scheduled, table, samples=True))
    return SyntheticStep(SchedulerOutput(tuple(sequences)), blocks)


def decode_step(engine, batch: int, context: int, rng: np.random.Generator) -> SyntheticStep:
    """`batch` sequences each decoding its token number `context` (context - 1 tokens of KV already in the cache)."""
    if context < 2:
        raise ValueError(f"a decode step needs context >= 2, got {context}")
    return _step(engine, [(context - 1, 1, 1)] * batch, rng, f"decode-b{batch}-c{context}")


def prefill_step(engine, num_new_tokens: int, num_cached_tokens: int, rng: np.random.Generator) -> SyntheticStep:
    """One sequence prefilling `num_new_tokens` prompt tokens on top of `num_cached_tokens` already in the cache."""
    return _step(
        engine, [(num_cached_tokens + num_new_tokens, 0, num_new_tokens)], rng, f"prefill-{num_cached_tokens}+{num_new_tokens}"
    )


def mixed_step(engine, batch: int, context: int, prefill_tokens: int, rng: np.random.Generator) -> SyntheticStep:
    """`batch` decodes at `context` (as decode_step) plus one prompt's first prefill chunk of `prefill_tokens` in
    the same step, as chunked prefill schedules them; batch 0 is a prefill-only step."""
    if batch < 0 or prefill_tokens < 0 or batch + prefill_tokens == 0:
        raise ValueError(f"a step needs decodes or prefill tokens, got batch={batch}, prefill_tokens={prefill_tokens}")
    if batch and context < 2:
        raise ValueError(f"a decode step needs context >= 2, got {context}")
    shapes = [(context - 1, 1, 1)] * batch + ([(prefill_tokens, 0, prefill_tokens)] if prefill_tokens else [])
    return _step(engine, shapes, rng, f"mixed-b{batch}-c{context}-p{prefill_tokens}")


def fill_kv_caches_random(engine, seed: int) -> int:
    """Fill every KV cache tensor the runner holds with random values; returns the bytes filled."""
    caches = getattr(engine.model_runner, "kv_caches", None)
    if not caches:
        raise RuntimeError("the model runner exposes no kv_caches to fill")
    filled = 0
    for index, cache in enumerate(caches):
        generator = torch.Generator(device=cache.device).manual_seed(seed + index)
        cache.uniform_(-1.0, 1.0, generator=generator)
        filled += cache.numel() * cache.element_size()
    synchronize(caches[0].device)
    return filled


# ---- running a step -------------------------------------------------------------------------------------------


def has_launch_collect(runner) -> bool:
    return callable(getattr(runner, "launch", None)) and callable(getattr(runner, "collect", None))


def run_step(runner, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor]) -> ModelRunnerOutput:
    """One step as the engine runs it: launch + collect where the runner is split, else execute."""
    if has_launch_collect(runner):
        return runner.collect(runner.launch(scheduled, encoder_outputs))
    return runner.execute(scheduled, encoder_outputs)


def run_step_graphed(runner, scheduled: SchedulerOutput, encoder_outputs) -> tuple[ModelRunnerOutput, bool | None]:
    """One step, and whether the runner replayed a CUDA graph for it (None when it does not say)."""
    if not has_launch_collect(runner):
        return runner.execute(scheduled, encoder_outputs), None
    handle = runner.launch(scheduled, encoder_outputs)
    return runner.collect(handle), getattr(handle, "graphed", None)


def check_sampled(output: ModelRunnerOutput, step: SyntheticStep, vocab_size: int) -> None:
    sampled = output.sampled_token_ids
    missing = [r for r in step.request_ids if r not in sampled]
    if missing:
        raise RuntimeError(f"the runner sampled nothing for {len(missing)} sequences, e.g. {missing[:3]}")
    bad = [t for t in sampled.values() if not 0 <= int(t) < vocab_size]
    if bad:
        raise RuntimeError(f"the runner sampled token ids outside the vocabulary: {bad[:5]}")


@dataclass(frozen=True)
class HostTime:
    samples_ms: tuple[float, ...]
    method: str
    exact: bool
    """True when the figure is host work alone; False when it is an upper bound that includes waiting."""


def host_time_per_step(
    runner, scheduled: SchedulerOutput, encoder_outputs: Mapping[str, torch.Tensor], device: torch.device, iters: int
) -> HostTime:
    """Host time of one step: the runner's `launch` plus `collect` entered after the device has finished, so
    collect's wait is zero and only its own work (copy-out, building the output) is counted. Without the split,
    the host time of `execute` with the device idle beforehand: an upper bound that includes waiting for it."""
    samples = []
    split = has_launch_collect(runner)
    for _ in range(iters):
        synchronize(device)
        begin = time.perf_counter()
        if split:
            handle = runner.launch(scheduled, encoder_outputs)
            launched = time.perf_counter()
            synchronize(device)
            collect_begin = time.perf_counter()
            runner.collect(handle)
            samples.append((launched - begin + time.perf_counter() - collect_begin) * 1e3)
        else:
            runner.execute(scheduled, encoder_outputs)
            samples.append((time.perf_counter() - begin) * 1e3)
    if split:
        return HostTime(tuple(samples), "launch + collect (entered after a device sync)", exact=True)
    return HostTime(tuple(samples), "execute with the device idle before (upper bound: includes the wait)", exact=False)


# ---- the vision tower -----------------------------------------------------------------------------------------


def encoder_batch(engine, grids: Sequence[tuple[int, int, int]], rng: np.random.Generator) -> EncoderBatch:
    """Random pixel patches of the right shape for each grid, already on the engine's device."""
    vision = engine.config.model_config.vision
    merge = vision.spatial_merge_size**2
    items = []
    for index, (t, h, w) in enumerate(grids):
        patches = t * h * w
        generator = torch.Generator(device=engine.device).manual_seed(int(rng.integers(1 << 31)))
        pixels = torch.randn(patches, vision.patch_dim, device=engine.device, generator=generator)
        items.append(
            MultiModalFeature(
                mm_hash=f"synthetic-image-{index}-{t}x{h}x{w}",
                modality="image",
                placeholder=PlaceholderRange(0, patches // merge),
                num_patches=patches,
                grid_thw=(t, h, w),
                pixel_values=pixels,
            )
        )
    return EncoderBatch(tuple(items))
