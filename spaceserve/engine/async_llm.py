"""AsyncLLM: the asynchronous front of the engine, behind the server and the benchmark (vLLM's AsyncLLM).

Processes and threads:

- The engine core (schedulers, runners, encoder) runs in a process of its own by default (core_client.py), so the
  LM loop never shares a GIL with HTTP, tokenization, media, detokenization or the benchmark's client; with
  multiprocess=False it runs in a thread of this process instead (tests, debugging).
- Input processing workers (a small thread pool) run `InputProcessor.process`: tokenizing, image decoding and
  preprocessing. That work is pure (config + tokenizer in, Request out), so it stays off the event loop.
- One output thread reads what the core sends: it detokenizes and checks stop strings (OutputProcessor), finishes
  stop-string requests in the core, and hands each request's outputs to its RequestStream on the caller's event
  loop (`loop.call_soon_threadsafe`), so callers on any loop (or several) can use one AsyncLLM.
- A request is registered (its stream, its detokenizer state) before it is sent, under one lock with the output
  thread, so an output can never arrive for a request nobody waits for, and a caller cancelled while its input is
  being processed leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.engine_messages import EngineCoreDead, FinishReason, StepOutputs
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.core_client import CoreClient, EngineDeadError, make_core_client
from spaceserve.engine.input_processor import InputProcessor, PromptType
from spaceserve.engine.output_processor import OutputProcessor
from spaceserve.engine.stats import EngineStats, StatLogger
from spaceserve.tokenizer import load_tokenizer_for

__all__ = ["AsyncLLM", "EngineDeadError", "RequestStream"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_OUTPUT_POLL_S = 0.5


class RequestStream:
    """One request's outputs, in the caller's event loop. Iterate it for cumulative RequestOutputs (the last has
    `finished` set); close it to abort the request if it has not finished."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, owner: AsyncLLM) -> None:
        self.request_id = request_id
        self._loop = loop
        self._owner = owner
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Output thread side. Raises RuntimeError if the caller's loop is closed."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.close()
            raise
        while not self._queue.empty() and not isinstance(item, BaseException):
            item = self._queue.get_nowait()  # outputs are cumulative: a slow reader only needs the newest
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it already finished; idempotent, callable from anywhere."""
        if not self.finished:
            self.finished = True
            self._owner._abort_stream(self)

    async def aclose(self) -> None:
        self.close()


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig,
        *,
        stat_loggers: list[StatLogger] | None = None,
        num_input_workers: int | None = None,
        multiprocess: bool | None = None,
    ) -> None:
        self.config = config
        self.stat_loggers = list(stat_loggers or [])
        self.tokenizer = load_tokenizer_for(config)
        # Stateless (config + tokenizer); called from the input workers
        self.input_processor = InputProcessor(config, self.tokenizer)
        self._client: CoreClient = make_core_client(config, multiprocess)  # raises the core's start-up error
        self.info = self._client.info
        self.execution = self.info["execution"]  # the multiplex mode that runs and its SM split
        self._outputs = OutputProcessor(self.tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # the output processor and the streams: event loops vs the output thread
        num_blocks = self.info["num_kv_blocks"]
        self._stats = EngineStats(num_kv_blocks=num_blocks, num_free_kv_blocks=num_blocks)
        self._dead_error: EngineDeadError | None = None
        self._shutting_down = False
        self._ids = itertools.count()
        self._input_pool = ThreadPoolExecutor(
            max_workers=num_input_workers or min(4, os.cpu_count() or 1), thread_name_prefix="spaceserve-input"
        )
        self._output_thread = threading.Thread(target=self._read_outputs, name="spaceserve-outputs", daemon=True)
        self._output_thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        kwargs.setdefault("multiprocess", engine_args.multiprocess)
        return cls(engine_args.create_engine_config(), **kwargs)

    # ---- public API (any thread / event loop) ---------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._dead_error is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead_error

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "degraded" | "dead", ...}: degraded while some data-parallel replicas failed and
        others still serve (the replicas' states are listed)."""
        if self._dead_error is not None:
            return {"status": "dead", "error": str(self._dead_error)}
        return self._client.health()

    def router_stats(self) -> dict[str, Any] | None:
        """Data parallel: the router's decisions by reason and each replica's load; None with one engine core."""
        router_stats = getattr(self._client, "router_stats", None)
        return router_stats() if router_stats is not None else None

    @property
    def stats(self) -> EngineStats:
        """The snapshot the core sent with its latest outputs; reading it never touches engine state."""
        return self._stats

    async def add_request(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        check: Callable[[Any], None] | None = None,
    ) -> RequestStream:
        """Process the input on a worker, queue the request, and return its output stream.

        Bad input raises InvalidInputError and nothing is queued; so does `check(request)` (the caller's own rules
        on the processed request: the server's context check) when it raises. Close the stream (or let it finish)
        when done: closing it early aborts the request."""
        self._raise_if_dead()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        params = sampling_params or SamplingParams()
        arrival_time = time.monotonic()
        loop = asyncio.get_running_loop()
        self._check_id_free(request_id)
        request = await loop.run_in_executor(self._input_pool, self.input_processor.process, request_id, prompt, params)
        if check is not None:
            check(request)
        request.arrival_time = arrival_time  # processing time counts towards the queue time and the latency
        stream = RequestStream(request_id, loop, self)
        with self._lock:
            self._raise_if_dead()
            self._check_id_free(request_id)
            self._outputs.add_request(request)
            self._streams[request_id] = stream
            try:
                self._client.add_request(request)
            except BaseException:
                self._outputs.abort([request_id])
                del self._streams[request_id]
                raise
        return stream

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue one request and yield its cumulative outputs; the last one has `finished` set.

        Bad input raises InvalidInputError before anything is yielded (nothing is queued). If the consumer stops
        early (cancellation, aclose, a client that went away) the request is aborted and its KV blocks and
        encoder-cache references are freed. If the engine dies, EngineDeadError is raised to every stream.
        """
        stream = await self.add_request(prompt, sampling_params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def abort(self, request_id: str | list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored). A stream of an aborted request ends with an output
        whose finish_reason is "abort"; the core frees its resources before it takes any later message."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            outputs = self._outputs.abort(ids)
            self._client.abort_requests(ids)
            self._deliver(outputs)

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Call an EngineCore utility (core.UTILITY_METHODS: loop_counters, check_idle_integrity, ...) between
        steps, wherever the core runs."""
        self._raise_if_dead()
        return await asyncio.wrap_future(self._client.call_utility_async(method, *args))

    async def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises if the engine cannot serve every request: EngineDeadError once the core has died, RuntimeError
        while the core reports a part of it down (its encoder process died: requests with images fail, others are
        served) or does not answer within `timeout_s`."""
        self._raise_if_dead()
        try:
            await asyncio.wait_for(self.call_utility("check_health"), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the engine core did not answer a health check within {timeout_s:g} s") from None

    async def run_in_engine(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(engine_core)` between steps and return its result: an in-process core only (multiprocess=False),
        since a function cannot cross into another process."""
        return await asyncio.wrap_future(self._call_in_core(fn))

    def call_in_engine(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """Blocking form of run_in_engine, for callers without an event loop."""
        return self._call_in_core(fn).result(timeout)

    def _call_in_core(self, fn: Callable[[Any], T]) -> Future:
        self._raise_if_dead()
        if not hasattr(self._client, "core"):
            raise RuntimeError("run_in_engine needs an in-process engine core (multiprocess=False); use call_utility")
        return self._client.call_utility_async(fn)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine core; streams still open end with EngineDeadError. Safe to call twice."""
        self._shutting_down = True
        self._client.shutdown()
        self._output_thread.join(timeout)
        self._client.close()
        self._input_pool.shutdown(wait=False, cancel_futures=True)
        self._die(EngineDeadError("the engine was shut down"))
        self._release_device_memory()

    def _release_device_memory(self) -> None:
        """Drop an in-process core so its weights, KV cache and graphs go back to the device: a process that starts
        another engine next (a benchmark sweeping modes) must find the memory free when it profiles."""
        if getattr(self._client, "core", None) is not None:
            self._client.core = None
            gc.collect()  # the core's parts reference each other (runner, encoder worker)
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    # ---- helpers --------------------------------------------------------------------------------------------

    def _raise_if_dead(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error

    def _check_id_free(self, request_id: str) -> None:
        if request_id in self._outputs:
            raise InvalidInputError(f"request id {request_id!r} is already in use")

    def _abort_stream(self, stream: RequestStream) -> None:
        """A stream closed early: abort its request if it still delivers to this stream."""
        with self._lock:
            if self._streams.get(stream.request_id) is not stream:
                return
            outputs = self._outputs.abort([stream.request_id])
            if self._dead_error is None:
                self._client.abort_requests([stream.request_id])
            self._deliver(outputs)

    # ---- the output thread ----------------------------------------------------------------------------------

    def _read_outputs(self) -> None:
        while True:
            try:
                message = self._client.get_output(_OUTPUT_POLL_S)
            except Exception as exc:  # noqa: BLE001 - a broken transport is a dead engine
                logger.exception("reading engine core outputs failed")
                self._die(EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}"))
                return
            if isinstance(message, StepOutputs):
                self._take_step(message)
            elif isinstance(message, EngineCoreDead):
                self._die(EngineDeadError(message.error))
                return

    def _take_step(self, message: StepOutputs) -> None:
        if message.outputs.stats is not None:
            self._stats = message.outputs.stats
        with self._lock:
            outputs, stopped = self._outputs.process(message.outputs.outputs)
            if stopped and self._dead_error is None:
                self._client.abort_requests(stopped, FinishReason.STOP)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams (the lock is held)."""
        for output in outputs:
            if output.finished:
                stream = self._streams.pop(output.request_id, None)
                self._record_finished(output)
            else:
                stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            try:
                stream.put(output)
            except RuntimeError:  # the caller's event loop is closed: nobody will read this stream again
                if not output.finished:
                    self._streams.pop(output.request_id, None)
                    self._outputs.abort([output.request_id])
                    self._client.abort_requests([output.request_id])

    def _record_finished(self, output: RequestOutput) -> None:
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record_finished(output)
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("stat logger failed")

    def _die(self, error: EngineDeadError) -> None:
        with self._lock:
            if self._dead_error is None:
                self._dead_error = error
                if not self._shutting_down:
                    logger.error("engine stopped: %s", error)
            self._outputs.fail_all(str(self._dead_error))
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            try:
                stream.put(EngineDeadError(str(self._dead_error)))  # one instance per stream: its own traceback
            except RuntimeError:
                pass
        self._stats = EngineStats(num_kv_blocks=self._stats.num_kv_blocks)

