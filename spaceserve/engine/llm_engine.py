"""The engine: owns the schedulers, caches and runners, and advances every request by one step at a time.

`time` multiplexing (vLLM v1's behaviour, the baseline): each step first runs one encoder batch on the whole
device, then the language-model step. The encoder side (EncoderScheduler -> EncoderRunner -> encoder cache with a
ready flag per image) is separate from the LM side, so a concurrent encoder can replace the first half of step().
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.request import Request, RequestStatus
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.input_processor import InputProcessor, PromptType
from spaceserve.engine.output_processor import OutputProcessor
from spaceserve.kvcache.encoder_cache import EncoderCache
from spaceserve.kvcache.kv_manager import KVCacheManager
from spaceserve.layers.attention import get_attention_backend
from spaceserve.models.loader import build_model, resolve_dtype
from spaceserve.runtime.encoder_runner import EncoderRunner
from spaceserve.runtime.kv_cache import allocate_kv_caches, plan_num_blocks
from spaceserve.runtime.model_runner import ModelRunner
from spaceserve.sched.encoder_scheduler import EncoderScheduler
from spaceserve.sched.scheduler import Scheduler
from spaceserve.tokenizer import load_tokenizer


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
        text = config.model_config.text
        self.num_kv_blocks = plan_num_blocks(config.cache, config.scheduler, text, self.dtype, self.device)
        kv_caches = allocate_kv_caches(text, self.num_kv_blocks, config.cache.block_size, self.dtype, self.device)

        self.kv_manager = KVCacheManager(self.num_kv_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.encoder_cache = EncoderCache(config.encoder.cache_tokens)
        self.encoder_scheduler = EncoderScheduler(config.encoder, self.encoder_cache)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.encoder_cache, self.encoder_scheduler)
        backend = get_attention_backend(config.attention_backend, self.device)
        self.model_runner = ModelRunner(self.model, kv_caches, config.cache.block_size, backend, self.device)
        self.encoder_runner = EncoderRunner(self.model, self.device)
        self.encoder_outputs: dict[str, torch.Tensor] = {}

        self.input_processor = InputProcessor(config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(
        self, prompt: PromptType, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and queue one request. Bad input raises InvalidInputError and leaves the engine untouched."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.scheduler.requests:
            raise InvalidInputError(f"request id {request_id!r} is already in use")
        request = self.input_processor.process(request_id, prompt, params or SamplingParams())
        self.add_processed_request(request)
        return request

    def add_processed_request(self, request: Request) -> None:
        """Queue a request `input_processor` already built (AsyncLLM processes inputs off the engine thread).
        Raises InvalidInputError, engine untouched, if the id is in use or an image cannot fit the encoder cache."""
        if request.request_id in self.scheduler.requests:
            raise InvalidInputError(f"request id {request.request_id!r} is already in use")
        self.scheduler.add_request(request)
        self.output_processor.add_request(request)

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        aborted = self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        now = time.monotonic()
        for request in aborted:
            request.finished_time = now
        outputs = [self.output_processor.make_output(r) for r in aborted]
        for request in aborted:
            self._forget(request)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    # ---- one step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        encoded = self._run_encoder()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if not encoded and not self.encoder_scheduler.has_work and self.has_unfinished_requests():
                # time mode has no work in flight elsewhere: with no image queued, nothing can ever run
                raise RuntimeError(
                    f"engine stalled: {self.scheduler.num_waiting} waiting and {self.scheduler.num_running} running "
                    f"requests, {self.encoder_scheduler.num_queued_items} images queued, none can be scheduled"
                )
            return []
        runner_output = self.model_runner.execute(scheduled, self.encoder_outputs)
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

    def _run_encoder(self) -> bool:
        batch = self.encoder_scheduler.schedule()
        for mm_hash in self.encoder_scheduler.pop_evicted():
            self.encoder_outputs.pop(mm_hash, None)
        if batch is None:
            return False
        now = time.monotonic()
        for request_id in batch.request_ids:
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                request.encoder_scheduled_time = now
        embeddings = self.encoder_runner.execute(batch)
        for mm_hash, rows in embeddings.items():
            self.encoder_outputs[mm_hash] = rows
            self.encoder_cache.mark_ready(mm_hash)
        return True

    def _forget(self, request: Request) -> None:
        self.output_processor.remove_request(request.request_id)
        self.model_runner.release(request.request_id)

    # ---- introspection -----------------------------------------------------------------------------------

    def check_idle_integrity(self) -> None:
        """With no request in flight, every KV block is free and no encoder-cache entry is referenced."""
        if self.has_unfinished_requests():
            raise RuntimeError("requests are still in flight")
        self.kv_manager.check_integrity()
        self.encoder_cache.check_integrity()

