"""AsyncLLM: the engine behind the server, shaped like vLLM's AsyncLLM.

Threads and who touches what:

- The engine thread owns the LLMEngine. It builds it, and every LLMEngine call (add, abort, step, introspection)
  happens there. When no request is in flight it blocks on the command queue, so an idle server costs nothing.
- Input processing workers (a small thread pool) run `InputProcessor.process`: tokenizing, image decoding and
  preprocessing. That work is pure (config + tokenizer in, Request out) and slow, so it stays off both the event
  loop and the engine thread: a big image being decoded never delays the running requests' next step. The engine
  thread only queues the finished Request (`add_processed_request`), so the LLMEngine stays single-threaded.
- Callers (any thread, usually an asyncio loop) talk to the engine thread through a thread-safe command queue:
  add, abort, run-a-function, shutdown. Each request's outputs go to its own asyncio.Queue on the caller's loop
  through `loop.call_soon_threadsafe`.

Nothing here assumes where the encoder runs: the loop only calls `step()` while requests are unfinished and
forwards what it returns, so an engine that encodes concurrently inside LLMEngine needs no change here.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from spaceserve.config import EngineConfig
from spaceserve.core.errors import InvalidInputError, SpaceServeError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.request import Request
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.input_processor import PromptType
from spaceserve.engine.llm_engine import LLMEngine
from spaceserve.engine.stats import EngineStats, StatLogger

logger = logging.getLogger(__name__)
T = TypeVar("T")
_EMPTY_STEP_WAIT_S = 0.0005


class EngineDeadError(SpaceServeError, RuntimeError):
    """The engine loop stopped (an exception inside the engine, or shutdown); no request can be served."""


# ---- commands the engine thread executes, in order --------------------------------------------------------------

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
        """Engine thread side. Raises RuntimeError if the caller's loop is closed."""
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
            self._owner._submit_nowait(_Abort([self.request_id], owner=self))

    async def aclose(self) -> None:
        self.close()


@dataclass
class _Add:
    request: Request
    sink: RequestStream
    done: Future


@dataclass
class _Abort:
    request_ids: list[str]
    done: Future | None = None
    owner: RequestStream | None = None
    """Set when a stream aborts its own request: only a request still delivering to this sink is aborted, so a
    failed add (say, a duplicate id) never aborts another stream's request of the same id."""


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    done: Future


@dataclass
class _Shutdown:
    pass


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig,
        *,
        stat_loggers: list[StatLogger] | None = None,
        num_input_workers: int | None = None,
    ) -> None:
        self.config = config
        self.stat_loggers = list(stat_loggers or [])
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._input_pool = ThreadPoolExecutor(
            max_workers=num_input_workers or min(4, os.cpu_count() or 1), thread_name_prefix="spaceserve-input"
        )
        self._sinks: dict[str, RequestStream] = {}  # engine thread only
        self._stats = EngineStats()
        self._dead_error: EngineDeadError | None = None
        self._dead_lock = threading.Lock()  # orders "mark dead" against "submit a command"
        self._ids = itertools.count()

        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(built,), name="spaceserve-engine", daemon=True)
        self._thread.start()
        self._engine: LLMEngine = built.result()  # re-raises a construction error here
        # Stateless (config + tokenizer); safe to call from the input workers while the engine thread steps.
        self.input_processor = self._engine.input_processor
        self.tokenizer = self._engine.tokenizer
        self.execution = self._engine.layout.describe()  # the multiplex mode that runs and its SM split

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        return cls(engine_args.create_engine_config(), **kwargs)

    # ---- public API (any thread / event loop) ---------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._dead_error is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead_error

    @property
    def stats(self) -> EngineStats:
        """A snapshot the engine thread publishes after each step; reading it never touches engine state."""
        return self._stats

    async def add_request(
        self, prompt: PromptType, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestStream:
        """Process the input on a worker, queue the request, and return its output stream once it is queued.

        Bad input raises InvalidInputError and nothing is queued. Close the stream (or let it finish) when done:
        closing it early aborts the request."""
        self._raise_if_dead()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        params = sampling_params or SamplingParams()
        arrival_time = time.monotonic()
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(
            self._input_pool, self.input_processor.process, request_id, prompt, params
        )
        request.arrival_time = arrival_time  # processing time counts towards the queue time and the latency
        stream = RequestStream(request_id, loop, self)
        try:
            await asyncio.wrap_future(self._submit(_Add(request, stream, Future())))
        except BaseException:
            stream.close()  # cancelled while queued: the add may still run, and this abort follows it
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
        """Abort requests (unknown or finished ids are ignored); returns once their resources are freed. A stream
        of an aborted request ends with an output whose finish_reason is "abort"."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await asyncio.wrap_future(self._submit(_Abort(ids, Future())))

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps (introspection, tests) and return its result."""
        return await asyncio.wrap_future(self._submit(_Call(fn, Future())))

    def call_in_engine(self, fn: Callable[[LLMEngine], T], timeout: float | None = None) -> T:
        """Blocking form of run_in_engine, for callers without an event loop."""
        return self._submit(_Call(fn, Future())).result(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; streams still open end with EngineDeadError. Safe to call twice."""
        with self._dead_lock:
            if self._thread.is_alive():
                self._commands.put(_Shutdown())
        self._thread.join(timeout)
        self._input_pool.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self._release_device_memory()

    def _release_device_memory(self) -> None:
        """Drop the stopped engine so its weights, KV cache and graphs go back to the device: a process that starts
        another engine next (a benchmark sweeping modes) must find the memory free when it profiles."""
        self._engine = None  # type: ignore[assignment]
        gc.collect()  # the engine's parts reference each other (runner, encoder worker)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # ---- submitting commands ----------------------------------------------------------------------------------

    def _raise_if_dead(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error

    def _submit(self, command: _Add | _Abort | _Call) -> Future:
        with self._dead_lock:
            self._raise_if_dead()
            self._commands.put(command)
        return command.done

    def _submit_nowait(self, command: _Abort) -> None:
        with self._dead_lock:
            if self._dead_error is None:
                self._commands.put(command)

    # ---- the engine thread ------------------------------------------------------------------------------------

    def _run(self, built: Future) -> None:
        try:
            engine = LLMEngine(self.config)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._dead_error = EngineDeadError(f"engine failed to start: {exc}")
            built.set_exception(exc)
            return
        built.set_result(engine)
        self._publish_stats(engine)
        stepped_empty = False
        try:
            while True:
                # Block while idle; otherwise take whatever arrived since the last step and keep stepping. After a
                # step with nothing to do (work in flight elsewhere: video decoding, a concurrent encoder) wait a
                # moment for a command instead of spinning on step().
                commands = []
                if not engine.has_unfinished_requests():
                    commands.append(self._commands.get())
                elif stepped_empty:
                    try:
                        commands.append(self._commands.get(timeout=_EMPTY_STEP_WAIT_S))
                    except queue.Empty:
                        pass
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if isinstance(command, _Shutdown):
                        self._die(engine, EngineDeadError("the engine was shut down"))
                        return
                    self._execute(engine, command)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    stepped_empty = not outputs
                    self._dispatch(outputs)
                self._publish_stats(engine)
        except Exception as exc:  # noqa: BLE001 - any engine failure ends every stream with a clear error
            logger.exception("engine loop failed")
            self._die(engine, EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}"))

    def _execute(self, engine: LLMEngine, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Add):
            try:
                engine.add_processed_request(command.request)
            except InvalidInputError as exc:
                command.done.set_exception(exc)
                return
            self._sinks[command.request.request_id] = command.sink
            command.done.set_result(None)
        elif isinstance(command, _Abort):
            ids = command.request_ids
            if command.owner is not None:
                ids = [i for i in ids if self._sinks.get(i) is command.owner]
            for output in engine.abort_request(ids):
                self._deliver(output)
            if command.done is not None:
                command.done.set_result(None)
        else:
            try:
                command.done.set_result(command.fn(engine))
            except Exception as exc:  # noqa: BLE001 - the caller's function failed, not the engine
                command.done.set_exception(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        sink = self._sinks.pop(output.request_id) if output.finished else self._sinks.get(output.request_id)
        if output.finished:
            for stat_logger in self.stat_loggers:
                try:
                    stat_logger.record_finished(output)
                except Exception:  # noqa: BLE001 - metrics must never take the engine down
                    logger.exception("stat logger failed")
        if sink is None:
            return
        try:
            sink.put(output)
        except RuntimeError:  # the caller's event loop is closed: nobody will read this stream again
            if not output.finished:
                self._sinks.pop(output.request_id, None)
                self._commands.put(_Abort([output.request_id]))

    def _publish_stats(self, engine: LLMEngine) -> None:
        kv = engine.kv_manager
        self._stats = EngineStats(
            num_running=engine.scheduler.num_running,
            num_waiting=engine.scheduler.num_waiting + engine.num_decoding,
            num_kv_blocks=kv.num_blocks,
            num_free_kv_blocks=kv.num_free_blocks,
            kv_cache_usage=kv.usage,
            encoder_cache_usage=engine.encoder_cache.usage,
            num_encoder_queued_items=engine.encoder_scheduler.num_queued_items,
            num_preemptions=engine.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_stats.queries,
            prefix_cache_hits=kv.prefix_cache_stats.hits,
        )

    def _die(self, engine: LLMEngine, error: EngineDeadError) -> None:
        with self._dead_lock:
            self._dead_error = error
            pending = []
            while True:
                try:
                    pending.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for command in pending:
            done = getattr(command, "done", None)
            if done is not None and not done.done():
                done.set_exception(error)
        for sink in self._sinks.values():
            try:
                sink.put(EngineDeadError(str(error)))  # one instance per stream: each raise writes its own traceback
            except RuntimeError:
                pass
        self._sinks.clear()
        self._publish_stats_safely(engine)
        try:
            engine.shutdown()  # the video decode stage and its decoder sessions
        except Exception:  # noqa: BLE001 - already stopping; nothing more to do with the error
            logger.exception("engine shutdown failed")

    def _publish_stats_safely(self, engine: LLMEngine) -> None:
        try:
            self._publish_stats(engine)
        except Exception:  # noqa: BLE001 - the engine is already broken; keep the last snapshot
            pass
