"""/v1/chat/completions: messages (text, image_url and video_url parts) through the model's chat template, plain or
streamed, n samples.

Everything the request carries is checked before any work: roles, parts and media counts (limit_mm_per_prompt),
mm_processor_kwargs against the server's limits, chat_template_kwargs. Media are then fetched asynchronously (no
shared thread pool a few stalled sources could exhaust), a reference repeated in the request once, every byte
counted against the request's media budget. A video is only probed before the request is queued (a bad one is a
400); a decode that fails later ends the request with an error (a 400/500 body, or an error event in a stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from spaceserve.core.errors import InvalidInputError
from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from spaceserve.engine.chat import ParsedChat, parse_chat_content
from spaceserve.engine.input_processor import DEFAULT_LIMIT_PER_PROMPT
from spaceserve.engine.media import MediaBudget, MediaConnector
from spaceserve.engine.mm_kwargs import MMProcessorLimits, check_mm_processor_kwargs
from spaceserve.server.logprobs import chat_logprobs
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
    SSE_ENGINE_DEAD,
    Choice,
    OpenAIServing,
    TextDeltas,
    final_outputs,
    merged_outputs,
    sse,
    sse_request_failed,
    usage_of,
)
from spaceserve.tokenizer.chat_template import ChatTemplate, check_template_kwargs


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine: AsyncLLM,
        served_model_names: Sequence[str],
        media: MediaConnector,
        video_media: MediaConnector,
        *,
        max_request_media_bytes: int,
        chat_template: ChatTemplate | None = None,
        log_requests: bool = True,
    ) -> None:
        super().__init__(engine, served_model_names, log_requests=log_requests)
        self.media = media
        self.video_media = video_media
        self.max_request_media_bytes = max_request_media_bytes
        self.chat_template = chat_template
        limits = {**DEFAULT_LIMIT_PER_PROMPT, **engine.config.limit_mm_per_prompt}
        self.max_images, self.max_videos = limits["image"], limits["video"]
        self.mm_limits = MMProcessorLimits.from_config(engine.config)

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A response, or (stream=true) the server-sent events of one. Bad requests raise OpenAIServingError before
        anything is queued."""
        model = self.check_model(request.model)
        request.check_supported()
        params = request.to_sampling_params(default_max_tokens=None)
        prompt = await self._build_prompt(request)
        request_id = random_id("chatcmpl")
        choices = await self.add_choices([prompt], params, request_id, "chat")
        if request.stream:
            return self._stream(choices, request, model, request_id)
        outputs = await final_outputs(choices)  # a dead engine becomes a 503 in the app's EngineDeadError handler
        response_choices = []
        for choice, output in zip(choices, outputs):
            completion = output.outputs[0]
            logprobs = None
            if completion.logprobs is not None:
                logprobs = chat_logprobs(completion.logprobs, completion.token_ids, request.top_logprobs or 0)
            response_choices.append(
                ChatCompletionChoice(
                    index=choice.index,
                    message=ChatMessage(content=completion.text),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    logprobs=logprobs,
                )
            )
        return ChatCompletionResponse(
            id=request_id,
            model=model,
            system_fingerprint=self.system_fingerprint,
            choices=response_choices,
            usage=usage_of(outputs, choices),
        )

    async def _build_prompt(self, request: ChatCompletionRequest) -> dict[str, Any]:
        try:
            parsed = parse_chat_content(request.messages, self.max_images, self.max_videos)
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="messages") from None
        try:
            mm_kwargs = check_mm_processor_kwargs(
                request.mm_processor_kwargs, self.mm_limits, has_images=bool(parsed.image_sources),
                has_videos=bool(parsed.video_sources),
            )
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="mm_processor_kwargs") from None
        try:
            template_kwargs = check_template_kwargs(request.chat_template_kwargs)
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="chat_template_kwargs") from None
        try:
            text = self.engine.tokenizer.apply_chat_template(
                parsed.messages, request.add_generation_prompt, chat_template=self.chat_template, **template_kwargs
            )
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="messages") from None
        try:
            images, videos = await self._fetch_media(parsed)
        except InvalidInputError as exc:
            raise OpenAIServingError(str(exc), param="messages") from None
        prompt: dict[str, Any] = {"prompt": text}
        mm_data = {name: items for name, items in (("image", images), ("video", videos)) if items}
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        if mm_kwargs:
            prompt["mm_processor_kwargs"] = mm_kwargs
        return prompt

    async def _fetch_media(self, parsed: ParsedChat) -> tuple[list[Any], list[Any]]:
        """Fetch every distinct reference once, concurrently, under the request's media budget; the first failure
        cancels the rest."""
        for number, source in enumerate(parsed.video_sources):
            if not isinstance(source, str):
                raise InvalidInputError(
                    f"video {number}: send a video as a URL string (video_url with a data:, file:// or http(s):// "
                    f"URL), got {type(source).__name__}"
                )
        budget = MediaBudget(self.max_request_media_bytes)
        fetches: dict[tuple[str, Any], asyncio.Future] = {}

        def fetch(kind: str, number: int, source: Any) -> asyncio.Future:
            key = (kind, source if isinstance(source, str) else id(source))
            if key not in fetches:
                fetches[key] = asyncio.ensure_future(self._fetch_one(kind, number, source, budget))
            return fetches[key]

        image_futures = [fetch("image", i, source) for i, source in enumerate(parsed.image_sources)]
        video_futures = [fetch("video", i, source) for i, source in enumerate(parsed.video_sources)]
        try:
            await asyncio.gather(*fetches.values())
        finally:
            for future in fetches.values():
                future.cancel()
        return [f.result() for f in image_futures], [f.result() for f in video_futures]

    async def _fetch_one(self, kind: str, number: int, source: Any, budget: MediaBudget) -> Any:
        connector = self.media if kind == "image" else self.video_media
        try:
            data = await connector.fetch_async(source, budget)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{kind} {number}: {exc}") from None
        if kind == "video" and not data:
            raise InvalidInputError(f"video {number}: the video is empty")
        return data

    async def _stream(
        self, choices: list[Choice], request: ChatCompletionRequest, model: str, request_id: str
    ) -> AsyncIterator[str]:
        include_usage = request.include_usage
        num_top = request.top_logprobs or 0
        deltas = {choice.index: TextDeltas(choice.params) for choice in choices}
        finals: dict[int, Any] = {}

        def chunk(index: int, delta: DeltaMessage, finish_reason=None, stop_reason=None, logprobs=None) -> str:
            choice = ChatCompletionStreamChoice(
                index=index, delta=delta, finish_reason=finish_reason, stop_reason=stop_reason, logprobs=logprobs
            )
            return sse(ChatCompletionStreamResponse(
                id=request_id, model=model, system_fingerprint=self.system_fingerprint, choices=[choice]
            ))

        for choice in choices:
            yield chunk(choice.index, DeltaMessage(role="assistant", content=""))
        try:
            async for choice, output in merged_outputs(choices):
                if output.error is not None:
                    yield sse_request_failed(output)
                    break
                tracker = deltas[choice.index]
                text = tracker.delta(output)
                completion = output.outputs[0]
                logprobs = None
                if completion.logprobs is not None:
                    start, end = tracker.new_tokens(output)
                    if end > start:
                        logprobs = chat_logprobs(completion.logprobs[start:end], completion.token_ids[start:end], num_top)
                if text or logprobs is not None:
                    yield chunk(choice.index, DeltaMessage(content=text), logprobs=logprobs)
                if output.finished:
                    finals[choice.index] = output
                    yield chunk(choice.index, DeltaMessage(), completion.finish_reason, completion.stop_reason)
            else:
                if include_usage:
                    ordered = [finals[choice.index] for choice in choices]
                    usage = usage_of(ordered, choices)
                    yield sse(ChatCompletionStreamResponse(
                        id=request_id, model=model, system_fingerprint=self.system_fingerprint, choices=[], usage=usage
                    ))
        except EngineDeadError:
            yield SSE_ENGINE_DEAD
        yield SSE_DONE
