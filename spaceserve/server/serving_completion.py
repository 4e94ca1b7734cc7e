"""/v1/completions: one prompt or a batch (texts or token-id lists), n samples each, plain or streamed. Choice
`index` is prompt_index * n + sample_index, as vLLM numbers them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from spaceserve.engine.async_llm import EngineDeadError
from spaceserve.server.logprobs import completion_logprobs
from spaceserve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
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

MAX_BATCHED_PROMPTS = 256


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        model = self.check_model(request.model)
        request.check_supported()
        params = request.to_sampling_params(default_max_tokens=None)
        prompts = _prompts(request.prompt)
        if len(prompts) * params.n > MAX_BATCHED_PROMPTS:
            raise OpenAIServingError(
                f"{len(prompts)} prompts x n={params.n} exceed the {MAX_BATCHED_PROMPTS} sequences one request may "
                "ask for", param="prompt",
            )
        request_id = random_id("cmpl")
        choices = await self.add_choices(prompts, params, request_id, "completions")
        if request.stream:
            return self._stream(choices, request, model, request_id)
        outputs = await final_outputs(choices)  # a dead engine becomes a 503 in the app's EngineDeadError handler
        response_choices = []
        for choice, output in zip(choices, outputs):
            completion = output.outputs[0]
            logprobs = None
            if completion.logprobs is not None:
                logprobs = completion_logprobs(completion.logprobs, completion.token_ids, request.logprobs or 0)
            response_choices.append(
                CompletionChoice(
                    index=choice.index,
                    text=completion.text,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    logprobs=logprobs,
                )
            )
        return CompletionResponse(
            id=request_id,
            model=model,
            system_fingerprint=self.system_fingerprint,
            choices=response_choices,
            usage=usage_of(outputs, choices),
        )

    async def _stream(
        self, choices: list[Choice], request: CompletionRequest, model: str, request_id: str
    ) -> AsyncIterator[str]:
        deltas = {choice.index: TextDeltas(choice.params) for choice in choices}
        finals: dict[int, Any] = {}
        num_top = request.logprobs or 0

        def chunk(index: int, text: str, finish_reason=None, stop_reason=None, logprobs=None) -> str:
            choice = CompletionChoice(
                index=index, text=text, finish_reason=finish_reason, stop_reason=stop_reason, logprobs=logprobs
            )
            return sse(CompletionResponse(
                id=request_id, model=model, system_fingerprint=self.system_fingerprint, choices=[choice]
            ))

        try:
            async for choice, output in merged_outputs(choices):
                if output.error is not None:
                    yield sse_request_failed(output)
                    break
                tracker = deltas[choice.index]
                offset = tracker.sent
                text = tracker.delta(output)
                completion = output.outputs[0]
                logprobs = None
                if completion.logprobs is not None:
                    start, end = tracker.new_tokens(output)
                    if end > start:
                        logprobs = completion_logprobs(
                            completion.logprobs[start:end], completion.token_ids[start:end], num_top, offset
                        )
                if output.finished:
                    finals[choice.index] = output
                    yield chunk(choice.index, text, completion.finish_reason, completion.stop_reason, logprobs)
                elif text or logprobs is not None:
                    yield chunk(choice.index, text, logprobs=logprobs)
            else:
                if request.include_usage:
                    usage = usage_of([finals[choice.index] for choice in choices], choices)
                    yield sse(CompletionResponse(
                        id=request_id, model=model, system_fingerprint=self.system_fingerprint, choices=[], usage=usage
                    ))
        except EngineDeadError:
            yield SSE_ENGINE_DEAD
        yield SSE_DONE


def _prompts(prompt: Any) -> list[Any]:
    """str -> one text prompt; list of ints -> one token-id prompt; list of str or of int lists -> a batch."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(item, int) for item in prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and not prompt:
        raise OpenAIServingError("prompt must not be an empty list", param="prompt")
    return [{"prompt_token_ids": item} if isinstance(item, list) else item for item in prompt]
