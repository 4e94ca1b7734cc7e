"""LLMEngine: the synchronous front of the engine, as vLLM's LLMEngine (what `LLM` drives).

The front does what needs text: input processing (tokenize, load and preprocess media, M-RoPE positions) and output
processing (incremental detokenization, stop strings). The engine core (core.py: schedulers, runners, encoder)
runs either in a process of its own, reached over ZMQ (the default), or in this process, stepped directly by
`step()` (SPACESERVE_ENABLE_MULTIPROCESSING=0 or multiprocess=False; its internals are then at `engine.core`).
"""

from __future__ import annotations

import itertools
import weakref
import time
from typing import Any

from spaceserve.config import EngineConfig
from spaceserve.core.engine_messages import EngineCoreDead, FinishReason, StepOutputs
from spaceserve.core.errors import ConfigError, InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.request import Request
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.core import EngineCore
from spaceserve.engine.core_client import EngineDeadError, MPClient, multiprocessing_enabled
from spaceserve.engine.input_processor import InputProcessor, PromptType
from spaceserve.engine.output_processor import OutputProcessor
from spaceserve.tokenizer import load_tokenizer_for

__all__ = ["LLMEngine"]


class LLMEngine:
    def __init__(self, config: EngineConfig, multiprocess: bool | None = None) -> None:
        if config.data_parallel.data_parallel_size > 1:
            raise ConfigError("the offline engine runs one engine core; data parallelism is AsyncLLM's (spaceserve serve)")
        self.config = config
        self.tokenizer = load_tokenizer_for(config)
        self.input_processor = InputProcessor(config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._client: MPClient | None = None
        self._core: EngineCore | None = None
        if multiprocessing_enabled(multiprocess):
            self._client = MPClient(config)
            self.info = self._client.info
            # stop the core process in order when this engine goes away or the interpreter exits (a core left to its
            # parent-death signal would be killed mid-teardown)
            self._finalizer = weakref.finalize(self, _stop_client, self._client)
        else:
            self._core = EngineCore(config)
            self.info = self._core.describe()
        self._ids = itertools.count()
        self._early_outputs: list = []  # step outputs that arrived during a utility call, for the next step()

    @property
    def core(self) -> EngineCore:
        """The engine core's internals (scheduler, KV manager, runners); in-process engines only."""
        if self._core is None:
            raise RuntimeError(
                "the engine core runs in another process; use an in-process engine (multiprocess=False or "
                "SPACESERVE_ENABLE_MULTIPROCESSING=0) to reach its internals"
            )
        return self._core

    @property
    def execution(self) -> dict[str, Any]:
        """The multiplex mode that runs, why, and its SM splits."""
        return self.info["execution"]

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
        """Queue a request `input_processor` already built. Raises InvalidInputError, engine untouched, if its id is
        in use or an image cannot fit the encoder cache."""
        self._check_id_free(request.request_id)
        if self._core is not None:
            self._core.add_request(request)
        else:
            self._client.add_request(request)
        self.output_processor.add_request(request)

    def _check_id_free(self, request_id: str) -> None:
        if request_id in self.output_processor:
            raise InvalidInputError(f"request id {request_id!r} is already in use")

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = self.output_processor.abort(request_ids)
        self._abort_in_core(request_ids, FinishReason.ABORT)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_unfinished > 0

    # ---- one step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """In-process: run one engine-core step. Otherwise: wait for the core's next step outputs."""
        if self._core is not None:
            core_outputs = self._core.step()
        else:
            core_outputs = self._next_step_outputs()
        outputs, stopped = self.output_processor.process(core_outputs)
        self._abort_in_core(stopped, FinishReason.STOP)
        return outputs

    def _next_step_outputs(self) -> list:
        if self._early_outputs:
            outputs, self._early_outputs = self._early_outputs, []
            return outputs
        while True:
            message = self._client.get_output(None)
            if isinstance(message, StepOutputs):
                return message.outputs.outputs
            if isinstance(message, EngineCoreDead):
                self.output_processor.fail_all(message.error)
                raise EngineDeadError(message.error)

    def _abort_in_core(self, request_ids: list[str], reason: FinishReason) -> None:
        if not request_ids:
            return
        if self._core is not None:
            self._core.abort_requests(request_ids, reason)
        else:
            self._client.abort_requests(request_ids, reason)

    # ---- introspection, in either process ------------------------------------------------------------------

    def call_utility(self, method: str, *args: Any, timeout_s: float | None = 60.0) -> Any:
        """Call an EngineCore utility (core.UTILITY_METHODS) between steps and return its result."""
        if self._core is not None:
            return getattr(self._core, method)(*args)
        future = self._client.call_utility_async(method, *args)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not future.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"engine utility {method!r} did not answer within {timeout_s} s")
            message = self._client.get_output(min(left, 0.5) if left is not None else 0.5)
            if isinstance(message, StepOutputs):
                self._early_outputs.extend(message.outputs.outputs)
            elif isinstance(message, EngineCoreDead):
                raise EngineDeadError(message.error)
        return future.result()

    def check_idle_integrity(self) -> None:
        """With no request in flight, every KV block is free and no encoder-cache entry is referenced."""
        self.call_utility("check_idle_integrity")

    def check_health(self) -> None:
        """Raises if the engine cannot serve every request (see AsyncLLM.check_health)."""
        self.call_utility("check_health")

    def loop_counters(self) -> dict[str, float]:
        return self.call_utility("loop_counters")

    def shutdown(self) -> None:
        """Stop the engine core (its process, or its encoder worker and video stage here). Idempotent."""
        if self._core is not None:
            self._core.shutdown()
        if self._client is not None:
            self._finalizer()


def _stop_client(client: MPClient) -> None:
    client.shutdown()
    client.close()
