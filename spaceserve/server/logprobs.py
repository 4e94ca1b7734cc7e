"""Log-probabilities in OpenAI's two wire shapes, from the engine's (vLLM's) per-token dicts: chat's list of
{token, logprob, bytes, top_logprobs} and the legacy completions' parallel lists. -inf (a token masked out) is
written as -9999.0, as vLLM does, since JSON has no infinity."""

from __future__ import annotations

import math
from collections.abc import Sequence

from spaceserve.core.outputs import Logprob, SampleLogprobs
from spaceserve.server.protocol import ChatCompletionLogprob, ChatCompletionLogprobs, CompletionLogprobs, TopLogprob


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def _text(entry: Logprob, token_id: int) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"token_id:{token_id}"


def _split(step: dict[int, Logprob], token_id: int, num_top: int) -> tuple[Logprob, list[tuple[int, Logprob]]]:
    sampled = step[token_id]
    top = sorted(((t, lp) for t, lp in step.items() if lp.rank is not None), key=lambda item: item[1].rank)
    return sampled, [(t, lp) for t, lp in top if lp.rank <= num_top][:num_top]


def chat_logprobs(logprobs: SampleLogprobs, token_ids: Sequence[int], num_top: int) -> ChatCompletionLogprobs:
    content = []
    for step, token_id in zip(logprobs, token_ids):
        sampled, top = _split(step, token_id, num_top)
        text = _text(sampled, token_id)
        content.append(
            ChatCompletionLogprob(
                token=text,
                logprob=_finite(sampled.logprob),
                bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=_text(lp, t), logprob=_finite(lp.logprob), bytes=list(_text(lp, t).encode("utf-8")))
                    for t, lp in top
                ],
            )
        )
    return ChatCompletionLogprobs(content=content)


def completion_logprobs(
    logprobs: SampleLogprobs, token_ids: Sequence[int], num_top: int, text_offset: int = 0
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = text_offset
    for step, token_id in zip(logprobs, token_ids):
        sampled, top = _split(step, token_id, num_top)
        text = _text(sampled, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(sampled.logprob))
        out.text_offset.append(offset)
        top_by_text: dict[str, float] = {}
        for t, lp in top:  # keyed by text: tokens that decode alike (byte pieces) keep the most likely one
            top_by_text.setdefault(_text(lp, t), _finite(lp.logprob))
        out.top_logprobs.append(top_by_text if num_top else None)
        offset += len(text)
    return out
