"""/v1/chat/completions: messages (text and image_url parts) through the model's chat template, plain or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from spaceserve.engine.chat import MediaConnector, parse_chat_messages
from spaceserve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    OpenAIServingError,
    random_id,
)
from spaceserve.server.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    TextDeltas,
    final_output,
    iterate,
    sse,
    sse_error,
    usage_of,
)


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLM, served_model_name: str, media: MediaConnector) -> None:
        super().__init__(engine, served_model_name)
        self.media = media
        self.max_images = engine.config.limit_mm_per_prompt.get("image", 0)

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A response, or (stream=true) the server-sent events of one. Bad requests raise OpenAIServingError before
        anything is queued."""
        model = self.check_model(request.model)
        request.check_supported()
        params = request.to_sampling_params(default_max_tokens=None)
        # media fetching, template rendering and image decoding can take a while: keep them off the event loop
        prompt = await asyncio.to_thread(self._build_prompt, request)
        request_id = random_id("chatcmpl")
        stream = await self.add_request(prompt, params, request_id)
        if request.stream:
            return self._stream(stream, request, model, params)
        try:
            output = await final_output(stream)
        except EngineDeadError as exc:
            raise OpenAIServingError(str(exc), status_code=503, type="ServiceUnavailableError") from None
        completion = output.outputs[0]
        return ChatCompletionResponse(
            id=request_id,
            model=model,
            choices=[
                ChatCompletionChoice(
                    message=ChatMessage(content=completion.text),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
            ],
            usage=usage_of(output),
        )

    def _build_prompt(self, request: ChatCompletionRequest) -> dict[str, Any]:
        try:
            messages, images = parse_chat_messages(request.messages, self.media, self.max_images)
            text = self.engine.tokenizer.apply_chat_template(
                messages, request.add_generation_prompt, **(request.chat_template_kwargs or {})
            )
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="messages") from None
        prompt: dict[str, Any] = {"prompt": text}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    async def _stream(
        self, stream: RequestStream, request: ChatCompletionRequest, model: str, params
    ) -> AsyncIterator[str]:
        request_id = stream.request_id
        include_usage = request.include_usage
        deltas = TextDeltas(params)

        def chunk(delta: DeltaMessage, finish_reason: str | None = None, stop_reason=None) -> str:
            choice = ChatCompletionStreamChoice(delta=delta, finish_reason=finish_reason, stop_reason=stop_reason)
            return sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=[choice]))

        yield chunk(DeltaMessage(role="assistant", content=""))
        try:
            async for output in iterate(stream):
                text = deltas.delta(output)
                if text:
                    yield chunk(DeltaMessage(content=text))
                if output.finished:
                    completion = output.outputs[0]
                    yield chunk(DeltaMessage(), completion.finish_reason, completion.stop_reason)
                    if include_usage:
                        yield sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=[], usage=usage_of(output)))
        except EngineDeadError as exc:
            yield sse_error(str(exc), "ServiceUnavailableError")
        yield SSE_DONE
