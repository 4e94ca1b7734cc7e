"""n > 1 as vLLM does it: the engine runs one sequence per request, so a request for n samples becomes n child
requests (ids `{index}_{parent id}`, seeds `seed + index` when seeded) whose outputs are merged into one result with
n completions. LLM.generate and the server fan out through these helpers."""

from __future__ import annotations

from dataclasses import replace

from spaceserve.core.outputs import CompletionOutput, RequestOutput
from spaceserve.core.sampling_params import SamplingParams


def child_request_id(parent_id: str, index: int) -> str:
    return f"{index}_{parent_id}"


def child_params(params: SamplingParams) -> list[SamplingParams]:
    """The n=1 params of each child; a seeded parent gives child i the seed `seed + i` (so the samples differ)."""
    if params.n == 1:
        return [params]
    return [
        replace(params, n=1, seed=None if params.seed is None else params.seed + index) for index in range(params.n)
    ]


def merge_outputs(parent_id: str, children: list[RequestOutput]) -> RequestOutput:
    """One RequestOutput with the children's completions as indices 0..n-1 (their order)."""
    if len(children) == 1:
        only = children[0]
        return replace(only, request_id=parent_id)
    first = children[0]
    completions = [_reindexed(child.outputs[0], index) for index, child in enumerate(children)]
    error = next((child.error for child in children if child.error is not None), None)
    return RequestOutput(
        request_id=parent_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=completions,
        finished=all(child.finished for child in children),
        error=error,
        metrics=first.metrics,
    )


def _reindexed(completion: CompletionOutput, index: int) -> CompletionOutput:
    return replace(completion, index=index)
