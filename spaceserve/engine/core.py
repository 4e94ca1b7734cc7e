"""The engine core: owns the schedulers, caches, runners and the encoder stage, and advances every request by one
LM step at a time. It knows token ids, not text: the front (LLMEngine, AsyncLLM) tokenizes, detokenizes and checks
stop strings, and talks to the core through a client (core_client.py), in this process or another one.

`time` multiplexing (vLLM v1's behaviour, the baseline): each step first runs one encoder batch on the LM's stream,
then the language-model step. `streams` and `space` run the encoder concurrently in a worker that the step feeds
and collects from. Either way the encoder side has one owner, the EncoderStage (queue, cache accounting,
embeddings, worker, SM split, timing); the LM scheduler prefills a request only up to its first image that is not
ready. With async scheduling the LM step N+1 is launched before step N is collected.

With `encoder_process` (`mps` always) the worker is a process of its own, started here before the KV cache is sized;
if it dies, the requests waiting for an image fail with an error and the rest are served (a replica that can no
longer encode images is unhealthy, not dead: `check_health` says so, and /health with it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.encoder_messages import ENCODER_UNAVAILABLE_PREFIX
from spaceserve.core.engine_messages import EngineCoreOutput, EngineCoreStats, FinishReason
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.request import Request, RequestStatus
from spaceserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from spaceserve.engine.core_outputs import STATUS_OF_REASON, core_output
from spaceserve.engine.encoder_stage import EncoderStage
from spaceserve.engine.prefill_lane import PrefillLane, build_prefill_lane, decode_lane_prefill_budget
from spaceserve.engine.step_timing import LaunchedStep, LoopStats, PendingGpuTimes
from spaceserve.engine.sm_allocation import SMAllocation
from spaceserve.engine.video_jobs import VideoJobs
from spaceserve.kvcache.kv_manager import KVCacheManager
from spaceserve.models.loader import resolve_dtype
from spaceserve.multimodal.video.stage import VideoDecodeStage, build_decoder_pool
from spaceserve.profile.sm_curves import engine_curves
from spaceserve.runtime.executor import build_executor
from spaceserve.runtime.mps import prepare_engine_process
from spaceserve.sched.allocation_types import Allocation
from spaceserve.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)
_IDLE_DECODE_WAIT_S = 0.01
_IDLE_ENCODER_WAIT_S = 0.002


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        prepare_engine_process(config)  # refuses a mode that cannot run here; the LM's MPS settings before CUDA starts
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.model_config)
        # the model, where the encoder and the LM run, the memory plan, KV cache and graphs: in this process or across
        # tensor-parallel ranks (runtime/executor.py); model_runner and encoder_runner keep their one-rank interfaces;
        # with --encoder-process the executor starts the encoder process before it sizes the KV cache
        self.executor = build_executor(config, self.dtype, self.device)
        self.model, self.layout = self.executor.model, self.executor.layout
        self.model_runner, self.memory_plan = self.executor.model_runner, self.executor.memory_plan
        self.num_kv_blocks = self.memory_plan.num_kv_blocks
        self.kv_manager = KVCacheManager(self.num_kv_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.encoder_stage = EncoderStage(
            config.encoder, self.device, self.layout, self.executor.encoder_runner, worker=self.executor.encoder_worker
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.encoder_stage.cache,
                                   self.encoder_stage.scheduler)
        self.encoder_stage.bind_requests(self.scheduler.requests)
        # decoder sessions opened and warmed now, kept for the engine's lifetime; each video is decoded GOP-parallel
        # across the free ones and handed to the encoder chunk by chunk (video_jobs.py)
        self.video_decoders = build_decoder_pool(config.video, self.device)
        self.video_stage = VideoDecodeStage(
            config.image_config,
            self.device,
            num_workers=config.video.decode_workers,
            cache_bytes=config.video.cache_bytes,
            backend=config.video.decode_backend,
            decoders=self.video_decoders,
        )
        self.videos = VideoJobs(self.video_stage, self.encoder_stage.scheduler, self.scheduler.requests)
        # space: the SM allocator picks each encoder batch's split and each LM step's prefill chunk from measured
        # resource-utility curves (--sm-curves, or a short profile of this engine's splits now)
        self.allocation: SMAllocation | None = None
        if self.layout.partitions and self.layout.encoder_process and config.allocation.sm_curves is None:
            # the start-up profile times the encoder in this process, which has no tower: curves come from a file
            logger.info("space with the encoder in a process of its own and no --sm-curves file: the fixed split "
                        "policy picks each batch's split")
        elif self.layout.partitions:
            self.attach_allocation(SMAllocation(config, engine_curves(self), self.layout.encoder_sms_counts))
        self.prefill_lane: PrefillLane | None = None
        if config.allocation.enable_prefill_split:
            self.attach_prefill_lane(build_prefill_lane(self.layout, self.allocation, self.model_runner))
        self.loop_stats = LoopStats()
        self._pending_gpu_times = PendingGpuTimes()
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: LaunchedStep | None = None  # launched, not collected (overlapped scheduling)
        self._last_lm_end: torch.cuda.Event | None = None

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request input processing built. Raises InvalidInputError, engine untouched, if its id is in use or
        an image or video cannot fit the encoder cache. A request with videos joins the scheduler at once; their
        chunks are encoded as they are decoded."""
        if request.request_id in self.scheduler.requests:
            raise InvalidInputError(f"request id {request.request_id!r} is already in use")
        for feature in request.mm_features:
            self.encoder_stage.cache.check_fits(feature.num_tokens)
        for _, work in request.pending_mm_work:  # a video's chunks are cached together until the LM consumes them
            self.encoder_stage.cache.check_fits(work.plan.num_tokens, "video")
        self.scheduler.add_request(request)
        self.videos.start(request)

    def abort_requests(
        self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT
    ) -> list[EngineCoreOutput]:
        """Finish requests early (a client that left: ABORT; a stop string the front saw: STOP); unknown or finished
        ids are ignored. Returns an output for each request that was still in flight."""
        now = time.monotonic()
        aborted = self.scheduler.finish_requests(request_ids, STATUS_OF_REASON[reason])
        outputs = []
        for request in aborted:
            self._forget(request)
            request.finished_time = now
            outputs.append(core_output(request, []))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    @property
    def num_decoding(self) -> int:
        """Requests whose videos are still being decoded (they are in the scheduler already)."""
        return self.videos.num_requests

    # ---- one step ----------------------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """Advance every request by one LM step. With async scheduling the step is launched before the previous
        one is collected, so the host schedules and prepares step N+1 while the device runs step N; the outputs
        returned are those of the step collected here."""
        step_start = time.monotonic()
        failed = self._take_video_events()
        stage = self.encoder_stage
        if stage.concurrent:
            encoded = stage.collect()
            failed += self._fail_unencodable()
        else:
            encoder_start = time.monotonic()
            encoded = stage.run_inline(self.model_runner.stream)
            encoder_s = time.monotonic() - encoder_start
            self.loop_stats.encoder_inline_s += encoder_s
            self.loop_stats.encoder_inline_batches += int(encoded)
            step_start += encoder_s  # kept out of lm_host_s
        lane = self.prefill_lane
        if lane is not None:
            failed += self._finish_prefill_lane()  # the lane's outputs go out with the step's
        decision = None
        if self.allocation is not None:
            decision = self.allocation.decide(self.scheduler, stage.scheduler)
        if decision is not None and decision.lm_sms == 0:
            scheduled = SchedulerOutput(())  # the LM waits for a whole-device encoder batch
        else:
            if lane is not None:
                lane.start(decision, self.scheduler, stage, self.allocation, self.model_runner.stream)
            scheduled = self.scheduler.schedule(decode_lane_prefill_budget(decision))
            if lane is not None:
                lane.forget_blocks(scheduled.preempted_request_ids)
        lm_idle = scheduled.is_empty and self._in_flight is None
        stage.dispatch(lm_idle=lm_idle, num_running=self.scheduler.num_running, allocation=decision)
        launched = self._launch(scheduled, decision) if not scheduled.is_empty else None
        to_collect = launched
        if self.async_scheduling:
            to_collect, self._in_flight = self._in_flight, launched
        if to_collect is None:
            if launched is None:
                self._last_lm_end = None
                self._wait_for_work(encoded)
            return failed
        launch_done = time.monotonic()
        runner_output = self.model_runner.collect(to_collect.handle)
        collected = time.monotonic()
        stage.resolve_end_times()
        timed = self._pending_gpu_times.collected(self.loop_stats, to_collect)
        if self.allocation is not None:
            for step, gpu_ms in timed:
                self.allocation.lm_step_timed(step.allocation, gpu_ms)
            decoded = any(seq.num_scheduled_tokens == 1 for seq in to_collect.scheduled.sequences)
            self.allocation.lm_step_collected(to_collect.allocation, decoded)
        outputs = self._process_step_output(to_collect.scheduled, runner_output)
        stats = self.loop_stats
        stats.lm_steps += 1
        stats.lm_rows += len(to_collect.scheduled.sequences)
        stats.lm_wait_s += collected - launch_done
        stats.lm_host_s += (launch_done - step_start) + (time.monotonic() - collected)
        return failed + outputs

    def _launch(self, scheduled: SchedulerOutput, decision: Allocation | None = None) -> LaunchedStep:
        stage = self.encoder_stage
        if (stream := stage.lm_stream()) is not None:
            self.model_runner.use_stream(stream)
        if self.prefill_lane is not None:
            self.prefill_lane.before_lm_step(self.model_runner.stream)
        handle = self.model_runner.launch(scheduled, stage.embeddings)
        launched = LaunchedStep(scheduled, handle, self._last_lm_end, stage.take_inline_span(), decision)
        if handle.gpu_span is not None:
            self._last_lm_end = handle.gpu_span[1]
        return launched

    def attach_allocation(self, allocation: SMAllocation | None) -> None:
        """Hand the SM allocation (space) to the step loop and the encoder stage; None: the fixed split policy."""
        self.allocation = allocation
        self.encoder_stage.attach_allocation(allocation)

    def check_ranks(self) -> None:
        """Raise the error that broke the executor (a tensor-parallel rank that died), if any: fatal for the core."""
        self.executor.check_health()

    def has_step_in_flight(self) -> bool:
        return self._in_flight is not None or (self.prefill_lane is not None and self.prefill_lane.busy)

    def attach_prefill_lane(self, lane: PrefillLane | None) -> None:
        """PREFILL_SPLIT's prefill lane (prefill_lane.py), which the SM allocator may then choose; None: none."""
        self.prefill_lane = lane
        if lane is not None:
            self.allocation.enable_prefill_split()

    def _finish_prefill_lane(self) -> list[EngineCoreOutput]:
        finished = self.prefill_lane.finish(self.scheduler, self.encoder_stage, self.allocation)
        return [] if finished is None else self._process_step_output(*finished)

    def _process_step_output(
        self, scheduled: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        updated = self.scheduler.update_from_output(scheduled, runner_output)
        now = time.monotonic()
        outputs = []
        for request in updated:
            first = request.first_token_time is None
            if first:
                request.first_token_time = now
            if request.is_finished:
                request.finished_time = now
                self._forget(request)
            outputs.append(core_output(request, request.output_token_ids[-1:], with_timestamps=first))
        return outputs

    def _wait_for_work(self, encoded: bool) -> None:
        """Nothing for the LM this step: wait briefly for the work in flight elsewhere, or report a stall."""
        stage = self.encoder_stage
        stage.resolve_end_times()
        if self.prefill_lane is not None and self.prefill_lane.busy:
            self.prefill_lane.wait(_IDLE_ENCODER_WAIT_S)  # the next step collects it
            return
        if stage.busy:
            stage.collect(timeout=_IDLE_ENCODER_WAIT_S)  # taken in; the next step schedules it
            return
        if self.videos.busy and not encoded and not stage.has_work:
            self.videos.wait(_IDLE_DECODE_WAIT_S)  # nothing else to run: wait a moment for a decoded chunk
            return
        if not encoded and not stage.has_work and self.has_unfinished_requests():
            # no encoder work is queued or in flight: with nothing schedulable, nothing can ever run
            raise RuntimeError(
                f"engine stalled: {self.scheduler.num_waiting} waiting and {self.scheduler.num_running} running "
                f"requests, {stage.scheduler.num_queued_items} images queued, none can be scheduled"
            )

    def _fail_unencodable(self) -> list[EngineCoreOutput]:
        """Finish with an error the requests waiting for images the encoder can no longer encode (its process died);
        their KV blocks and encoder-cache references are freed like an abort's."""
        request_ids, reason = self.encoder_stage.take_failed_requests()
        if not request_ids:
            return []
        failed = self.scheduler.finish_requests(sorted(request_ids), RequestStatus.FINISHED_ERROR)
        now = time.monotonic()
        outputs = []
        for request in failed:
            self._forget(request)
            request.finished_time = now
            error = f"{ENCODER_UNAVAILABLE_PREFIX}{reason}; this request's images cannot be encoded"
            outputs.append(core_output(request, [], error=error))
        return outputs

    def _take_video_events(self) -> list[EngineCoreOutput]:
        """Hand decoded video chunks to the encoder (video_jobs.py); end the requests whose video failed."""
        outputs = []
        for request, error in self.videos.take_events():
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_ERROR)
            self._forget(request)
            request.finished_time = time.monotonic()
            outputs.append(core_output(request, [], error=error))
        return outputs

    def _forget(self, request: Request) -> None:
        """A finished request: stop decoding its videos and drop its runner state."""
        self.videos.cancel(request.request_id)
        self.model_runner.release(request.request_id)
        if self.prefill_lane is not None:
            self.prefill_lane.fence_finished((request.request_id,))  # its freed blocks: the lane may still write them
            self.prefill_lane.release(request.request_id)

    def shutdown(self) -> None:
        """Stop the encoder worker and the video decode stage, and close the decoder sessions. Idempotent."""
        self.encoder_stage.shutdown()
        self.video_stage.shutdown()
        if self.video_decoders is not None:
            self.video_decoders.close()
        self.executor.shutdown()

    # ---- introspection (also reachable from another process as utility calls) ----------------------------

    def describe(self) -> dict[str, Any]:
        """What the front needs to know about this core once it has started."""
        return {
            "execution": self.layout.describe(),
            "num_kv_blocks": self.num_kv_blocks,
            "memory_plan": asdict(self.memory_plan),
            "memory_plan_summary": self.memory_plan.summary(),
            "device": str(self.device),
            "dtype": str(self.dtype),
            "parallel": self.executor.describe(),
            "prefill_split": self.prefill_lane is not None,
            **({"encoder_process": self.encoder_stage.worker.info} if self.layout.encoder_process else {}),
        }

    def check_health(self) -> None:
        """Raises if the engine cannot serve every kind of request: a rank died (fatal), or its encoder process did
        (requests without images are still served)."""
        self.check_ranks()
        self.encoder_stage.check_health()

    def stats(self) -> EngineCoreStats:
        kv = self.kv_manager
        return EngineCoreStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,  # requests decoding a video are in the scheduler already
            num_kv_blocks=kv.num_blocks,
            num_free_kv_blocks=kv.num_free_blocks,
            kv_cache_usage=kv.usage,
            encoder_cache_usage=self.encoder_stage.cache.usage,
            num_encoder_queued_items=self.encoder_stage.scheduler.num_queued_items,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_stats.queries,
            prefix_cache_hits=kv.prefix_cache_stats.hits,
            allocator=[sample for owner in (self.allocation, self.prefill_lane) if owner is not None
                       for sample in owner.prometheus_samples()],
        )

    def loop_counters(self) -> dict[str, float]:
        """Totals of where both loops spend their time (for benchmarks: the GIL and host work, measured)."""
        counters: dict[str, float] = asdict(self.loop_stats)
        counters.update(self.encoder_stage.counters())
        if self.prefill_lane is not None:
            counters.update(self.prefill_lane.counters())
        if self.allocation is not None:
            counters.update(self.allocation.as_dict())
        return counters

    def engine_counters(self) -> dict[str, float]:
        """What a benchmark row records about the engine: preemptions, prefix-cache tokens, loop counters."""
        prefix = self.kv_manager.prefix_cache_stats
        return {
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_query_tokens": prefix.queries,
            "prefix_cache_hit_tokens": prefix.hits,
            **self.loop_counters(),
        }

    def video_stats(self) -> dict[str, Any]:
        """The decoder sessions' warm-up time at start and how the latest video was decoded (for benchmarks)."""
        stage = self.video_stage
        return {"warm_up_s": dict(stage.warm_up_s), "last_decode": stage.last_decode, "cache_hits": stage.cache.hits}

    def kv_block_counts(self) -> tuple[int, int]:
        """(free, total) KV blocks."""
        return self.kv_manager.num_free_blocks, self.kv_manager.num_blocks

    def check_idle_integrity(self) -> None:
        """With no request in flight, every KV block is free and no encoder-cache entry is referenced."""
        if self.has_unfinished_requests():
            raise RuntimeError("requests are still in flight")
        self.kv_manager.check_integrity()
        self.encoder_stage.check_integrity()


UTILITY_METHODS = frozenset(
    {
        "describe",
        "loop_counters",
        "engine_counters",
        "kv_block_counts",
        "video_stats",
        "check_idle_integrity",
        "check_health",
        "has_unfinished_requests",
    }
)
"""The EngineCore methods a front may call by name (`call_utility`), in this process or across processes."""
