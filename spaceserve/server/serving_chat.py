"""/v1/chat/completions: messages (text, image_url and video_url parts) through the model's chat template, plain or
streamed. Media references are counted against --limit-mm-per-prompt before any is fetched; a video is only probed
before the request is queued (a bad one is a 400), and a decode that fails later ends the request with an error
(a 400/500 body, or an error event in a stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from spaceserve.engine.chat import MediaConnector, parse_chat_messages
from spaceserve.engine.chat_video import fetch_video_urls
from spaceserve.engine.input_processor import DEFAULT_LIMIT_PER_PROMPT
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
    sse_request_failed,
    usage_of,
)


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self, engine: AsyncLLM, served_model_name: str, media: MediaConnector, video_media: MediaConnector
    ) -> None:
        super().__init__(engine, served_model_name)
        self.media = media
        self.video_media = video_media
        limits = {**DEFAULT_LIMIT_PER_PROMPT, **engine.config.limit_mm_per_prompt}
        self.max_images, self.max_videos = limits["image"], limits["video"]

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
        output = await final_output(stream)  # a dead engine becomes a 503 in the app's EngineDeadError handler
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
        video_sources: list[Any] = []
        try:
            messages, images = parse_chat_messages(
                request.messages, self.media, self.max_images, videos=video_sources, max_videos=self.max_videos
            )
            videos = fetch_video_urls(video_sources, self.video_media)
            text = self.engine.tokenizer.apply_chat_template(
                messages, request.add_generation_prompt, **(request.chat_template_kwargs or {})
            )
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="messages") from None
        prompt: dict[str, Any] = {"prompt": text}
        mm_data = {name: items for name, items in (("image", images), ("video", videos)) if items}
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        if request.mm_processor_kwargs:
            prompt["mm_processor_kwargs"] = request.mm_processor_kwargs
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
                if output.error is not None:
                    yield sse_request_failed(output)
                    break
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
