"""What the chat and completion endpoints share: the model check, queueing a request with errors turned into
OpenAI errors, server-sent-event framing, and text deltas that never take back what was already sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel

from spaceserve.core.encoder_messages import ENCODER_UNAVAILABLE_PREFIX
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.outputs import RequestOutput
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from spaceserve.engine.input_processor import PromptType
from spaceserve.engine.llm_engine import DECODE_FAILURE_PREFIX
from spaceserve.server.protocol import ErrorInfo, ErrorResponse, OpenAIServingError, UsageInfo


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_name: str) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.max_model_len = engine.config.scheduler.max_model_len

    def check_model(self, model: str | None) -> str:
        if model is not None and model != self.served_model_name:
            raise OpenAIServingError(
                f"The model `{model}` does not exist; this server serves `{self.served_model_name}`.",
                status_code=404,
                type="NotFoundError",
                param="model",
                code="model_not_found",
            )
        return self.served_model_name

    async def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str) -> RequestStream:
        try:
            return await self.engine.add_request(prompt, params, request_id)
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc)) from None


def engine_dead(exc: EngineDeadError) -> OpenAIServingError:
    return OpenAIServingError(str(exc), status_code=503, type="ServiceUnavailableError")


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(message: str, error_type: str = "InternalServerError", code: int | None = None) -> str:
    body = ErrorResponse(error=ErrorInfo(message=message, type=error_type, code=code))
    return f"data: {json.dumps(body.model_dump())}\n\n"


def request_failed(output: RequestOutput) -> OpenAIServingError:
    """The error of a request the engine accepted and then failed (its video could not be decoded): a 400 naming
    the problem with the input, a 500 when a decoder or device failed, a 503 when the encoder process is gone."""
    message = output.error or "the request failed"
    if message.startswith(ENCODER_UNAVAILABLE_PREFIX):
        return OpenAIServingError(message, status_code=503, type="ServiceUnavailableError")
    if message.startswith(DECODE_FAILURE_PREFIX):
        return OpenAIServingError(message, status_code=500, type="InternalServerError")
    return OpenAIServingError(message, param="messages")


def sse_request_failed(output: RequestOutput) -> str:
    error = request_failed(output)
    return sse_error(error.message, error.type, error.status_code)


def usage_of(output: RequestOutput) -> UsageInfo:
    return UsageInfo.of(len(output.prompt_token_ids), len(output.outputs[0].token_ids))


class TextDeltas:
    """Turns cumulative texts into deltas for a stream.

    While a request runs, the last (longest stop string - 1) characters are held back: a stop string completed by
    a later token truncates the text there, and text already sent cannot be taken back."""

    def __init__(self, params: SamplingParams) -> None:
        stops = params.stop if not params.include_stop_str_in_output else ()
        self.hold_back = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def delta(self, output: RequestOutput) -> str:
        text = output.outputs[0].text
        end = len(text) if output.finished else max(self.sent, len(text) - self.hold_back)
        delta = text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


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


async def iterate(stream: RequestStream) -> AsyncIterator[RequestOutput]:
    try:
        async for output in stream:
            yield output
    finally:
        stream.close()
