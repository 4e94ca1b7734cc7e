"""The engine: owns the schedulers, caches and runners, and advances every request by one step at a time.

`time` multiplexing (vLLM v1's behaviour, the baseline): each step first runs one encoder batch on the LM's stream,
then the language-model step. `streams` and `space` run the encoder concurrently in a worker that the step feeds
and collects from. Either way the encoder side has one owner, the EncoderStage (queue, cache accounting,
embeddings, worker, SM split, timing); the LM scheduler prefills a request only up to its first image that is not
ready. With async scheduling the LM step N+1 is launched before step N is collected.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.request import Request, RequestStatus
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from spaceserve.engine.encoder_stage import EncoderStage
from spaceserve.engine.input_processor import InputProcessor, PromptType
from spaceserve.engine.output_processor import OutputProcessor
from spaceserve.kvcache.kv_manager import KVCacheManager
from spaceserve.models.loader import build_model, resolve_dtype
from spaceserve.runtime.multiplex import resolve_layout
from spaceserve.runtime.model_runner import StepHandle
from spaceserve.runtime.runner_setup import build_model_runner
from spaceserve.multimodal.video.stage import DecodedVideo, VideoDecodeStage, build_decoder_pool
from spaceserve.sched.scheduler import Scheduler
from spaceserve.tokenizer import load_tokenizer

_IDLE_DECODE_WAIT_S = 0.01
_IDLE_ENCODER_WAIT_S = 0.002
DECODE_FAILURE_PREFIX = "video decoding failed: "
"""Starts the error of a request whose video failed to decode for a reason other than its input (a decoder or device
fault); a failure caused by the input (InvalidInputError) carries that error's own message."""


@dataclass
class LoopStats:
    """Where the engine thread's time goes (totals): `lm_host_s` is Python work around LM steps (scheduling,
    input preparation, launches, output handling), `lm_wait_s` the time spent waiting for the device."""

    lm_steps: int = 0
    lm_host_s: float = 0.0
    lm_wait_s: float = 0.0
    encoder_inline_s: float = 0.0
    """time: host time launching the encoder batches run inside steps (not in lm_host_s; their device time is
    waited for in the LM step that follows)."""
    lm_gpu_s: float = 0.0
    """GPU time of LM steps (CUDA events around each step's work on its stream; 0 off CUDA)."""
    lm_gpu_gap_s: float = 0.0
    """GPU time with no LM step queued between consecutive LM steps while requests ran (host overhead the GPU
    waited for); an encoder batch run inline between them (time mode) is not counted as a gap."""


@dataclass(frozen=True)
class _LaunchedStep:
    scheduled: SchedulerOutput
    handle: StepHandle
    gap_start: torch.cuda.Event | None
    """The previous LM step's end event, when the GPU had one just before this step (for lm_gpu_gap_s)."""
    inline_encoder_span: tuple[torch.cuda.Event, torch.cuda.Event] | None


@dataclass
class _PendingDecode:
    request: Request
    futures: list[tuple[int, Future[DecodedVideo]]]  # (index in request.mm_features, its decode job)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.model_config)
        self.tokenizer = load_tokenizer(config.model_dir, config.model_config)
        self.model = build_model(
            config.model_config,
            directory=None if config.model_dir is None else Path(config.model_dir),
            load_format=config.load_format,
            dtype=self.dtype,
            device=self.device,
            seed=config.seed,
        )
        # where the encoder and the LM run (streams, SM partitions); raises ConfigError if the mode cannot run here
        self.layout = resolve_layout(config, self.device)
        # profiles memory on CUDA, sizes and allocates the KV cache, captures decode CUDA graphs (per LM stream)
        self.model_runner, self.memory_plan = build_model_runner(config, self.model, self.dtype, self.device, self.layout)
        self.num_kv_blocks = self.memory_plan.num_kv_blocks

        self.kv_manager = KVCacheManager(self.num_kv_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.encoder_stage = EncoderStage(config.encoder, self.model, self.device, self.layout)
        self.encoder_cache = self.encoder_stage.cache
        self.encoder_scheduler = self.encoder_stage.scheduler
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.encoder_cache, self.encoder_scheduler)
        self.encoder_stage.bind_requests(self.scheduler.requests)
        self.loop_stats = LoopStats()
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: _LaunchedStep | None = None  # launched, not collected (overlapped scheduling)
        self._last_lm_end: torch.cuda.Event | None = None

        self.input_processor = InputProcessor(config, self.tokenizer)
        # decoder sessions kept for the engine's lifetime; each video is decoded GOP-parallel across them
        self.video_decoders = build_decoder_pool(config.video, self.device)
        self.video_stage = VideoDecodeStage(
            config.image_config,
            self.device,
            num_workers=config.video.decode_workers,
            cache_bytes=config.video.cache_bytes,
            backend=config.video.decode_backend,
            decoders=self.video_decoders,
        )
        self._decoding: dict[str, _PendingDecode] = {}  # requests whose videos the decode stage is still making
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(
        self, prompt: PromptType, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and queue one request. Bad input raises InvalidInputError and leaves the engine untouched."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self._check_id_free(request_id)
        request = self.input_processor.process(request_id, prompt, params or SamplingParams())
        self.add_processed_request(request)
        return request

    def add_processed_request(self, request: Request) -> None:
        """Queue a request `input_processor` already built (AsyncLLM processes inputs off the engine thread).
        Raises InvalidInputError, engine untouched, if the id is in use or an image cannot fit the encoder cache.
        A request with videos still to decode waits outside the scheduler until the decode stage has them."""
        self._check_id_free(request.request_id)
        if request.pending_mm_work:
            for feature in request.mm_features:
                self.encoder_cache.check_fits(feature.num_tokens)
            futures = [(index, self.video_stage.submit(work)) for index, work in request.pending_mm_work]
            self._decoding[request.request_id] = _PendingDecode(request, futures)
            return
        self.scheduler.add_request(request)
        self.output_processor.add_request(request)

    def _check_id_free(self, request_id: str) -> None:
        if request_id in self.scheduler.requests or request_id in self._decoding:
            raise InvalidInputError(f"request id {request_id!r} is already in use")

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        now = time.monotonic()
        decode_aborted = []
        for request_id in request_ids:
            pending = self._decoding.pop(request_id, None)
            if pending is not None:
                for _, future in pending.futures:
                    future.cancel()  # a job already running finishes into the decode cache, its result unused
                pending.request.status = RequestStatus.FINISHED_ABORTED
                pending.request.finished_time = now
                decode_aborted.append(pending.request)
        aborted = self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for request in aborted:
            request.finished_time = now
        outputs = [self.output_processor.make_output(r) for r in decode_aborted + aborted]
        for request in aborted:
            self._forget(request)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests or bool(self._decoding)

    @property
    def num_decoding(self) -> int:
        """Requests waiting for the decode stage (not yet in the scheduler)."""
        return len(self._decoding)

    # ---- one step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Advance every request by one LM step. With async scheduling the step is launched before the previous
        one is collected, so the host schedules and prepares step N+1 while the device runs step N; the outputs
        returned are those of the step collected here."""
        step_start = time.monotonic()
        failed = self._admit_decoded()
        stage = self.encoder_stage
        if stage.concurrent:
            encoded = stage.collect()
        else:
            encoder_start = time.monotonic()
            encoded = stage.run_inline(self.model_runner.stream)
            encoder_s = time.monotonic() - encoder_start
            self.loop_stats.encoder_inline_s += encoder_s
            step_start += encoder_s  # kept out of lm_host_s
        scheduled = self.scheduler.schedule()
        stage.dispatch(lm_idle=scheduled.is_empty and self._in_flight is None, num_running=self.scheduler.num_running)
        launched = self._launch(scheduled) if not scheduled.is_empty else None
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
        self._account_gpu_time(to_collect)
        outputs = self._process_step_output(to_collect.scheduled, runner_output)
        stats = self.loop_stats
        stats.lm_steps += 1
        stats.lm_wait_s += collected - launch_done
        stats.lm_host_s += (launch_done - step_start) + (time.monotonic() - collected)
        return failed + outputs

    def _launch(self, scheduled: SchedulerOutput) -> _LaunchedStep:
        stage = self.encoder_stage
        if (stream := stage.lm_stream()) is not None:
            self.model_runner.use_stream(stream)
        handle = self.model_runner.launch(scheduled, stage.embeddings)
        launched = _LaunchedStep(scheduled, handle, self._last_lm_end, stage.take_inline_span())
        if handle.gpu_span is not None:
            self._last_lm_end = handle.gpu_span[1]
        return launched

    def _account_gpu_time(self, step: _LaunchedStep) -> None:
        """Add a collected step's GPU time and the idle gap before it (its events have completed)."""
        span = step.handle.gpu_span
        if span is None:
            return
        stats = self.loop_stats
        stats.lm_gpu_s += span[0].elapsed_time(span[1]) / 1e3
        if step.gap_start is not None:
            gap = step.gap_start.elapsed_time(span[0]) / 1e3
            if step.inline_encoder_span is not None:
                gap -= step.inline_encoder_span[0].elapsed_time(step.inline_encoder_span[1]) / 1e3
            stats.lm_gpu_gap_s += max(gap, 0.0)

    def has_step_in_flight(self) -> bool:
        return self._in_flight is not None

    def _process_step_output(self, scheduled: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        updated = self.scheduler.update_from_output(scheduled, runner_output)
        now = time.monotonic()
        for request in updated:
            if request.first_token_time is None:
                request.first_token_time = now
        stopped = self.output_processor.update_text(updated)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for request in updated:
            if request.is_finished:
                request.finished_time = now
        outputs = [self.output_processor.make_output(r) for r in updated]
        for request in updated:
            if request.is_finished:
                self._forget(request)
        return outputs

    def _wait_for_work(self, encoded: bool) -> None:
        """Nothing for the LM this step: wait briefly for the work in flight elsewhere, or report a stall."""
        self.encoder_stage.resolve_end_times()
        if self.encoder_stage.busy:
            self.encoder_stage.collect(timeout=_IDLE_ENCODER_WAIT_S)  # taken in; the next step schedules it
            return
        if self._decoding and not encoded and not self.encoder_scheduler.has_work:
            # nothing else to run: wait a moment for a decode rather than spin (new work is picked up next step)
            wait([f for p in self._decoding.values() for _, f in p.futures], _IDLE_DECODE_WAIT_S, FIRST_COMPLETED)
            return
        if not encoded and not self.encoder_scheduler.has_work and self.has_unfinished_requests():
            # no encoder work is queued or in flight: with nothing schedulable, nothing can ever run
            raise RuntimeError(
                f"engine stalled: {self.scheduler.num_waiting} waiting and {self.scheduler.num_running} running "
                f"requests, {self.encoder_scheduler.num_queued_items} images queued, none can be scheduled"
            )

    def _admit_decoded(self) -> list[RequestOutput]:
        """Queue the requests whose videos are all ready; finish those whose decode failed with an error output."""
        failed = []
        for request_id, pending in list(self._decoding.items()):
            if not all(future.done() for _, future in pending.futures):
                continue
            del self._decoding[request_id]
            request = pending.request
            try:
                decoded = [(index, future.result()) for index, future in pending.futures]
            except Exception as exc:  # noqa: BLE001 - any decode failure ends this request only
                request.status = RequestStatus.FINISHED_ERROR
                request.finished_time = time.monotonic()
                message = str(exc) if isinstance(exc, InvalidInputError) else f"{DECODE_FAILURE_PREFIX}{exc!r}"
                failed.append(self.output_processor.make_output(request, error=message))
                continue
            for index, video in decoded:
                feature = request.mm_features[index]
                pixel_values = video.processed.pixel_values
                request.set_mm_feature(index, replace(feature, mm_hash=video.mm_hash, pixel_values=pixel_values))
            request.video_decode_start_time = min(video.start_time for _, video in decoded)
            request.video_decode_end_time = max(video.end_time for _, video in decoded)
            request.pending_mm_work = []
            try:
                self.scheduler.add_request(request)
            except InvalidInputError as exc:
                request.status = RequestStatus.FINISHED_ERROR
                request.finished_time = time.monotonic()
                failed.append(self.output_processor.make_output(request, error=str(exc)))
                continue
            self.output_processor.add_request(request)
        return failed

    def _forget(self, request: Request) -> None:
        self.output_processor.remove_request(request.request_id)
        self.model_runner.release(request.request_id)

    def shutdown(self) -> None:
        """Stop the encoder worker and the video decode stage, and close the decoder sessions. Idempotent."""
        self.encoder_stage.shutdown()
        self.video_stage.shutdown()
        if self.video_decoders is not None:
            self.video_decoders.close()

    # ---- introspection -----------------------------------------------------------------------------------

    def loop_counters(self) -> dict[str, float]:
        """Totals of where both loops spend their time (for benchmarks: the GIL and host work, measured)."""
        counters: dict[str, float] = asdict(self.loop_stats)
        counters.update(self.encoder_stage.counters())
        return counters

    def check_idle_integrity(self) -> None:
        """With no request in flight, every KV block is free and no encoder-cache entry is referenced."""
        if self.has_unfinished_requests():
            raise RuntimeError("requests are still in flight")
        self.kv_manager.check_integrity()
        self.encoder_stage.check_integrity()

