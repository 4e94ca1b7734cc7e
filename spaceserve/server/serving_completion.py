"""/v1/completions: one text or token-id prompt, plain or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from spaceserve.engine.async_llm import EngineDeadError, RequestStream
from spaceserve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
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


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        model = self.check_model(request.model)
        request.check_supported()
        params = request.to_sampling_params(default_max_tokens=None)
        prompt = _single_prompt(request.prompt)
        request_id = random_id("cmpl")
        stream = await self.add_request(prompt, params, request_id)
        if request.stream:
            return self._stream(stream, request, model, params)
        output = await final_output(stream)  # a dead engine becomes a 503 in the app's EngineDeadError handler
        completion = output.outputs[0]
        return CompletionResponse(
            id=request_id,
            model=model,
            choices=[
                CompletionChoice(
                    text=completion.text, finish_reason=completion.finish_reason, stop_reason=completion.stop_reason
                )
            ],
            usage=usage_of(output),
        )

    async def _stream(self, stream: RequestStream, request: CompletionRequest, model: str, params) -> AsyncIterator[str]:
        request_id = stream.request_id
        deltas = TextDeltas(params)

        def chunk(text: str, finish_reason: str | None = None, stop_reason=None) -> str:
            choice = CompletionChoice(text=text, finish_reason=finish_reason, stop_reason=stop_reason)
            return sse(CompletionResponse(id=request_id, model=model, choices=[choice]))

        try:
            async for output in iterate(stream):
                if output.error is not None:
                    yield sse_request_failed(output)
                    break
                text = deltas.delta(output)
                if output.finished:
                    completion = output.outputs[0]
                    yield chunk(text, completion.finish_reason, completion.stop_reason)
                    if request.include_usage:
                        yield sse(CompletionResponse(id=request_id, model=model, choices=[], usage=usage_of(output)))
                elif text:
                    yield chunk(text)
        except EngineDeadError as exc:
            yield sse_error(str(exc), "ServiceUnavailableError")
        yield SSE_DONE


def _single_prompt(prompt: Any) -> Any:
    """str -> text prompt; list of ints -> token ids; a one-element batch -> its element."""
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        if len(prompt) != 1:
            raise OpenAIServingError(
                f"batched prompts ({len(prompt)}) are not supported; send one prompt per request", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, list):
        return {"prompt_token_ids": prompt}
    return prompt
