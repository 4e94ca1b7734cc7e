"""What the chat and completion endpoints share: the model check, fanning a request out into one engine request per
prompt and sample (n > 1, batched prompts) and merging their outputs, errors turned into OpenAI errors that carry
no internal detail, server-sent-event framing, and text deltas that never take back what was already sent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from spaceserve import __version__
from spaceserve.core.encoder_messages import ENCODER_UNAVAILABLE_PREFIX
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.async_llm import AsyncLLM, RequestStream
from spaceserve.engine.core_loop import ADD_FAILURE_MESSAGE
from spaceserve.engine.input_processor import PromptType, check_max_tokens_fit
from spaceserve.engine.video_jobs import DECODE_FAILURE_PREFIX
from spaceserve.engine.parallel_sampling import child_params
from spaceserve.server.protocol import ErrorInfo, ErrorResponse, OpenAIServingError, UsageInfo

logger = logging.getLogger("spaceserve.server")
ENGINE_DEAD_MESSAGE = "the engine is not running (it failed or was shut down); see the server log"
SERVER_ERROR_MESSAGE = "internal server error; see the server log"
ENCODER_UNHEALTHY_MESSAGE = (
    "the vision encoder is not running (its process died): requests with images or videos fail; see the server log"
)


@dataclass
class Choice:
    """One engine request of a fanned-out API request: choice `index` (prompt_index * n + sample_index)."""

    index: int
    prompt_index: int
    stream: RequestStream
    params: SamplingParams


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: Sequence[str], *, log_requests: bool = True) -> None:
        self.engine = engine
        self.served_model_names = tuple(served_model_names)
        self.served_model_name = self.served_model_names[0]
        self.max_model_len = engine.config.scheduler.max_model_len
        self.log_requests = log_requests
        config = engine.config
        identity = f"{config.model}|{config.dtype}|{config.device}|{config.multiplex}|{__version__}"
        self.system_fingerprint = f"fp_spaceserve_{hashlib.sha256(identity.encode()).hexdigest()[:10]}"

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.served_model_names:
            raise OpenAIServingError(
                f"The model `{model}` does not exist; this server serves `{'`, `'.join(self.served_model_names)}`.",
                status_code=404,
                type="NotFoundError",
                param="model",
                code="model_not_found",
            )
        return self.served_model_name

    async def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str) -> RequestStream:
        try:
            return await self.engine.add_request(prompt, params, request_id, check=self._check_context)
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param=_param_of(str(exc))) from None

    def _check_context(self, request: Any) -> None:
        check_max_tokens_fit(request, self.max_model_len)

    async def add_choices(
        self, prompts: Sequence[PromptType], params: SamplingParams, request_id: str, endpoint: str
    ) -> list[Choice]:
        """One engine request per prompt and sample (ids `{request_id}-{index}` when there are several; seeds
        `seed + sample index`). Any failure closes (aborts) those already queued."""
        samples = child_params(params)
        if self.log_requests:
            logger.info(
                "request %s: %s, %d prompt(s) x n=%d, max_tokens=%s, temperature=%s, top_p=%s, seed=%s",
                request_id, endpoint, len(prompts), params.n, params.max_tokens, params.temperature, params.top_p,
                params.seed,
            )
        choices: list[Choice] = []
        single = len(prompts) * len(samples) == 1
        try:
            for prompt_index, prompt in enumerate(prompts):
                for sample_index, sample in enumerate(samples):
                    index = prompt_index * len(samples) + sample_index
                    child_id = request_id if single else f"{request_id}-{index}"
                    try:
                        stream = await self.add_request(prompt, sample, child_id)
                    except OpenAIServingError as exc:
                        if len(prompts) > 1:
                            exc.message = f"prompt {prompt_index}: {exc.message}"
                        raise
                    choices.append(Choice(index, prompt_index, stream, sample))
        except BaseException:
            for choice in choices:
                choice.stream.close()
            raise
        return choices


_ENGINE_ERROR_PARAMS = {"max_tokens", "stop_token_ids", "mm_processor_kwargs", "prompt_token_ids", "seed", "n"}


def _param_of(message: str) -> str | None:
    """The request field an engine error names, when it starts with one ("stop_token_ids holds ...")."""
    if message.startswith("This model's maximum context length"):
        return "max_tokens"
    first = message.split(" ", 1)[0]
    return first if first in _ENGINE_ERROR_PARAMS else None


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(message: str, error_type: str = "InternalServerError", code: int | None = None) -> str:
    body = ErrorResponse(error=ErrorInfo(message=message, type=error_type, code=code))
    return f"data: {json.dumps(body.model_dump())}\n\n"


SSE_ENGINE_DEAD = sse_error(ENGINE_DEAD_MESSAGE, "ServiceUnavailableError", 503)


def request_failed(output: RequestOutput) -> OpenAIServingError:
    """The error of a request the engine accepted and then failed (its video could not be decoded): a 400 naming
    the problem with the input, a 500 (detail in the server log) when a decoder or device failed, a 503 when the
    encoder process is gone."""
    message = output.error or "the request failed"
    if message.startswith(ENCODER_UNAVAILABLE_PREFIX):
        return OpenAIServingError(message, status_code=503, type="ServiceUnavailableError")
    if message == ADD_FAILURE_MESSAGE:
        return OpenAIServingError(message, status_code=500, type="InternalServerError")
    if message.startswith(DECODE_FAILURE_PREFIX):
        logger.error("request %s failed: %s", output.request_id, message)
        return OpenAIServingError(
            "the video could not be decoded on the server; see the server log", status_code=500,
            type="InternalServerError",
        )
    return OpenAIServingError(message, param="messages")


def sse_request_failed(output: RequestOutput) -> str:
    error = request_failed(output)
    return sse_error(error.message, error.type, error.status_code)


def usage_of(outputs: Sequence[RequestOutput], choices: Sequence[Choice]) -> UsageInfo:
    """Prompt tokens once per prompt, completion tokens over every choice (vLLM's accounting)."""
    prompt_tokens = {}
    for choice, output in zip(choices, outputs):
        prompt_tokens[choice.prompt_index] = len(output.prompt_token_ids)
    completion_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return UsageInfo.of(sum(prompt_tokens.values()), completion_tokens)


class TextDeltas:
    """Turns cumulative texts into deltas for a stream.

    While a request runs, the last (longest stop string - 1) characters are held back: a stop string completed by
    a later token truncates the text there, and text already sent cannot be taken back."""

    def __init__(self, params: SamplingParams) -> None:
        stops = params.stop if not params.include_stop_str_in_output else ()
        self.hold_back = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.tokens_sent = 0

    def delta(self, output: RequestOutput) -> str:
        text = output.outputs[0].text
        end = len(text) if output.finished else max(self.sent, len(text) - self.hold_back)
        delta = text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def new_tokens(self, output: RequestOutput) -> tuple[int, int]:
        """The [start, end) range of token ids not reported yet (for their log-probabilities), marked reported."""
        start, self.tokens_sent = self.tokens_sent, len(output.outputs[0].token_ids)
        return start, self.tokens_sent


async def final_output(stream: RequestStream) -> RequestOutput:
    """Drain a stream to its last output (a non-streaming response); closing aborts it if the caller leaves."""
    last = None
    try:
        async for output in stream:
            last = output
    finally:
        stream.close()
    if last is None or not last.finished:
        raise RuntimeError(f"the stream of {stream.request_id} ended without a finished output")
    if last.error is not None:
        raise request_failed(last)
    return last


async def final_outputs(choices: Sequence[Choice]) -> list[RequestOutput]:
    """Every choice's last output; the first failure (or the caller leaving) aborts the others."""
    try:
        return list(await asyncio.gather(*(final_output(choice.stream) for choice in choices)))
    finally:
        for choice in choices:
            choice.stream.close()


async def merged_outputs(choices: Sequence[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """The choices' outputs as they come, interleaved; closing the iterator aborts what has not finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for output in choice.stream:
                queue.put_nowait((choice, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer (EngineDeadError, most likely)
            queue.put_nowait((choice, exc))
        finally:
            queue.put_nowait((choice, None))

    tasks = [asyncio.ensure_future(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            choice, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.stream.close()
